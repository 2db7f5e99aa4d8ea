"""The Winograd F(4x4, 3x3) kernel on AVX2 (``avx2_wino4_s16``, issue 15): bit-exact against the
reference executor on pruned odd channel counts, output sizes that are no multiple of 4, batch 1
and 32, padding 0-2, signed activations, W8A8 whose ``576 Y`` passes int32, NCHW and packed
layouts; each of its bounds at the bound and one past (the selection then falls back to F(2x2,
3x3) or the channel-lane kernel); the kernel itself wrong past its activation and output
bounds; its speed rule and register tiles as data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from djpq_compiler.ir import modules as im

pytest.importorskip("tvm")
wino = pytest.importorskip("djpq_compiler.backends.tvm.kernels.winograd")
from djpq_compiler.backends.tvm.kernels.conv2d import ConvKernelSpec  # noqa: E402
from djpq_compiler.backends.tvm.kernels.select import (  # noqa: E402
    INT16_MAX,
    WINOGRAD_F4,
    WinogradScheme,
    winograd,
    winograd_bounds,
)
from tests.test_tvm_kernels import AVX2, check, int_layer  # noqa: E402
from tests.test_tvm_kernels_winograd import (  # noqa: E402
    DepthwiseThenDense,
    lanes_choice,
    layer_facts,
    run_kernel_alone,
)
from tests.test_tvm_layout import conv  # noqa: E402

#: (c_in, c_out, padding, batch, x_bits, signed, w_bits, hw, variant)
CASES = [
    (67, 19, 1, 1, 8, False, 4, (9, 10), "avx2_wino4_s16"),  # odd channels, 9x10 output
    (64, 24, 0, 2, 8, True, 3, (12, 11), "avx2_wino4_s16"),  # signed, no padding: 10x9
    (65, 40, 2, 1, 8, False, 6, (8, 8), "avx2_wino4_s16"),  # W6A8, padding 2, 5 blocks
    (64, 16, 1, 32, 8, False, 4, (8, 9), "avx2_wino4_s16"),  # batch 32
    (64, 13, 1, 1, 5, False, 5, (13, 8), "avx2_wino4_s16"),  # W5A5
    (64, 8, 1, 1, 10, False, 4, (9, 9), "avx2_wino_s16"),  # 100 * 1023 past int16: F(2, 3)
    (64, 8, 1, 1, 8, False, 8, (9, 9), "avx2_wino4_s16"),  # W8A8: 576 Y passes int32, Y fits
    (256, 8, 1, 1, 8, False, 8, (9, 9), "avx2_wino_s16"),  # W8A8: sum|w| * 255 past 2^25
    (64, 8, 1, 1, 8, False, 4, (7, 7), "avx2_u8s8_p4"),  # 7x7 output (WINOGRAD4_MIN_OUT)
    (32, 8, 1, 1, 8, False, 4, (28, 29), "avx2_wino4_s16"),  # 32 channels, 28x29 output
    (32, 8, 1, 1, 8, False, 4, (27, 30), "avx2_u8s8_p4"),  # 32 channels, 27 rows
]


@pytest.mark.parametrize(("c_in", "c_out", "padding", "batch", "x_bits", "signed", "w_bits",
                          "hw", "variant"), CASES)
def test_winograd4_conv_exact(c_in: int, c_out: int, padding: int, batch: int, x_bits: int,
                              signed: bool, w_bits: int, hw: tuple[int, int],
                              variant: str) -> None:
    layer = int_layer("conv", c_in, c_out, x_bits=x_bits, x_signed=signed, w_bits=w_bits,
                      padding=padding, seed=c_in * 5 + c_out)
    _, records = check(layer, (batch, c_in) + hw, x_bits, signed)
    assert [r.variant for r in records] == [variant]


def test_winograd4_float_output_and_acc_shift() -> None:
    """The int32 accumulator (a float-output layer) with ``acc_shift``, through the same kernel."""
    layer = int_layer("conv", 64, 11, x_bits=8, w_bits=4, out_scale=None, acc_shift=2)
    _, records = check(layer, (2, 64, 10, 9), 8)
    assert [r.variant for r in records] == ["avx2_wino4_s16"]


class W4A8Block(torch.nn.Module):
    """A 3-channel stem, then two W4A8 3x3 convs of 32 channels at 28x29 (packed ``NCHW8c``
    between the kernels; 28 output rows take F(4x4, 3x3) at 32 channels), the second one into a
    5-channel output conv (NCHW out)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.a = conv(3, 32, 0.02, 0.05, w_bits=4, seed=51)
        self.relu = im.IntClip(0, 255)
        self.b = conv(32, 32, 0.05, 0.05, w_bits=4, seed=52)
        self.c = conv(32, 5, 0.05, 0.05, w_bits=4, seed=53)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.relu(self.b(self.relu(self.a(self.quant(x))))))


