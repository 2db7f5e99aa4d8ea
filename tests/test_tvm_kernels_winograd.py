"""The Winograd F(2x2, 3x3) kernel for W8A8 and wider layers on AVX2 (``avx2_wino_s16``, issue
15): bit-exact against the reference executor on pruned odd channel counts, odd output sizes,
batch 1 and 32, padding 0-2, signed and 13-bit activations, NCHW and packed layouts; each of its
three bounds at the bound and one past (where the selection keeps ``avx2_s16``); W7A8 layers
(``avx2_u8s8_p1`` by the bound) take it too, P = 1 for channel padding does not; the kernel
itself wrong past its activation bound; chosen exactly where the selection's rule says."""

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
    WINOGRAD_F2,
    KernelChoice,
    LayerFacts,
    winograd,
    winograd_bounds,
)
from tests.test_tvm_kernels import AVX2, check, int_layer  # noqa: E402
from tests.test_tvm_layout import add, conv  # noqa: E402


def _variants(records: list) -> list[str]:
    return [r.variant for r in records]


#: (c_in, c_out, padding, batch, x_bits, signed, w_bits, hw, variant)
CASES = [
    (29, 19, 1, 1, 8, False, 8, (9, 10), "avx2_wino_s16"),  # W8A8, odd channels and sizes
    (29, 19, 1, 32, 8, True, 8, (7, 5), "avx2_wino_s16"),  # signed activations, batch 32
    (37, 3, 0, 2, 8, False, 8, (6, 7), "avx2_wino_s16"),  # no padding, 4x5 output
    (32, 24, 2, 1, 8, False, 8, (6, 6), "avx2_wino_s16"),  # padding 2 (8x8 output)
    (37, 40, 1, 1, 10, False, 4, (11, 9), "avx2_wino_s16"),  # 10-bit activations
    (29, 9, 1, 1, 13, False, 6, (5, 6), "avx2_wino_s16"),  # span 8191: 4 * span = 32764
    (29, 9, 1, 1, 14, False, 6, (5, 6), "avx2_s16"),  # span 16383: |V| past int16
    (29, 19, 1, 1, 8, False, 8, (3, 9), "avx2_s16"),  # a 3-row output (WINOGRAD_MIN_OUT)
    (27, 19, 1, 1, 8, False, 8, (9, 10), "avx2_s16"),  # 27 channels (WINOGRAD_MIN_IN)
    (29, 19, 1, 1, 8, False, 7, (9, 10), "avx2_wino_s16"),  # W7A8: P = 2's bound fails
    (29, 19, 1, 1, 8, False, 6, (9, 10), "avx2_u8s8_p2"),  # W6A8: P = 2 kept
    (4, 19, 1, 1, 8, False, 4, (9, 10), "avx2_u8s8_p1"),  # P = 1 for padding, not the bound
]


@pytest.mark.parametrize(("c_in", "c_out", "padding", "batch", "x_bits", "signed", "w_bits",
                          "hw", "variant"), CASES)
def test_winograd_conv_exact(c_in: int, c_out: int, padding: int, batch: int, x_bits: int,
                             signed: bool, w_bits: int, hw: tuple[int, int],
                             variant: str) -> None:
    layer = int_layer("conv", c_in, c_out, x_bits=x_bits, x_signed=signed, w_bits=w_bits,
                      padding=padding, seed=c_in * 7 + c_out)
    _, records = check(layer, (batch, c_in) + hw, x_bits, signed)
    assert _variants(records) == [variant]


def test_winograd_float_output_and_acc_shift() -> None:
    """The int32 accumulator (a float-output layer) with ``acc_shift``, through the same kernel."""
    layer = int_layer("conv", 31, 13, x_bits=8, w_bits=8, out_scale=None, acc_shift=2)
    _, records = check(layer, (2, 31, 8, 7), 8)
    assert _variants(records) == ["avx2_wino_s16"]


