"""The int32 requantization of the written kernels (``backends/tvm/kernels/requant32.py``): where
a plan exists it gives the int64 epilogue's code for every int32 accumulator, and the kernels
that use it stay bit-exact."""

from __future__ import annotations

import numpy as np
import pytest

from djpq_compiler.backends.tvm.kernels.requant32 import (
    INT32_MAX,
    INT32_MIN,
    Int32Requant,
    plan_int32,
    reference_requant,
)


def channel(scale: float, bias: int, shift: int, acc_shift: int = 0) -> tuple[int, int, int]:
    """``(mult, add, shift)`` of one channel as ``emit.plan_epilogue`` forms them: ``m =
    round(scale * 2^shift)``, ``mult = m * 2^acc_shift``, ``add = bias * m + 2^(shift - 1)``."""
    m = round(scale * 2.0 ** shift)
    return m << acc_shift, bias * m + (1 << (shift - 1)), shift


def thresholds(mult: int, add: int, shift: int, qmin: int, qmax: int) -> list[int]:
    """Every int32 input where the exact epilogue's code may change: ``T(j) - 1`` and ``T(j)``
    for each level (clamped into int32), and int32's ends. Two non-decreasing step functions
    that agree on these agree on all of int32."""
    points = {INT32_MIN, INT32_MAX}
    if mult > 0:
        for j in range(qmin + 1, qmax + 1):
            t = -((add - j * (1 << shift)) // mult)
            points.update(min(max(v, INT32_MIN), INT32_MAX) for v in (t - 1, t))
    return sorted(points)


def assert_exact(plan: Int32Requant, rows: list[tuple[int, int, int]], qmin: int,
                 qmax: int) -> None:
    """The plan equals the exact int64 epilogue on every channel (complete, by
    :func:`thresholds`), with every int32 intermediate inside int32 (``Int32Requant.apply``)."""
    for c, (mult, add, shift) in enumerate(rows):
        z = np.array(thresholds(mult, add, shift, qmin, qmax), dtype=np.int64)
        one = Int32Requant(*(v[c:c + 1] for v in (plan.lo, plan.hi, plan.m, plan.r, plan.s)))
        got = one.apply(z[:, None], qmin, qmax)[:, 0]
        want = reference_requant(z, mult, add, shift, qmin, qmax)
        assert np.array_equal(got, want), (c, z[got != want])


#: name -> (channels as (scale, bias, shift, acc_shift), qmin, qmax, a plan exists)
CASES = {
    # resnet20's 4-bit ReLU codes: 15 thresholds ~40 accumulator units apart
    "4-bit unsigned, scale 1/40": ([(0.025, -300, 36, 0), (0.031, 250, 36, 0)], 0, 15, True),
    "acc_shift 3 folded into the multiplier": ([(0.004, 17, 38, 3)], 0, 15, True),
    # 254 thresholds: planned where they span few accumulator values (here +-256), not where
    # they span +-64k (their fractional positions then need more than 31 bits of slope)
    "8-bit signed, steps 2 apart": ([(0.5, 40, 40, 0)], -127, 127, True),
    "8-bit signed, steps 500 apart": ([(0.002, 40, 40, 0)], -127, 127, False),
    "a zero multiplier: one code": ([(0.0, 900, 36, 0)], -127, 127, True),
    "one level (qmin == qmax)": ([(0.02, 5, 36, 0)], 0, 0, True),
    # only levels -8..8 are reached by int32 accumulators (thresholds (j - 0.5) * 2^28): at the
    # last one z * m32 + r32 reaches 8 * 2^28 = 2^31, past int32 (the kernel keeps int64)
    "thresholds past both ends of int32": ([(2.0 ** -28, 0, 40, 0)], -127, 127, False),
    "no threshold inside int32": ([(2.0 ** -40, 0, 50, 0)], -127, 127, True),
    # 510 thresholds every ~24 units over +-6000: their fractional positions need more than
    # 31 bits of slope (resnet20's residual-branch convs; a channel may plan by luck, a layer
    # of 8 does not): the kernel keeps int64
    "9-bit signed, dense thresholds": ([(0.0413 + 0.0001 * i, 120 - 50 * i, 35, 0)
                                        for i in range(8)], -255, 255, False),
}


@pytest.mark.parametrize("name", CASES)
def test_plan_exists_where_expected_and_is_exact(name: str) -> None:
    spec, qmin, qmax, planned = CASES[name]
    rows = [channel(*c) for c in spec]
    plan = plan_int32(np.array([r[0] for r in rows], dtype=object),
                      np.array([r[1] for r in rows], dtype=object),
                      np.array([r[2] for r in rows]), qmin, qmax)
    assert (plan is not None) == planned
    if plan is not None:
        assert_exact(plan, rows, qmin, qmax)


def test_a_negative_multiplier_is_not_planned() -> None:
    assert plan_int32(np.array([-5000]), np.array([0]), np.array([20]), 0, 15) is None


@pytest.mark.parametrize("qrange", [(0, 15), (-127, 127), (0, 255), (-255, 255), (0, 1)])
def test_random_layers_plan_exactly(qrange: tuple[int, int]) -> None:
    """40 random 8-channel layers per output range (scales 1e-4..0.5, shifts 30..49, biases,
    acc_shift 0..2): every plan found is exact on every channel; 4-bit codes always plan."""
    rng = np.random.default_rng(sum(qrange) + 1000)
    qmin, qmax = qrange
    planned = 0
    for _ in range(40):
        rows = [channel(float(rng.uniform(1e-4, 0.5)), int(rng.integers(-5000, 5000)),
                        int(rng.integers(30, 50)), int(rng.integers(0, 3))) for _ in range(8)]
        plan = plan_int32(np.array([r[0] for r in rows], dtype=object),
                          np.array([r[1] for r in rows], dtype=object),
                          np.array([r[2] for r in rows]), qmin, qmax)
        if plan is not None:
            planned += 1
            assert_exact(plan, rows, qmin, qmax)
    if qmax - qmin <= 15:
        assert planned == 40
    assert planned > 0


tvm = pytest.importorskip("tvm")
from tests.test_tvm_kernels import AVX2, check, int_layer  # noqa: E402


@pytest.mark.parametrize(("c_in", "c_out", "x_bits", "out_bits", "out_signed", "batch", "variant",
                          "form"), [
    (32, 19, 4, 4, False, 2, "avx2_u8s8_p4", "int32 requantization"),  # channel lanes
    (32, 19, 8, 8, True, 32, "avx2_u8s8_p4", "int64 requantization"),
    (11, 10, 6, 4, False, 3, "avx2_px16", "int32 requantization"),  # pixels in lanes
    (9, 9, 8, 4, True, 2, "avx2_dw8_acc16", "int32 requantization"),  # depthwise
])
def test_kernels_with_either_epilogue_are_bit_exact(c_in: int, c_out: int, x_bits: int,
                                                    out_bits: int, out_signed: bool, batch: int,
                                                    variant: str, form: str) -> None:
    """A layer whose codes plan in int32 and one whose do not (8-bit codes whose thresholds
    span ~+-10^5 accumulator values), through the channel-lane, pixels-in-lanes and depthwise
    kernels: bit-exact on random and worst-case input, and the record names the epilogue."""
    depthwise = variant.startswith("avx2_dw")
    layer = int_layer("conv", c_in, c_out, x_bits=x_bits, w_bits=3 if x_bits == 6 else 4,
                      groups=c_in if depthwise else 1, out_bits=out_bits,
                      out_signed=out_signed, seed=c_out)
    _, records = check(layer, (batch, c_in, 9, 8), x_bits, spec=AVX2)
    assert (records[0].variant, records[0].epilogue) == (variant, form)
