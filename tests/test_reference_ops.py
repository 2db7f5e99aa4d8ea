"""Integer reference semantics: exact against brute-force references, <= 1 LSB against floats."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from djpq_compiler.errors import ConfigError, DjpqError, QuantizationError
from djpq_compiler.ir import (
    accumulator_bound,
    accumulator_dtype,
    add_rescale,
    concat_rescales,
    dequantize,
    div_half_up,
    int_adaptive_avg_pool2d,
    int_add,
    int_avg_pool2d,
    int_concat,
    int_conv2d,
    int_linear,
    int_max_pool2d,
    int_relu,
    int_relu6,
    multiplier_bits,
    qrange,
    quantize,
    quantize_bias,
    quantize_multiplier,
    quantize_multipliers,
    requant_params,
    requantize,
    rescale,
    simulate_add,
    simulate_avg_pool2d,
    simulate_conv2d,
    simulate_linear,
)

FAST = settings(max_examples=40, deadline=None, derandomize=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint(lo: int, hi: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=_gen(seed), dtype=torch.int64)


# --------------------------------------------------------------------------- ranges, multipliers


@pytest.mark.parametrize("bits", range(2, 17))
def test_qrange_conventions(bits: int) -> None:
    assert qrange(bits, signed=True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert qrange(bits, signed=True, narrow=False) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert qrange(bits, signed=False) == (0, 2**bits - 1)
    assert qrange(bits, signed=False, narrow=True) == (1, 2**bits - 1)


@pytest.mark.parametrize("bits", [1, 17, 8.0, True, None])
def test_qrange_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(ConfigError):
        qrange(bits, signed=True)  # type: ignore[arg-type]


def _check_multiplier(real: float, bits: int = 31) -> None:
    m, shift = quantize_multiplier(real, bits)
    assert 0 < m < 2**31 and 0 <= shift <= 62
    rel = abs(Fraction(m, 2**shift) - Fraction(real)) / Fraction(real)
    # full precision 2^-bits down to 2^(bits-63); below, the shift cap leaves 2^-63 absolute
    assert rel <= max(Fraction(1, 2**bits), Fraction(1, 2**63) / Fraction(real))
    if bits == 31 and real >= 2.0**-32:
        assert rel < Fraction(1, 2**30)


@pytest.mark.parametrize("exponent", range(-50, 31, 3))
def test_quantize_multiplier_relative_error_log_grid(exponent: int) -> None:
    for mantissa in (1.0, 1.2345678901, math.pi / 2, 1.9999999999):
        _check_multiplier(mantissa * 2.0**exponent)


@FAST
@given(st.floats(min_value=2.0**-60, max_value=2.0**30, allow_nan=False))
def test_quantize_multiplier_relative_error_random(real: float) -> None:
    _check_multiplier(real)
    _check_multiplier(real, bits=20)


def test_quantize_multiplier_exact_cases() -> None:
    assert quantize_multiplier(1.0) == (2**30, 30)
    assert quantize_multiplier(0.5) == (2**30, 31)
    assert quantize_multiplier(2.0**20) == (2**30, 10)
    m, shift = quantize_multiplier(1.0 - 2.0**-40)  # rounds up into a new bit: renormalized
    assert (m, shift) == (2**30, 30)
    m, shift = quantize_multiplier(2.0**-60)  # tiny: shift capped at 62, fewer bits kept
    assert shift == 62 and Fraction(m, 2**shift) == Fraction(2) ** -60 and m == 4
    assert quantize_multiplier(2.0**31 - 1.0) == (2**31 - 1, 0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 2.0**31, 2.0**-65])
def test_quantize_multiplier_rejects(bad: float) -> None:
    with pytest.raises(QuantizationError):
        quantize_multiplier(bad)


def test_quantize_multipliers_per_channel() -> None:
    m, shift = quantize_multipliers(torch.tensor([0.25, 1e-3, 7.5], dtype=torch.float64))
    assert m.dtype == shift.dtype == torch.int64
    assert [quantize_multiplier(r) for r in (0.25, 1e-3, 7.5)] == list(
        zip(m.tolist(), shift.tolist(), strict=True)
    )


def test_multiplier_bits() -> None:
    assert multiplier_bits(2**31 - 1) == 31
    assert multiplier_bits(2**36) == 25
    with pytest.raises(QuantizationError):
        multiplier_bits(2**56)


# --------------------------------------------------------------------------------- requantize


def _requant_ref(acc: int, m: int, shift: int, zp: int, qmin: int, qmax: int) -> int:
    rounding = 1 << (shift - 1) if shift > 0 else 0
    return min(max(((acc * m + rounding) >> shift) + zp, qmin), qmax)  # Python >> floors


@FAST
@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=16),
    st.integers(1, 2**31 - 1),
    st.integers(0, 62),
    st.integers(-128, 255),
)
def test_requantize_matches_bigint_reference(
    accs: list[int], m: int, shift: int, zp: int
) -> None:
    qmin, qmax = -(2**40), 2**40
    got = requantize(torch.tensor(accs), m, shift, zp, qmin, qmax).tolist()
    assert got == [_requant_ref(a, m, shift, zp, qmin, qmax) for a in accs]


def test_requantize_ties_round_half_up() -> None:
    acc = torch.tensor([-5, -3, -1, 1, 3, 5])
    assert requantize(acc, 1, 1).tolist() == [-2, -1, 0, 1, 2, 3]  # x.5 -> towards +inf
    assert requantize(acc, 3, 0).tolist() == [-15, -9, -3, 3, 9, 15]  # shift 0: no rounding


def test_requantize_per_channel_zero_point_and_clip() -> None:
    acc = _randint(-(2**20), 2**20, (2, 3, 4, 4), seed=0)
    m, shift = quantize_multipliers([0.01, 0.003, 0.2])
    out = requantize(acc, m, shift, zero_point=7, qmin=0, qmax=255)
    for c in range(3):
        ref = [_requant_ref(a, int(m[c]), int(shift[c]), 7, 0, 255)
               for a in acc[:, c].flatten().tolist()]
        assert out[:, c].flatten().tolist() == ref


def test_requantize_overflow_and_bad_arguments() -> None:
    with pytest.raises(QuantizationError, match="overflow"):
        requantize(torch.tensor([2**40]), 2**31 - 1, 31)
    with pytest.raises(QuantizationError):
        requantize(torch.tensor([1]), 0, 3)
    with pytest.raises(QuantizationError):
        requantize(torch.tensor([1]), 5, 63)
    with pytest.raises(QuantizationError):
        requantize(torch.tensor([1.0]), 5, 3)
    with pytest.raises(QuantizationError):
        requantize(torch.ones(2, 3, dtype=torch.int64), torch.tensor([1, 2]), 3)  # 2 != 3 channels
    # an int64 accumulator beyond int32 is fine with the precision multiplier_bits chooses
    bound = 2**40
    m, shift = quantize_multiplier(1e-9, bits=multiplier_bits(bound))
    out = requantize(torch.tensor([bound, -bound]), m, shift)
    assert out.tolist() == [_requant_ref(a, m, shift, 0, -(2**62), 2**62) for a in (bound, -bound)]


def test_rescale_identity_and_equal_scales() -> None:
    q = torch.arange(0, 256)
    assert torch.equal(rescale(q, None, 0, 3, 3, 0, 255), q)
    assert torch.equal(rescale(q, 2**30, 30, 3, 3, 0, 255), q)  # multiplier 1.0 is exact


# ------------------------------------------------------------------------ quantize/dequantize


def test_quantize_rounds_half_to_even_and_clamps() -> None:
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 1000.0, -1000.0])
    assert quantize(x, 1.0, 0, -127, 127).tolist() == [-2, -2, 0, 0, 2, 2, 127, -127]
    assert quantize(x, 1.0, 10, 0, 255).tolist() == [8, 8, 10, 10, 12, 12, 255, 0]


def test_quantize_dequantize_per_channel_roundtrip() -> None:
    scale = torch.tensor([0.1, 0.02])
    q = _randint(-127, 127, (3, 2, 4), seed=1)
    x = dequantize(q, scale, 0, axis=1)
    assert x.dtype == torch.float32
    assert torch.equal(quantize(x, scale, 0, -127, 127, axis=1), q)


def test_quantize_dequantize_reject_wrong_dtypes() -> None:
    with pytest.raises(QuantizationError):
        quantize(torch.tensor([1, 2]), 0.1, 0, 0, 255)
    with pytest.raises(QuantizationError):
        dequantize(torch.tensor([1.0]), 0.1)
    with pytest.raises(QuantizationError):
        quantize(torch.tensor([1.0]), 0.0, 0, 0, 255)


def test_quantize_bias() -> None:
    b = torch.tensor([0.25, -0.75, 1.25])
    assert quantize_bias(b, 0.5, 1.0).tolist() == [0, -2, 2]  # half to even
    assert quantize_bias(b, 0.5, torch.tensor([0.5, 0.5, 0.25])).tolist() == [1, -3, 10]
    with pytest.raises(QuantizationError):
        quantize_bias(torch.tensor([1.0]), 1e-6, 1e-6)


# ------------------------------------------------------------------------------- conv, linear


def _conv_ref(
    x: np.ndarray, w: np.ndarray, stride: int, pad: int, dil: int, groups: int, zx: int
) -> np.ndarray:
    """Brute-force grouped conv on int64: zero-pad (x - zx), sum over channels and taps."""
    xp = np.pad(x - zx, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, _, hp, wp = xp.shape
    c_out, cpg, kh, kw = w.shape
    ho = (hp - dil * (kh - 1) - 1) // stride + 1
    wo = (wp - dil * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, c_out, ho, wo), dtype=np.int64)
    opg = c_out // groups
    for o in range(c_out):
        g = o // opg
        for i in range(ho):
            for j in range(wo):
                for c in range(cpg):
                    for a in range(kh):
                        for b in range(kw):
                            ih, iw = i * stride + a * dil, j * stride + b * dil
                            out[:, o, i, j] += xp[:, g * cpg + c, ih, iw] * w[o, c, a, b]
    return out


@FAST
@given(
    n=st.integers(1, 2),
    groups_kind=st.sampled_from(["dense", "grouped", "depthwise"]),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    dil=st.integers(1, 2),
    hw=st.integers(3, 6),
    x_bits=st.integers(2, 8),
    w_bits=st.integers(2, 8),
    seed=st.integers(0, 2**16),
)
def test_int_conv2d_matches_brute_force(
    n: int, groups_kind: str, k: int, stride: int, pad: int, dil: int, hw: int,
    x_bits: int, w_bits: int, seed: int,
) -> None:
    c_in, groups = {"dense": (3, 1), "grouped": (4, 2), "depthwise": (3, 3)}[groups_kind]
    c_out = 2 * groups
    if dil * (k - 1) + 1 > hw + 2 * pad:
        return
    xmin, xmax = qrange(x_bits, signed=False)
    wmin, wmax = qrange(w_bits, signed=True)
    x = _randint(xmin, xmax, (n, c_in, hw, hw), seed)
    w = _randint(wmin, wmax, (c_out, c_in // groups, k, k), seed + 1)
    bias = _randint(-1000, 1000, (c_out,), seed + 2)
    zx = int(_randint(xmin, xmax, (), seed + 3))
    got = int_conv2d(x, w, bias, stride, pad, dil, groups, x_zero_point=zx)
    ref = _conv_ref(x.numpy(), w.numpy(), stride, pad, dil, groups, zx)
    ref += bias.numpy()[None, :, None, None]
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), ref)


def test_int_conv2d_padding_is_the_zero_point() -> None:
    x = _randint(0, 255, (1, 2, 5, 5), seed=4)
    w = _randint(-127, 127, (3, 2, 3, 3), seed=5)
    padded = F.pad(x, (1, 1, 1, 1), value=37)
    assert torch.equal(
        int_conv2d(x, w, padding=1, x_zero_point=37), int_conv2d(padded, w, x_zero_point=37)
    )


def test_int_conv2d_wide_accumulator_is_exact_int64() -> None:
    """16-bit x 16-bit with fan-in 64*9 needs int64 (bound > 2^31): still exact."""
    x = torch.full((1, 64, 3, 3), 2**16 - 1)
    w = torch.full((1, 64, 3, 3), 2**15 - 1)
    bound = accumulator_bound(64 * 9, 16, 16, x_zero_point=0)
    assert accumulator_dtype(bound) == torch.int64
    assert int_conv2d(x, w).item() == bound == 64 * 9 * (2**16 - 1) * (2**15 - 1)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_accumulation_at_its_bound_is_exact(groups: int, seed: int) -> None:
    """The float32 path (every partial sum <= 2^24) equals exact int64 arithmetic, also with
    values as large as the bound allows; one more unit of range switches to float64, still exact.
    """
    fan_in = 32 // groups * 9
    amax, wmax = 2**7 - 1, (2**24) // (fan_in * (2**7 - 1))
    assert fan_in * amax * wmax <= 2**24
    x = _randint(-amax, amax, (2, 32, 9, 9), seed)
    w = _randint(-wmax, wmax, (8, 32 // groups, 3, 3), seed + 10)
    x[0, :, :3, :3] = amax  # one window at the bound itself, same signs
    w[0] = wmax
    expected = F.conv2d(x.double(), w.double(), None, 1, 1, 1, groups).round().to(torch.int64)
    brute = torch.zeros_like(expected[:1, :1, :1, :1])
    xp = F.pad(x, (1, 1, 1, 1))
    brute[0, 0, 0, 0] = (xp[0, : 32 // groups, 0:3, 0:3] * w[0]).sum()
    assert torch.equal(int_conv2d(x, w, padding=1, groups=groups), expected)
    assert int_conv2d(x, w, padding=1, groups=groups)[0, 0, 0, 0] == brute[0, 0, 0, 0]
    w[0, 0, 0, 0] = wmax + 1  # bound now above 2^24: float64 path
    expected = F.conv2d(x.double(), w.double(), None, 1, 1, 1, groups).round().to(torch.int64)
    assert torch.equal(int_conv2d(x, w, padding=1, groups=groups), expected)
    xl = _randint(-amax, amax, (16, fan_in), seed + 20)
    wl = _randint(-wmax, wmax, (5, fan_in), seed + 30)
    exact = xl @ wl.T  # int64 matmul: exact by construction
    assert torch.equal(int_linear(xl, wl), exact)


def test_reduced_float32_precision_falls_back_to_float64() -> None:
    """With TF32/bf16 matmuls allowed, float32 is no longer exact: the float64 path is used."""
    from djpq_compiler.ir import ops

    x = torch.ones(1, 4, 3, 3)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert ops._exact_dtype(x, x, 36, "t") == torch.float64
    finally:
        torch.set_float32_matmul_precision(previous)
    assert ops._exact_dtype(x, x, 36, "t") == torch.float32


def test_accumulator_bound_formula_and_int32_rule() -> None:
    assert accumulator_bound(9 * 64, 8, 8) == 9 * 64 * 255 * 127
    assert accumulator_dtype(accumulator_bound(9 * 512, 8, 8)) == torch.int32
    assert accumulator_dtype(accumulator_bound(9 * 512, 16, 8)) == torch.int64
    assert accumulator_bound(10, 8, 4, x_zero_point=200, bias_bound=5) == 10 * 200 * 7 + 5
    # the bound is attained: all-extreme inputs and weights
    x = torch.full((1, 8, 3, 3), 255)
    w = torch.full((2, 8, 3, 3), -127)
    assert int_conv2d(x, w).abs().max().item() == accumulator_bound(72, 8, 8)


def test_int_conv2d_errors() -> None:
    x = _randint(0, 255, (1, 2, 4, 4), seed=6)
    w = _randint(-127, 127, (3, 2, 3, 3), seed=7)
    with pytest.raises(QuantizationError):
        int_conv2d(x.float(), w)
    with pytest.raises(QuantizationError):
        int_conv2d(x, w, groups=2)
    with pytest.raises(QuantizationError):
        int_conv2d(x, w, torch.tensor([2**31, 0, 0]))
    with pytest.raises(QuantizationError, match="2\\^53"):
        int_conv2d(torch.full((1, 1, 1, 1), 2**27), torch.full((1, 1, 1, 1), 2**27))


@FAST
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**16))
def test_int_linear_matches_numpy(n: int, fan_in: int, out: int, seed: int) -> None:
    x = _randint(0, 2**12 - 1, (n, fan_in), seed)
    w = _randint(-(2**11), 2**11, (out, fan_in), seed + 1)
    bias = _randint(-(2**20), 2**20, (out,), seed + 2)
    ref = (x.numpy() - 17) @ w.numpy().T + bias.numpy()
    np.testing.assert_array_equal(int_linear(x, w, bias, x_zero_point=17).numpy(), ref)
    got3 = int_linear(x[None], w, bias, x_zero_point=17)  # extra leading dim
    np.testing.assert_array_equal(got3[0].numpy(), ref)


# ---------------------------------------------------------------- full pipelines vs float sim


def _scales(seed: int, n: int, lo: float, hi: float) -> torch.Tensor:
    u = torch.rand(n, generator=_gen(seed), dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


@FAST
@given(
    x_bits=st.integers(2, 8),
    w_bits=st.integers(2, 8),
    o_bits=st.integers(2, 8),
    depthwise=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_requant_pipeline_within_one_lsb_of_float_simulation(
    x_bits: int, w_bits: int, o_bits: int, depthwise: bool, seed: int
) -> None:
    c_in, c_out, groups = (4, 4, 4) if depthwise else (3, 5, 1)
    (xmin, xmax), (wmin, wmax) = qrange(x_bits, False), qrange(w_bits, True)
    omin, omax = qrange(o_bits, False)
    x = _randint(xmin, xmax, (2, c_in, 6, 6), seed)
    w = _randint(wmin, wmax, (c_out, c_in // groups, 3, 3), seed + 1)
    bias = _randint(-300, 300, (c_out,), seed + 2)
    zx, zo = int(_randint(xmin, xmax, (), seed + 3)), int(_randint(omin, omax, (), seed + 4))
    s_x, s_o = _scales(seed + 5, 2, 1e-3, 1.0).tolist()
    s_w = _scales(seed + 6, c_out, 1e-3, 1.0)
    conv = {"stride": 2, "padding": 1, "groups": groups}
    bound = accumulator_bound(w[0].numel(), x_bits, w_bits, x_zero_point=zx, bias_bound=300)
    m, shift = requant_params(s_x, s_w, s_o, bound)
    acc = int_conv2d(x, w, bias, x_zero_point=zx, **conv)
    got = requantize(acc, m, shift, zo, omin, omax)
    sim = simulate_conv2d(x, s_x, zx, w, s_w, bias, s_o, zo, omin, omax, **conv)
    assert int((got - sim).abs().max()) <= 1


@FAST
@given(st.integers(2, 16), st.integers(2, 16), st.integers(0, 2**16))
def test_linear_requant_pipeline_within_one_lsb_any_bits(
    x_bits: int, w_bits: int, seed: int
) -> None:
    (xmin, xmax), (wmin, wmax) = qrange(x_bits, False), qrange(w_bits, True)
    x = _randint(xmin, xmax, (3, 50), seed)
    w = _randint(wmin, wmax, (4, 50), seed + 1)
    s_x, s_w, s_o = _scales(seed + 2, 3, 1e-4, 1.0).tolist()
    out_abs = 50 * (xmax - xmin) * max(-wmin, wmax) * s_x * s_w
    s_o = out_abs / 2**15 * (1 + s_o)  # output range roughly covers the data
    omin, omax = qrange(16, True, narrow=False)
    bound = accumulator_bound(50, x_bits, w_bits)
    m, shift = requant_params(s_x, s_w, s_o, bound)
    got = requantize(int_linear(x, w, x_zero_point=3), m, shift, 0, omin, omax)
    sim = simulate_linear(x, s_x, 3, w, s_w, None, s_o, 0, omin, omax)
    assert int((got - sim).abs().max()) <= 1


# --------------------------------------------------------------------------- add, concat, relu


@FAST
@given(
    st.integers(2, 16),
    st.floats(1e-4, 1.0),
    st.floats(1e-4, 1.0),
    st.floats(0.2, 5.0),
    st.integers(0, 2**16),
)
def test_int_add_within_one_lsb_of_real_sum(
    bits: int, s_a: float, s_b: float, out_ratio: float, seed: int
) -> None:
    qmin, qmax = qrange(bits, False)
    a = _randint(qmin, qmax, (2, 3, 5), seed)
    b = _randint(qmin, qmax, (1, 3, 1), seed + 1)  # broadcasting
    za, zb, zo = (int(v) for v in _randint(qmin, qmax, (3,), seed + 2))
    s_o = (s_a + s_b) * out_ratio
    params = add_rescale(s_a, s_b, s_o)
    got = int_add(a, b, params, za, zb, zo, qmin, qmax)
    sim = simulate_add(a, s_a, za, b, s_b, zb, s_o, zo, qmin, qmax)
    assert int((got - sim).abs().max()) <= 1


def test_int_add_equal_scales_is_exact() -> None:
    a = _randint(0, 255, (4, 8), seed=8)
    b = _randint(0, 255, (4, 8), seed=9)
    got = int_add(a, b, add_rescale(0.05, 0.05, 0.05), 10, 20, 30, 0, 255)
    assert torch.equal(got, ((a - 10) + (b - 20) + 30).clamp(0, 255))


def test_add_rescale_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        add_rescale(0.1, 0.1, 0.1, left_shift=40)
    with pytest.raises(QuantizationError):
        add_rescale(0.1, float("nan"), 0.1)


def test_int_concat_identity_and_rescale() -> None:
    a = _randint(0, 255, (2, 3, 4), seed=10)
    b = _randint(0, 255, (2, 2, 4), seed=11)
    rescales = concat_rescales([0.1, 0.3], 0.1)
    assert rescales[0] is None
    out = int_concat([a, b], rescales, [5, 9], 5, 0, 255)
    assert torch.equal(out[:, :3], a)
    real_b = (b - 9).double() * 0.3
    ref_b = (torch.round(real_b / 0.1).to(torch.int64) + 5).clamp(0, 255)
    assert int((out[:, 3:] - ref_b).abs().max()) <= 1
    with pytest.raises(QuantizationError):
        int_concat([a, b], rescales[:1], [5, 9], 5, 0, 255)


def test_int_relu_and_relu6_match_float_exactly() -> None:
    scale, zp = 0.05, 40
    x = torch.arange(0, 256)
    assert torch.equal(int_relu(x, zp), x.clamp(min=zp))
    real = dequantize(x, scale, zp, dtype=torch.float64)
    ref = quantize(F.relu6(real), scale, zp, 0, 255)
    assert torch.equal(int_relu6(x, scale, zp, 0, 255), ref)
    assert int(int_relu6(x, scale, zp, 0, 255).max()) == round(6 / scale) + zp


# ------------------------------------------------------------------------------------ pooling


def _pool_windows(h: int, k: int, s: int, p: int, d: int, ceil: bool) -> list[list[int]]:
    """Input rows of each output row (torch's output-size rule), padding rows as -1."""
    span = d * (k - 1) + 1
    num = h + 2 * p - span
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= h + p:
        out -= 1
    return [[i * s - p + a * d for a in range(k)] for i in range(out)]


@FAST
@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.integers(1, 2),
    st.booleans(), st.integers(3, 7), st.integers(0, 2**16),
)
def test_int_max_pool2d_matches_brute_force(
    k: int, s: int, p: int, d: int, ceil: bool, h: int, seed: int
) -> None:
    if p > k // 2 or d * (k - 1) + 1 > h + 2 * p:
        return
    x = _randint(-100, 255, (1, 2, h, h + 1), seed)
    got = int_max_pool2d(x, k, s, p, d, ceil)
    rows, cols = _pool_windows(h, k, s, p, d, ceil), _pool_windows(h + 1, k, s, p, d, ceil)
    assert got.shape[2:] == (len(rows), len(cols))
    for i, rw in enumerate(rows):
        for j, cw in enumerate(cols):
            vals = x[:, :, [r for r in rw if 0 <= r < h]][:, :, :, [c for c in cw if 0 <= c <= h]]
            assert torch.equal(got[:, :, i, j], vals.amax(dim=(2, 3)))