def test_winograd4_packed_between_layers() -> None:
    """F(4x4, 3x3) reading and writing ``NCHW8c`` mid-network and writing NCHW at the graph's
    output, bit-exact, its bound in the report."""
    from djpq_compiler.backends.tvm.kernels.report import kernel_table
    from tests.test_tvm_layout import assert_exact

    ctx = assert_exact(W4A8Block(), (1, 3, 28, 29), AVX2)
    got = {r.layer: (r.variant, r.in_layout, r.out_layout)
           for r in ctx.kernels}  # type: ignore[attr-defined]
    assert got["b"] == ("avx2_wino4_s16", "NCHW8c", "NCHW8c")
    assert got["c"] == ("avx2_wino4_s16", "NCHW8c", "NCHW")
    table = kernel_table(ctx.kernels)  # type: ignore[attr-defined]
    assert "Winograd F(4x4,3x3): |V| <= 100*255 = 25500 <= 32767" in table


def test_winograd4_reads_sixteen_lane_layout() -> None:
    """An AVX-512 target without VNNI (``skylake-avx512``: ``NCHW16c`` between layers): F(4x4,
    3x3) reads 16-lane blocks (its packed store is 8 lanes: it writes NCHW there), bit-exact."""
    from tests.test_tvm_layout import assert_exact

    ctx = assert_exact(DepthwiseThenDense(64, 21, 4, 61), (2, 64, 9, 10),
                       {"kind": "llvm", "mcpu": "skylake-avx512"})
    got = {r.layer: (r.variant, r.in_layout, r.out_layout)
           for r in ctx.kernels}  # type: ignore[attr-defined]
    assert got["b"] == ("avx2_wino4_s16", "NCHW16c", "NCHW")


# ------------------------------------------------------------------------- bounds, as data

def _pick(weight: np.ndarray, span: int, variant: str = "avx2_s16",
          out: tuple[int, int] = (8, 8), packed: bool = False) -> str:
    facts = layer_facts(weight, span, packed)
    return winograd(lanes_choice(facts, variant), facts, (1, 1), (1, 1), out).variant


def test_activation_bound_at_and_one_past() -> None:
    """``100 * span <= 32767`` (``B^T``'s largest row sum of ``|b|`` is 10, squared: every partial
    sum of both passes): span 327 is the last; at 328 the layer gets F(2x2, 3x3)."""
    w = np.ones((2, 64, 3, 3), np.int64)
    assert _pick(w, 327) == "avx2_wino4_s16"
    assert _pick(w, 328) == "avx2_wino_s16"


