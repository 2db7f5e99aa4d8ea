"""x86 conv kernels at batch 32 (issue 15): the split-shift requantization and the batch-outer
schedule are bit-exact, and each is used exactly where it applies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from djpq_compiler.ir import modules as im
from djpq_compiler.ir import requant_params

pytest.importorskip("tvm")
conv2d = pytest.importorskip("djpq_compiler.backends.tvm.kernels.conv2d")
from djpq_compiler.backends.tvm.emit import lower  # noqa: E402
from tests.test_tvm_kernels import AVX2, TARGETS, One, check, int_layer  # noqa: E402


def _with_shifts(layer: Any, ratio: float) -> Any:
    """``layer`` requantized with ``s_x * s_w / s_out`` scaled to ``ratio``: ratios of about 0.5
    and up give shifts below 32 (``requant_params``), small ones shifts of 32 and more."""
    fan_in = layer.weight[0].numel()
    bound = fan_in * 255 * 16 + 300
    out_scale = 0.02 * float(layer.w_scale.mean()) / ratio
    m, shift = requant_params(0.02, layer.w_scale, out_scale, bound)
    layer.m, layer.shift, layer.out_scale = m, shift, out_scale
    return layer


def test_split_shift_equals_the_int64_shift() -> None:
    """``int32(p >> 32) >> (s - 32) == p >> s`` on int64 products at their extremes, every
    ``s`` in [32, 62], as compiled for AVX2 (the identity ``conv2d._requantize`` relies on)."""
    tvm = pytest.importorskip("tvm")
    te = tvm.te
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.integers(-2**62, 2**62, 4000, dtype=np.int64),
                        np.array([-2**63, 2**63 - 1, -1, 0, 1, -2**32, 2**32 - 1], np.int64)])
    s = rng.integers(32, 63, p.size).astype(np.int64)
    spec = conv2d.ConvKernelSpec(1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), "ubsw", 1,
                                 "uint8", 0, 0, "int8", -128, 127, split_shift=True)
    prod = te.placeholder((p.size,), "int64", name="p")
    sh = te.placeholder((p.size,), "int32", name="s")
    out = te.compute((p.size,), lambda i: conv2d._requantize(spec, prod[i], sh[i]), name="q")
    sch = tvm.s_tir.Schedule(te.create_prim_func([prod, sh, out]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("q"))[0], [None, 8])
    sch.vectorize(inner)
    lib = tvm.compile(sch.mod, target=tvm.target.Target(AVX2))
    args = [tvm.runtime.tensor(a) for a in (p, (s - 32).astype(np.int32),
                                            np.zeros(p.size, np.int32))]
    lib["main"](*args)
    assert np.array_equal(args[-1].numpy(), p >> s)


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize(("ratio", "split"), [(0.01, True), (0.9, False)])
def test_requantization_shift_forms_exact(spec: dict, ratio: float, split: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Shifts all >= 32 take the split form, a layer with a shift < 32 the int64 one; both exact
    (odd channels, batch 32, dense 3x3 and depthwise). The int32 requantization
    (``test_requant32.py``), which these 4-bit layers would get, is switched off: this is the
    int64 form's test."""
    from djpq_compiler.backends.tvm.kernels import emit

    monkeypatch.setattr(emit, "INT32_REQUANT_KINDS", frozenset())
    dense = _with_shifts(int_layer("conv", 13, 9, x_bits=4, w_bits=3, seed=1), ratio)
    depthwise = _with_shifts(int_layer("conv", 11, 11, x_bits=4, w_bits=3, groups=11, seed=2),
                             ratio)
    cases: list[tuple[Any, tuple[int, ...]]] = [(dense, (32, 13, 6, 7)),
                                                (depthwise, (32, 11, 6, 7))]
    for layer, shape in cases:
        assert (int(layer.shift.min()) >= 32) == split
        check(layer, shape, 4, spec=spec)
        gm = im.trace_integer(One(layer, 4, False).eval())
        mod, _ = lower(gm, [torch.rand(shape)], spec)
        texts = [f.script() for gv, f in mod.functions.items()
                 if gv.name_hint.startswith("djpq_")]
        want = '"int32"' if split else '"int64"'
        assert texts and all(want in t.split("shift: T.Buffer", 1)[1].split(")", 1)[1][:10]
                             for t in texts)


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize(("c_in", "c_out", "signed", "batch", "hw"), [
    (13, 29, True, 32, (5, 9)), (13, 29, True, 1, (5, 9)), (19, 7, False, 32, (5, 9)),
    (4, 18, True, 2, (1, 1)),  # a squeeze-excite expand conv: one block, one pixel per image
])
def test_pointwise_with_pack_batch_outer_exact(spec: dict, c_in: int, c_out: int, signed: bool,
                                               batch: int, hw: tuple[int, int]) -> None:
    """1x1 convs on signed input (a pack stage: the +128 offset) at batch 32 run batch-outer
    (:func:`conv2d.batch_outer`), odd channel counts; bit-exact, batch 1 too; at 1x1 pixels
    with one channel block the pack under the image loop has only its lane loops left."""
    layer = int_layer("conv", c_in, c_out, x_bits=8, w_bits=4, x_signed=signed, k=1, padding=0,
                      seed=c_in)
    check(layer, (batch, c_in, *hw), 8, signed, spec)


