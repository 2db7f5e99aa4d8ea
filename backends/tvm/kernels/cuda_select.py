"""Kernel selection for CUDA targets: the ``dp4a`` conv/linear kernel where it is provably exact.

Pure Python (no TVM), called by :func:`.select.select_kernel` for targets with the ``"dp4a"``
feature (CUDA ``sm_61`` and newer, :func:`dp4a_arch`). Bound: activations shifted to
``[0, span]`` with ``span <= 255`` (offset ``-lo`` for signed codes, corrected in the bias as on
x86), weights in ``[-128, 127]``; ``dp4a.u32.s32`` forms the four u8 x s8 products and their
sum at full width and adds them to the int32 accumulator, so the only bound is the accumulator's
(``LayerFacts.kernel_acc_bound() <= 2^31 - 1``, W8A8 included). Depthwise convs stay
``default`` (TVM's CUDA lowering) on CUDA.
"""

from __future__ import annotations

import re

from .select import INT32_MAX, KernelChoice, LayerFacts

__all__ = ["DP4A_MIN_ARCH", "dp4a_arch", "select_dp4a"]

#: ``dp4a`` exists from compute capability 6.1 on.
DP4A_MIN_ARCH = 61


def dp4a_arch(arch: str) -> bool:
    """Whether a CUDA ``arch`` string (``"sm_80"``, ``"sm_90a"``) has ``dp4a``."""
    match = re.fullmatch(r"sm_(\d+)[a-z]?", arch.strip())
    return match is not None and int(match.group(1)) >= DP4A_MIN_ARCH


def select_dp4a(facts: LayerFacts) -> KernelChoice:
    """``cuda_dp4a`` for a dense (or grouped) conv/linear whose operands fit u8 x s8 and whose
    accumulator fits int32; ``default`` otherwise, with the reason."""
    span = facts.span
    w_lo, w_hi = int(facts.weight.min(initial=0)), int(facts.weight.max(initial=0))
    if span > 255 or w_lo < -128 or w_hi > 127:
        return KernelChoice(facts.layer, facts.op, "default", "-",
                            f"{facts.target}: dp4a needs activation codes spanning <= 256 values "
                            f"and weights in [-128, 127] (span {span}, weights [{w_lo}, {w_hi}])",
                            facts.macs)
    bound = facts.kernel_acc_bound()
    if bound > INT32_MAX:
        return KernelChoice(facts.layer, facts.op, "default", "-",
                            f"accumulator bound {bound} > 2^31-1 needs int64", facts.macs)
    text = (f"span {span} <= 255, weights [{w_lo}, {w_hi}] in int8 (dp4a sums 4 u8 x s8 "
            f"products exactly into int32); acc bound {bound} <= 2^31-1")
    return KernelChoice(facts.layer, facts.op, "cuda_dp4a", text,
                        f"{facts.target}: u8 x s8 dp4a, activation offset {facts.act_offset}",
                        facts.macs)