def test_weight_transform_bound_at_and_one_past() -> None:
    """``|U| <= 32767``: ``U[3, 3]`` weighs the taps by ``(1, 2, 4) x (1, 2, 4)`` (49 in all),
    so nine weights of 668 give 32732; the corner tap 2 higher (x16) and the first 3 higher (x1)
    give 32767; one more is one past. The layer then gets F(2x2, 3x3)."""
    w = np.zeros((1, 64, 3, 3), np.int64)
    w[0, 0] = 668
    w[0, 0, 2, 2] += 2
    w[0, 0, 0, 0] += 3
    assert int(np.abs(WINOGRAD_F4.weight_transform(w)).max()) == INT16_MAX
    assert _pick(w, 1) == "avx2_wino4_s16"
    w[0, 0, 0, 0] += 1
    assert _pick(w, 1) == "avx2_wino_s16"


def test_output_bound_at_and_one_past() -> None:
    """``max sum|w| * span <= 2^25 - 1`` (``576 Y`` is formed modulo 2^32, which gives ``Y``
    modulo 2^26): with equal weights ``w = 1`` and span 255, ``C`` channels give
    ``9 * 255 * C``: 14620 fit, 14621 do not; the layer then gets F(2x2, 3x3)."""
    for channels, fits in ((14620, True), (14621, False)):
        w = np.ones((1, channels, 3, 3), np.int64)
        ok, text = winograd_bounds(layer_facts(w, 255), WINOGRAD_F4)
        y = 9 * 255 * channels
        assert ok == fits == (y <= 2**25 - 1)
        assert f"max sum|w|*span {y} <= 2^25-1 (576*Y formed modulo 2^32)" in text
        assert _pick(w, 255) == ("avx2_wino4_s16" if fits else "avx2_wino_s16")


def test_kernel_past_its_output_bound_is_wrong() -> None:
    """The output bound is real and tight: on a constant input of 327 and weights of 668 (every
    other bound at its edge), ``Y = 9 * 668 * 327 * C`` is recovered from ``576 Y`` modulo
    2^32 for 17 channels (33,421,788 <= 2^25 - 1) and not for 18 (35,387,964: it comes back
    ``2^26`` lower). The partial sums pass int32 for both."""
    for channels, exact in ((17, True), (18, False)):
        spec = ConvKernelSpec(1, channels, 6, 6, 1, (3, 3), (1, 1), (0, 0), (1, 1), "wino4", 1,
                              "int16", 0, 0, "int32", 0, 0)
        w = np.full((1, channels, 3, 3), 668, np.int64)
        y = 9 * 668 * 327 * channels
        got = run_kernel_alone(spec, np.full((1, channels, 6, 6), 327, np.int16), w)
        assert np.array_equal(got, np.full((1, 1, 4, 4), y if exact else y - 2**26))
        assert 576 * y > 2**31  # 576 Y itself wrapped: recovered from its low bits


#: (input channels, output rows and columns, packed in and out, variant before) -> variant after
SPEED_RULE = [
    (64, 8, False, "avx2_u8s8_p4", "avx2_wino4_s16"),
    (64, 7, False, "avx2_u8s8_p4", "avx2_u8s8_p4"),  # WINOGRAD4_MIN_OUT
    (63, 27, True, "avx2_u8s8_p4", "avx2_u8s8_p4"),  # neither 64 channels nor 28 rows
    (32, 28, True, "avx2_u8s8_p2", "avx2_wino4_s16"),  # WINOGRAD4_FULL_OUT
    (32, 28, False, "avx2_u8s8_p4", "avx2_wino4_s16"),  # ... NCHW in or out too
    (32, 14, True, "avx2_u8s8_p4", "avx2_u8s8_p4"),
    (64, 8, False, "avx2_u8s8_p1", "avx2_wino4_s16"),
    (64, 8, False, "avx2_px16", "avx2_px16"),  # not a channel-lane kernel
    (27, 56, True, "avx2_u8s8_p4", "avx2_u8s8_p4"),  # WINOGRAD_MIN_IN
]


@pytest.mark.parametrize(("channels", "out", "packed", "before", "after"), SPEED_RULE)
def test_speed_rule(channels: int, out: int, packed: bool, before: str, after: str) -> None:
    w = np.ones((8, channels, 3, 3), np.int64)
    assert _pick(w, 255, before, (out, out), packed) == after


