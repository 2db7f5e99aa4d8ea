"""Trainable building blocks of a prepared model: VIB gates and DQ quantizers (pure PyTorch).

They know nothing about graphs; ``prepare()`` creates them from a
:class:`~djpq_compiler.config.DJPQConfig` and wires them into the captured model.
"""

from __future__ import annotations

from djpq_compiler.modules.gates import StepHookHandle, VIBGate, attach_step_hook
from djpq_compiler.modules.quantizers import DQQuantizer, Snapped, dq_quantize, levels

__all__ = [
    "VIBGate",
    "StepHookHandle",
    "attach_step_hook",
    "DQQuantizer",
    "Snapped",
    "dq_quantize",
    "levels",
]