@pytest.mark.parametrize("stride, dilation, k", [(2, 1, 3), (1, 2, 3), (1, 1, 1), (1, 1, 5)])
def test_other_geometries_keep_the_int16_kernel(stride: int, dilation: int, k: int) -> None:
    """Stride 2, dilation 2, 1x1 and 5x5 W8A8 convs keep ``avx2_s16`` (bit-exact)."""
    layer = int_layer("conv", 29, 11, x_bits=8, w_bits=8, k=k, stride=stride,
                      padding=dilation * (k // 2), dilation=dilation, seed=k + stride)
    _, records = check(layer, (1, 29, 12, 11), 8)
    assert _variants(records) == ["avx2_s16"]


class W8A8Block(torch.nn.Module):
    """A W8A8 3-channel stem (``avx2_s16``: too few channels for Winograd), two W8A8 3x3 convs
    around a residual add (29 channels: a padded block), 8-bit codes between them: packed
    ``NCHW8c`` values between the kernels and the add on AVX2."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.a = conv(3, 29, 0.02, 0.05, w_bits=8, seed=31)
        self.relu = im.IntClip(0, 255)
        self.b = conv(29, 29, 0.05, 0.05, w_bits=8, seed=32)
        self.add = add(0.05, 0.05, 0.05)
        self.c = conv(29, 5, 0.05, 0.05, w_bits=8, seed=33)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.a(self.quant(x)))
        return self.c(self.add(a, self.b(a)))


@pytest.mark.parametrize(("batch", "hw"), [(1, (12, 10)), (32, (9, 7))])
def test_winograd_packed_between_layers(batch: int, hw: tuple[int, int]) -> None:
    """Winograd kernels reading and writing ``NCHW8c`` mid-network, bit-exact; the report
    gives the Winograd bound of each such layer."""
    from djpq_compiler.backends.tvm.kernels.report import kernel_table
    from tests.test_tvm_layout import assert_exact

    ctx = assert_exact(W8A8Block(), (batch, 3) + hw, AVX2)
    got = {r.layer: (r.variant, r.in_layout, r.out_layout)
           for r in ctx.kernels}  # type: ignore[attr-defined]
    assert got == {"a": ("avx2_s16", "NCHW", "NCHW8c"),
                   "b": ("avx2_wino_s16", "NCHW8c", "NCHW8c"),
                   "c": ("avx2_wino_s16", "NCHW8c", "NCHW")}
    table = kernel_table(ctx.kernels)  # type: ignore[attr-defined]
    assert table.count("Winograd F(2x2,3x3): |V| <= 4*255 = 1020 <= 32767") == 2


class DepthwiseThenDense(torch.nn.Module):
    """A 4-bit depthwise conv of ``channels`` (``avx512_dw16`` writes ``NCHW16c`` on AVX-512)
    into a ``w_bits`` 3x3 conv to ``out`` channels."""

    def __init__(self, channels: int, out: int, w_bits: int, seed: int) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.dw = conv(channels, channels, 0.02, 0.05, groups=channels, seed=seed)
        self.b = conv(channels, out, 0.05, 0.05, w_bits=w_bits, seed=seed + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.dw(self.quant(x)))


def test_winograd_reads_sixteen_lane_layout() -> None:
    """An AVX-512 target without VNNI (``skylake-avx512``: ``NCHW16c`` between layers): the
    Winograd kernel reads 16-lane blocks (its packed store is 8 lanes: it writes NCHW there),
    bit-exact."""
    from tests.test_tvm_layout import assert_exact

    ctx = assert_exact(DepthwiseThenDense(29, 21, 8, 41), (2, 29, 9, 10),
                       {"kind": "llvm", "mcpu": "skylake-avx512"})
    got = {r.layer: (r.variant, r.in_layout, r.out_layout)
           for r in ctx.kernels}  # type: ignore[attr-defined]
    assert got["b"] == ("avx2_wino_s16", "NCHW16c", "NCHW")


# ------------------------------------------------------------------------- bounds, as data

AVX2_FEATURES = frozenset({"avx2"})


def layer_facts(weight: np.ndarray, span: int, packed: bool = False) -> LayerFacts:
    """The facts of a conv with ``weight``, codes in ``[0, span]``, on AVX2."""
    oc = weight.shape[0]
    return LayerFacts("conv", "conv2d", 0, span, weight, np.zeros(oc, np.int64), 0, 1,
                      int(weight.size) * 16, AVX2_FEATURES, "llvm -mcpu=haswell", packed)


def lanes_choice(facts: LayerFacts, variant: str = "avx2_s16") -> KernelChoice:
    """The channel-lane kernel ``variant`` the selection chose before Winograd."""
    return KernelChoice(facts.layer, "conv2d", variant, "2*... <= 32767; acc bound 1", "lanes",
                        facts.macs)


def _pick(weight: np.ndarray, span: int) -> str:
    facts = layer_facts(weight, span)
    return winograd(lanes_choice(facts), facts, (1, 1), (1, 1), (8, 8)).variant


def test_activation_bound_at_and_one_past() -> None:
    """``4 * span <= 32767``: span 8191 is the last that fits."""
    w = np.ones((2, 28, 3, 3), np.int64)
    assert _pick(w, 8191) == "avx2_wino_s16"
    assert _pick(w, 8192) == "avx2_s16"


def test_weight_transform_bound_at_and_one_past() -> None:
    """``|U| <= 32767``: the centre of ``(2G) g (2G)^T`` is the sum of all nine weights, so nine
    weights of 3640 give 32760 and one of them at 3647 gives 32767; 3648 one past (the other
    27 input channels zero)."""
    w = np.zeros((1, 28, 3, 3), np.int64)
    w[0, 0] = 3640
    w[0, 0, 1, 1] = 3647
    assert int(np.abs(WINOGRAD_F2.weight_transform(w)).max()) == INT16_MAX
    assert _pick(w, 1) == "avx2_wino_s16"
    w[0, 0, 1, 1] = 3648
    assert _pick(w, 1) == "avx2_s16"


def test_output_bound_at_and_one_past() -> None:
    """``max sum|w| * span <= 2^29 - 1`` (``4 Y`` is formed modulo 2^32, which gives ``Y``
    modulo 2^30): this 3x3 pattern (times 63) has ``sum|w|`` 882, so with span 255 ``C``
    channels reach ``882 * 255 * C``: 2387 fit, 2388 do not."""
    pattern = np.array([[-1, 2, 1], [2, 2, -2], [1, -2, -1]], np.int64) * 63
    for channels, fits in ((2387, True), (2388, False)):
        w = np.broadcast_to(pattern, (1, channels, 3, 3)).copy()
        ok, text = winograd_bounds(layer_facts(w, 255))
        y = 882 * 255 * channels
        assert ok == fits == (y <= 2**29 - 1)
        assert f"max sum|w|*span {y} <= 2^29-1 (4*Y formed modulo 2^32)" in text


def run_kernel_alone(spec: ConvKernelSpec, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The Winograd kernel of ``spec`` (an int32 output) built alone and run on ``x``."""
    tvm = pytest.importorskip("tvm")
    lib = tvm.compile(tvm.IRModule({"main": wino.build_winograd_kernel(spec)}),
                      target=tvm.target.Target(AVX2))
    size = wino.padded_channels(spec)
    args = [x, wino.pack_winograd_weight(w, spec), np.zeros(size, np.int32)]
    args += [np.zeros(size, np.int64)] * 3 + [np.zeros(size, np.int32)] * 2
    args.append(np.zeros((1, 1) + spec.out_size, np.int32))
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def test_kernel_past_its_activation_bound_is_wrong() -> None:
    """The activation bound is real: the kernel built directly for 14-bit codes (``4 * 16383``
    passes int16) wraps its transformed inputs on a constant input (``V[1, 1]`` is the sum of
    the block's four centre codes); 13-bit codes are exact."""
    spec = ConvKernelSpec(1, 1, 6, 6, 1, (3, 3), (1, 1), (0, 0), (1, 1), "wino", 1, "int16", 0,
                          0, "int32", 0, 0)
    w = np.array([[[[1, 0, 1], [0, 1, 0], [1, 0, 1]]]], np.int64)
    for hi, exact in ((8191, True), (16383, False)):
        x = np.full((1, 1, 6, 6), hi, np.int16)
        want = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64),
                                          torch.tensor(w, dtype=torch.float64)).numpy()
        assert np.array_equal(run_kernel_alone(spec, x, w), want.astype(np.int64)) == exact


