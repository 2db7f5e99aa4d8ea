"""Written integer kernels for the TVM backend: selection (pure) and AVX2 TIR kernels.

:mod:`.select` decides per layer which variant is provably exact (no TVM needed);
:mod:`.intrin` and :mod:`.conv2d` are TVM-facing (tensor intrinsics, TE compute + schedule);
:mod:`.emit` puts a chosen kernel into the Relax module.
"""

from __future__ import annotations

from .select import KernelChoice, LayerFacts, select_kernel

__all__ = ["KernelChoice", "LayerFacts", "select_kernel"]