def test_batch_outer_choice() -> None:
    """Batch-outer for depthwise and packed 1x1 kernels at batch >= 2 only (measured faster
    there, slower for 3x3 dense and pack-free 1x1 kernels)."""
    def spec(batch: int, k: int, kind: str, offset: int = 0, in_lanes: int = 8,
             groups: int = 1) -> Any:
        return conv2d.ConvKernelSpec(batch, 16, 8, 8, 16, (k, k), (1, 1), (k // 2, k // 2),
                                     (1, 1), kind, groups, "uint8", offset, 0, "uint8", 0, 255,
                                     in_lanes=in_lanes)
    assert conv2d.batch_outer(spec(32, 3, "dw8"))
    assert not conv2d.batch_outer(spec(1, 3, "dw8"))
    assert not conv2d.batch_outer(spec(32, 3, "ubsw", groups=4))
    assert conv2d.batch_outer(spec(32, 1, "ubsw", offset=128, groups=4), 8)
    assert not conv2d.batch_outer(spec(32, 1, "ubsw", groups=2), 8)  # reads directly


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize(("c_in", "c_out", "k", "stride", "padding", "dilation", "signed",
                          "w_bits", "batch"), [
    (1, 13, 3, 1, 1, 1, True, 7, 32),  # a grayscale stem: P = 1 (7-bit weights)
    (1, 16, 3, 1, 1, 1, False, 5, 1),  # P = 4
    (3, 9, 5, 2, 2, 1, False, 6, 2),  # RGB 5x5 stride 2, P = 2
    (4, 11, 3, 1, 2, 2, True, 4, 32),  # dilated, K = 36
])
def test_im2col_stem_exact(spec: dict, c_in: int, c_out: int, k: int, stride: int, padding: int,
                           dilation: int, signed: bool, w_bits: int, batch: int) -> None:
    """Dense convs on <= 4 input channels reduce over taps and channels jointly (im2col pack);
    bit-exact with odd widths, strides, padding, dilation, signed input (the offset in the
    padding), batch 1 and 32."""
    layer = int_layer("conv", c_in, c_out, x_bits=8, w_bits=w_bits, x_signed=signed, k=k,
                      stride=stride, padding=padding, dilation=dilation, seed=c_out)
    _, records = check(layer, (batch, c_in, 11, 13), 8, signed, spec)
    # on AVX2 a stride-1 stem whose int16 bound holds takes the pixels-in-lanes kernel
    # (select.narrow_pixels: the 1 -> 16 case); on VNNI the 4 -> 11 one, whose 16 channel
    # lanes over K = 36 do 1.11x the pixel lanes' work; the others keep the im2col kernel
    if spec is AVX2:
        expected = "avx2_px16" if (c_in, c_out) == (1, 16) else "avx2_u8s8"
    else:
        expected = "avx512_px16" if (c_in, c_out) == (4, 11) else "avx512_vnni"
    assert records[0].variant.startswith(expected)
    assert conv2d.im2col_pays(conv2d.ConvKernelSpec(
        batch, c_in, 11, 13, c_out, (k, k), (stride, stride), (padding, padding),
        (dilation, dilation), "ubsw", 1, "uint8", 0, 0, "uint8", 0, 255))


def test_im2col_only_for_few_channels() -> None:
    def spec(c_in: int, k: int, kind: str = "ubsw") -> Any:
        return conv2d.ConvKernelSpec(1, c_in, 8, 8, 8, (k, k), (1, 1), (0, 0), (1, 1), kind, 1,
                                     "uint8", 0, 0, "uint8", 0, 255)
    assert conv2d.im2col_pays(spec(3, 3)) and conv2d.im2col_pays(spec(4, 7))
    assert not conv2d.im2col_pays(spec(5, 3))
    assert not conv2d.im2col_pays(spec(1, 1))
    assert not conv2d.im2col_pays(spec(2, 3, "dw8"))


def test_selection_lowers_p_to_pad_less() -> None:
    """Spatial kernels take the largest P that pads their reduction to the fewest operands:
    7 channels per tap -> P = 2 (8, not 16); 13 -> P = 4 (16 either way); a 1-channel 3x3 stem
    reduces 9 operands jointly -> P = 1 (12, not 16); 1x1 kernels keep the bound's P."""
    from djpq_compiler.backends.tvm.kernels.select import LayerFacts, select_kernel

    def variant(shape: tuple[int, ...]) -> Any:
        facts = LayerFacts("l", "conv2d", 0, 31, np.full(shape, 7), np.zeros(shape[0]), 0, 1,
                           0, frozenset({"avx2"}), "llvm mcpu=haswell")
        return select_kernel(facts)
    seven = variant((13, 7, 3, 3))
    assert seven.variant == "avx2_u8s8_p2" and "lowered from 4" in seven.note
    assert "2*2*31*7" in seven.bound
    assert variant((9, 13, 3, 3)).variant == "avx2_u8s8_p4"
    assert variant((16, 1, 3, 3)).variant == "avx2_u8s8_p1"
    assert variant((16, 7, 1, 1)).variant == "avx2_u8s8_p4"


@pytest.mark.parametrize("batch", [1, 32])
def test_lowered_p_exact(batch: int) -> None:
    """resnet20's 7 -> 13 3x3 layer shape with P lowered to 2, on signed input (the offset in
    the padding), bit-exact at batch 1 and 32."""
    layer = int_layer("conv", 7, 13, x_bits=8, w_bits=5, x_signed=True, seed=3)
    _, records = check(layer, (batch, 7, 9, 11), 8, True, AVX2)
    assert records[0].variant == "avx2_u8s8_p2"


@pytest.mark.parametrize("spec", TARGETS)
@pytest.mark.parametrize("groups", [1, 12])
def test_bias_in_rounding_term_exact_with_extreme_bias(spec: dict, groups: int) -> None:
    """The x86 epilogue folds the bias into the rounding term (``bias * m + R``, int64): exact
    with biases near 2^30 (products near 2^61) beside small ones, dense and depthwise."""
    from tests.test_tvm_kernels import compile_for, inputs

    layer = int_layer("conv", 12, 12, x_bits=8, w_bits=4, groups=groups, seed=5)
    with torch.no_grad():
        layer.bias[::3] = 2**30
        layer.bias[1::3] = -(2**30) + 7
    gm = im.trace_integer(One(layer, 8, False).eval())
    xs = inputs((32, 12, 5, 6), 8, False)
    run, records = compile_for(gm, xs[0], spec)
    assert records[0].variant != "default"
    for x in xs:
        assert torch.equal(run(x), gm(x))