def test_kernel_refuses_what_it_does_not_compute() -> None:
    spec = ConvKernelSpec(1, 4, 6, 6, 8, (3, 3), (2, 2), (1, 1), (1, 1), "wino", 1, "uint8", 0,
                          0, "int32", 0, 0)
    with pytest.raises(ValueError, match="3x3 stride-1 undilated"):
        wino.build_winograd_kernel(spec)
    with pytest.raises(ValueError, match="writes NCHW or NCHW8c"):
        wino.build_winograd_kernel(dataclasses.replace(spec, stride=(1, 1), out_lanes=16))


def test_transform_matches_the_textbook() -> None:
    """``U = 4 G g G^T`` with F(2, 3)'s ``G``, and the three transforms compute the 2x2 outputs
    of a 4x4 input block exactly (the identity the kernel relies on)."""
    gen = np.random.default_rng(0)
    g = gen.integers(-128, 128, (3, 3))
    d = gen.integers(0, 256, (4, 4))
    g_std = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    u = WINOGRAD_F2.weight_transform(g.reshape(1, 1, 3, 3))[:, :, 0, 0]
    assert np.array_equal(u, np.rint(4 * g_std @ g @ g_std.T).astype(np.int64))
    b_t, a_t = np.array(WINOGRAD_F2.b_t), np.array(WINOGRAD_F2.a_t)
    v = b_t @ d @ b_t.T
    y4 = a_t @ (u * v) @ a_t.T
    direct = np.array([[(d[i:i + 3, j:j + 3] * g).sum() for j in range(2)] for i in range(2)])
    assert np.array_equal(y4, 4 * direct)