def _half_up(num: int, den: int) -> int:
    return math.floor(Fraction(num, den) + Fraction(1, 2))


@FAST
@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.booleans(), st.booleans(),
    st.integers(3, 7), st.integers(0, 2**16),
)
def test_int_avg_pool2d_matches_brute_force(
    k: int, s: int, p: int, ceil: bool, include_pad: bool, h: int, seed: int
) -> None:
    if p > k // 2:
        return
    zp = 50
    x = _randint(0, 255, (1, 2, h, h), seed)
    got = int_avg_pool2d(x, k, s, p, ceil, include_pad, zero_point=zp)
    windows = _pool_windows(h, k, s, p, 1, ceil)
    assert got.shape[2:] == (len(windows), len(windows))
    for i, rw in enumerate(windows):
        for j, cw in enumerate(windows):
            rin = [r for r in rw if 0 <= r < h]
            cin = [c for c in cw if 0 <= c < h]
            total = int((x[0, 0][rin][:, cin] - zp).sum())
            if include_pad:  # torch counts padding but not what lies beyond it
                count = len([r for r in rw if r < h + p]) * len([c for c in cw if c < h + p])
            else:
                count = len(rin) * len(cin)
            assert int(got[0, 0, i, j]) == _half_up(total, count) + zp
    sim = simulate_avg_pool2d(x, 0.1, zp, 0, 255, kernel_size=k, stride=s, padding=p,
                              ceil_mode=ceil, count_include_pad=include_pad)
    assert int((got - sim).abs().max()) <= 1