#: (output channels, output width) -> (tiles, 8-channel blocks) in registers
TILES = [
    (64, 56, (2, 4)),  # 14 tiles a row: 2 x 4 pads none
    (64, 28, (1, 4)),  # 7 tiles: 1 x 4 (2 x 4 would compute 8)
    (128, 14, (2, 4)),
    (40, 56, (7, 1)),  # 5 blocks: one block, 7 tiles pad none of 14
    (48, 28, (1, 2)),  # 6 blocks: two, 7 tiles
    (16, 32, (4, 2)),
]


@pytest.mark.parametrize(("oc", "ow", "tiles"), TILES)
def test_register_tiles(oc: int, ow: int, tiles: tuple[int, int]) -> None:
    spec = ConvKernelSpec(1, 64, ow, ow, oc, (3, 3), (1, 1), (1, 1), (1, 1), "wino4", 1,
                          "uint8", 0, 0, "int32", 0, 0)
    assert wino.winograd_tiles(spec) == tiles


def test_kernel_past_its_activation_bound_is_wrong() -> None:
    """The activation bound is real: on the input block that puts ``68 * hi`` into ``V[1, 1]``
    (codes ``hi`` where ``B^T``'s row 1, ``(0, -4, -4, 1, 1, 0)``, gives products of one sign),
    the kernel built directly for 10-bit codes wraps its transformed inputs; at the selection's
    bound (span 327) it is exact."""
    spec = ConvKernelSpec(1, 1, 6, 6, 1, (3, 3), (1, 1), (0, 0), (1, 1), "wino4", 1, "int16", 0,
                          0, "int32", 0, 0)
    w = np.ones((1, 1, 3, 3), np.int64)
    mask = np.zeros((6, 6), np.int16)
    mask[1:3, 1:3] = mask[3:5, 3:5] = 1
    for hi, exact in ((327, True), (1023, False)):
        x = (mask * hi)[None, None]
        want = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64),
                                          torch.tensor(w, dtype=torch.float64)).numpy()
        assert np.array_equal(run_kernel_alone(spec, x, w), want.astype(np.int64)) == exact


def test_schemes_check_their_identity() -> None:
    """A scheme whose integer transforms do not give ``divisor`` x the convolution is refused
    on construction (here F(4, 3) with 24 in place of 576), as are shapes of no F(m, 3)."""
    with pytest.raises(ValueError, match="do not give 24 x the direct convolution"):
        dataclasses.replace(WINOGRAD_F4, divisor=24)
    with pytest.raises(ValueError, match="are not F"):
        WinogradScheme("bad", WINOGRAD_F4.b_t, WINOGRAD_F4.g[:4], WINOGRAD_F4.a_t, 576)


def test_transforms_compute_four_by_four_outputs() -> None:
    """``A^T [(G g G^T) . (B^T d B)] A = 576 x`` the 4x4 outputs of a 6x6 block, and ``G``
    scaled back (rows by 1/4, 1/6, 1/6, 1/24, 1/24, 1) is the textbook one."""
    g_std = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
    scale = np.array([4, 6, 6, 24, 24, 1])
    assert np.allclose(np.array(WINOGRAD_F4.g) / scale[:, None], g_std)
    gen = np.random.default_rng(1)
    g = gen.integers(-8, 8, (3, 3))
    d = gen.integers(0, 256, (6, 6))
    b_t, a_t = np.array(WINOGRAD_F4.b_t), np.array(WINOGRAD_F4.a_t)
    u = WINOGRAD_F4.weight_transform(g.reshape(1, 1, 3, 3))[:, :, 0, 0]
    y = a_t @ (u * (b_t @ d @ b_t.T)) @ a_t.T
    direct = np.array([[(d[i:i + 3, j:j + 3] * g).sum() for j in range(4)] for i in range(4)])
    assert np.array_equal(y, 576 * direct)