def test_int_avg_pool2d_ties_and_divisor_override() -> None:
    x = torch.tensor([[[[1, 2], [3, 5]]]])  # sum 11 / 4 = 2.75
    assert int_avg_pool2d(x, 2).item() == 3
    assert int_avg_pool2d(torch.tensor([[[[0, 1]]]]), (1, 2)).item() == 1  # 0.5 -> 1
    assert int_avg_pool2d(torch.tensor([[[[-1, 0]]]]), (1, 2)).item() == 0  # -0.5 -> 0
    assert int_avg_pool2d(x, 2, divisor_override=2).item() == 6  # 5.5 -> 6
    assert int_avg_pool2d(x, 2, divisor_override=2, qmax=5).item() == 5
    assert torch.equal(div_half_up(torch.tensor([-3, -1, 1, 3]), 2), torch.tensor([-1, 0, 1, 2]))


@pytest.mark.parametrize("out_size", [1, 2, 3, (2, None), (4, 3)])
def test_int_adaptive_avg_pool2d_matches_brute_force(out_size: object) -> None:
    zp = 7
    x = _randint(0, 255, (2, 3, 7, 5), seed=12)
    got = int_adaptive_avg_pool2d(x, out_size, zero_point=zp)
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    ow = 5 if ow is None else ow
    assert got.shape == (2, 3, oh, ow)
    for i in range(oh):
        for j in range(ow):
            h0, h1 = i * 7 // oh, -(-(i + 1) * 7 // oh)
            w0, w1 = j * 5 // ow, -(-(j + 1) * 5 // ow)
            win = x[:, :, h0:h1, w0:w1] - zp
            ref = [[_half_up(int(v), win[0, 0].numel()) + zp for v in row]
                   for row in win.sum(dim=(2, 3)).tolist()]
            assert got[:, :, i, j].tolist() == ref
    # same bins as torch's float adaptive pooling
    real = F.adaptive_avg_pool2d((x - zp).double(), out_size)
    assert float((got - zp - real).abs().max()) <= 0.5


def test_pooling_rejects_non_integer_and_wrong_rank() -> None:
    with pytest.raises(QuantizationError):
        int_max_pool2d(torch.zeros(1, 1, 4, 4), 2)
    with pytest.raises(QuantizationError):
        int_avg_pool2d(torch.zeros(4, 4, dtype=torch.int64), 2)
    with pytest.raises(DjpqError):
        int_adaptive_avg_pool2d(torch.zeros(1, 1, 4, 4, dtype=torch.int64), 0)
