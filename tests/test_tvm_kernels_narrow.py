"""The pixels-in-lanes kernels for narrow layers (``avx2_px16`` and AVX-512 VNNI's
``avx512_px16``, issue 15): bit-exact against the reference executor on pruned odd channel
counts, batch 1 and 32, 3x3 and 1x1, NCHW and packed layouts, at the AVX2 kernel's int16 bound
and one past it (where the selection keeps a channel-lane variant), W8A8 on VNNI (no int16
sums), and chosen exactly where the selection's rule says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from djpq_compiler.ir import modules as im

pytest.importorskip("tvm")
narrow = pytest.importorskip("djpq_compiler.backends.tvm.kernels.conv2d_narrow")
from djpq_compiler.backends.tvm.kernels.conv2d import ConvKernelSpec  # noqa: E402
from djpq_compiler.backends.tvm.kernels.select import (  # noqa: E402
    LayerFacts,
    narrow_pixels,
    select_kernel,
)
from tests.test_tvm_kernels import (  # noqa: E402
    AVX2,
    VNNI,
    One,
    check,
    compile_for,
    inputs,
    int_layer,
    needs_vnni,
)
from tests.test_tvm_layout import add, conv  # noqa: E402


def _variants(records: list) -> list[str]:
    return [r.variant for r in records]


#: (c_in, c_out, k, padding, stride, batch, x_bits, signed, w_bits, hw, variant)
CASES = [
    (13, 9, 3, 1, 1, 32, 4, False, 4, (28, 28), "avx2_px16"),  # resnet20's first stage
    (9, 13, 3, 1, 1, 1, 4, False, 4, (28, 28), "avx2_px16"),
    (13, 7, 3, 1, 1, 32, 5, False, 4, (9, 11), "avx2_px16"),  # work ratio 1.105
    (7, 5, 3, 1, 1, 1, 8, False, 3, (6, 7), "avx2_px16"),
    (11, 5, 1, 0, 1, 32, 4, False, 4, (5, 9), "avx2_px16"),  # 1x1
    (5, 11, 3, 0, 1, 1, 6, True, 4, (7, 8), "avx2_px16"),  # signed activations, no padding
    (13, 5, 3, 1, 2, 32, 4, False, 4, (9, 11), "avx2_u8s8_p4"),  # stride 2: channel lanes
    (1, 3, 5, 2, 1, 2, 8, False, 3, (7, 19), "avx2_px16"),  # a 1-channel stem (not im2col)
]


def test_narrow_conv_dilated_exact() -> None:
    """Dilation 2 (taps 2 rows / 2 columns apart in the flattened rows), 5 -> 7 channels."""
    layer = int_layer("conv", 5, 7, x_bits=4, w_bits=4, padding=2, dilation=2, seed=9)
    _, records = check(layer, (2, 5, 11, 17), 4)
    assert _variants(records) == ["avx2_px16"]


@pytest.mark.parametrize(("c_in", "c_out", "k", "padding", "stride", "batch", "x_bits", "signed",
                          "w_bits", "hw", "variant"), CASES)
def test_narrow_conv_exact(c_in: int, c_out: int, k: int, padding: int, stride: int, batch: int,
                           x_bits: int, signed: bool, w_bits: int, hw: tuple[int, int],
                           variant: str) -> None:
    layer = int_layer("conv", c_in, c_out, x_bits=x_bits, x_signed=signed, w_bits=w_bits, k=k,
                      padding=padding, stride=stride, seed=c_in * 31 + c_out)
    _, records = check(layer, (batch, c_in) + hw, x_bits, signed)
    assert _variants(records) == [variant]


def test_narrow_conv_float_output_and_acc_shift() -> None:
    """The int32 accumulator (a float-output layer) with ``acc_shift``, through the same kernel."""
    layer = int_layer("conv", 7, 5, x_bits=4, w_bits=4, out_scale=None, acc_shift=2)
    _, records = check(layer, (2, 7, 6, 9), 4)
    assert _variants(records) == ["avx2_px16"]


def _bound_layer(row_sum: int, x_bits: int = 8) -> torch.nn.Module:
    """A 5 -> 3 3x3 layer whose first output channel's weights are non-negative and sum to
    ``row_sum`` (the others smaller): ``span * row_sum`` is the int16 bound's left side."""
    layer = int_layer("conv", 5, 3, x_bits=x_bits, w_bits=5, seed=3)
    current = layer.weight
    assert isinstance(current, torch.Tensor)
    weight = torch.zeros(3, 5, 3, 3, dtype=current.dtype)
    flat = weight.view(3, -1)
    per, rest = divmod(row_sum, 45)
    flat[0] = per
    flat[0, :rest] += 1
    gen = torch.Generator().manual_seed(5)
    flat[1:] = torch.randint(-2, 3, (2, 45), generator=gen)
    current.copy_(weight)
    return layer


@pytest.mark.parametrize(("row_sum", "variant"), [(128, "avx2_px16"), (129, "avx2_u8s8_p2")])
def test_narrow_bound_and_one_past(row_sum: int, variant: str) -> None:
    """``255 * 128 = 32640 <= 32767``: pixels in lanes; ``255 * 129 = 32895``: the selection
    keeps the channel-lane kernel (its own bound ``2*P*255*max|w|`` holds); both bit-exact on
    random and all-255 codes."""
    layer = _bound_layer(row_sum)
    gm = im.trace_integer(One(layer, 8, False).eval())
    xs = inputs((32, 5, 7, 9), 8, False)
    run, records = compile_for(gm, xs[0], AVX2)
    assert _variants(records) == [variant]
    for x in xs:
        assert torch.equal(run(x), gm(x))


def test_narrow_kernel_past_its_bound_is_wrong() -> None:
    """The bound is real: the kernel built directly for all-255 codes and weights summing to
    129 per output (``255 * 129 > 32767``) wraps its int16 sums; at 128 it is exact."""
    tvm = pytest.importorskip("tvm")
    spec = ConvKernelSpec(1, 5, 4, 4, 3, (3, 3), (1, 1), (0, 0), (1, 1), "px16", 1, "uint8", 0, 0,
                          "int32", 0, 0)
    lib = tvm.compile(tvm.IRModule({"main": narrow.build_narrow_kernel(spec)}),
                      target=tvm.target.Target(AVX2))
    size = narrow.padded_channels(spec)
    for row_sum, exact in ((128, True), (129, False)):
        w = np.zeros((3, 5, 3, 3), np.int64)
        per, rest = divmod(row_sum, 45)
        w.reshape(3, -1)[:] = per
        w.reshape(3, -1)[:, :rest] += 1
        args = [np.full((1, 5, 4, 4), 255, np.uint8), narrow.pack_narrow_weight(w, spec),
                np.zeros(size, np.int32), np.zeros(size, np.int64), np.zeros(size, np.int64),
                np.zeros(size, np.int64), np.zeros(size, np.int32), np.zeros(size, np.int32),
                np.zeros((1, 3, 2, 2), np.int32)]  # m, rnd, shift, lo, hi: unread (int32 out)
        tensors = [tvm.runtime.tensor(a) for a in args]
        lib["main"](*tensors)
        assert np.array_equal(tensors[-1].numpy(), np.full((1, 3, 2, 2), 255 * row_sum)) == exact


@pytest.mark.parametrize("change", [{"kind": "ubsw"}, {"stride": (2, 2)}, {"groups": 2},
                                    {"im2col": True}])
def test_narrow_kernel_refuses_a_spec_it_does_not_compute(change: dict) -> None:
    """A spec of another kind, stride, group count or an im2col reduction is refused by name
    before any TIR is built (the kernel assumes stride 1, one group, channel groups)."""
    spec = ConvKernelSpec(1, 5, 4, 4, 3, (3, 3), (1, 1), (1, 1), (1, 1), "px16", 1, "uint8", 0, 0,
                          "uint8", 0, 255)
    bad = dataclasses.replace(spec, **change)
    with pytest.raises(ValueError, match="pixels-in-lanes kernel computes kinds"):
        narrow.build_narrow_kernel(bad)


def _facts(shape: tuple[int, ...], span: int = 15, w: int = 7,
           features: frozenset[str] = frozenset({"avx2"})) -> LayerFacts:
    weight = np.full(shape, w)
    return LayerFacts("l", "conv2d", 0, span, weight, np.zeros(shape[0], np.int64), 0, 1, 0,
                      features, "llvm")


def pick(shape: tuple[int, ...], stride: tuple[int, int] = (1, 1), **kw: object) -> str:
    """The variant a layer of OIHW ``shape`` gets (``_facts``' weights and span), same padding,
    28 output columns: ``select_kernel`` then ``narrow_pixels``."""
    facts = _facts(shape, **kw)  # type: ignore[arg-type]
    choice = select_kernel(facts)
    pad = (shape[2] // 2, shape[3] // 2)
    return narrow_pixels(choice, facts, stride, pad, 28).variant


def test_narrow_selection_rule() -> None:
    """Pure selection: narrow where the channel lanes pad most and on stems; stride 2, wide
    layers, VNNI targets and a bound one past keep their variant."""
    assert pick((9, 13, 3, 3)) == "avx2_px16"  # 13 -> 9: 16 x 16 products per tap for 13 x 9
    assert pick((13, 9, 3, 3)) == "avx2_px16"
    assert pick((9, 13, 3, 3), stride=(2, 2)) == "avx2_u8s8_p4"
    assert pick((32, 31, 3, 3)) == "avx2_u8s8_p4"  # whole blocks: nothing to gain
    assert pick((95, 24, 1, 1)) == "avx2_u8s8_p4"  # 24 -> 95: wide output (NARROW_MAX_OUT)
    assert pick((13, 7, 3, 3)) == "avx2_u8s8_p2"  # 7 -> 13: work ratio 1.07 < 1.1
    assert pick((13, 1, 3, 3)) == "avx2_px16"  # a stem: whenever exact (its im2col pack)
    assert pick((13, 1, 3, 3), span=255, w=15) == "avx2_u8s8_p1"  # 255 * 135 > 32767
    assert pick((9, 13, 3, 3), features=frozenset({"avx2", "avx512bw"})) == "avx2_px16"
    # 117 weights of 7 on span 39: 39 * 819 = 31941 fits; span 41: 33579 does not
    assert pick((9, 13, 3, 3), span=39) == "avx2_px16"
    assert pick((9, 13, 3, 3), span=41).startswith("avx2_u8s8_p")


def test_narrow_choice_records_why_it_was_preferred() -> None:
    """The padded-work comparison travels as ``KernelChoice.preferred`` (not parsed back from the
    note) and the kernel table prints it after the bound; a channel-lane choice has none."""
    from djpq_compiler.backends.tvm.kernels.report import kernel_table

    def choose(shape: tuple[int, ...]) -> object:
        facts = _facts(shape)
        return narrow_pixels(select_kernel(facts), facts, (1, 1), (1, 1), 28)

    narrow_choice, stem_choice, wide = choose((9, 13, 3, 3)), choose((13, 1, 3, 3)), \
        choose((32, 31, 3, 3))
    # 13 -> 9 in 16-channel blocks: 16 x 16 x 9 products per pixel; pixel lanes pad rows only
    assert narrow_choice.preferred == "2304 products per pixel in channel lanes vs 1215"
    assert stem_choice.preferred.startswith("a stem: the channel-lane kernel's im2col pack")
    assert (wide.variant, wide.preferred) == ("avx2_u8s8_p4", "")
    lines = kernel_table([narrow_choice, wide]).splitlines()
    assert lines[1].endswith(f"{narrow_choice.bound} [{narrow_choice.preferred}]")
    assert lines[2].endswith(wide.bound)


class NarrowBlock(torch.nn.Module):
    """resnet20's first-stage block, pruned, 4-bit activations: stem 1 -> 13, 13 -> 9 -> 13
    narrow convs, the residual add, a last conv (packed ``NCHW8c`` values between all of them
    on AVX2)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.stem = conv(1, 13, 0.02, 0.05, out_bits=4, seed=20)
        self.a = conv(13, 9, 0.05, 0.05, x_bits=4, out_bits=4, seed=21)
        self.relu = im.IntClip(0, 15)
        self.b = conv(9, 13, 0.05, 0.05, x_bits=4, out_bits=4, seed=22)
        self.add = add(0.05, 0.05, 0.05)
        self.out = conv(13, 3, 0.05, 0.05, x_bits=8, seed=23)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(self.quant(x))
        return self.out(self.add(s, self.b(self.relu(self.a(s)))))


@pytest.mark.parametrize(("batch", "hw"), [(1, (12, 10)), (32, (12, 10)), (1, (9, 18)),
                                         (32, (20, 28))])
def test_narrow_packed_between_layers(batch: int, hw: tuple[int, int]) -> None:
    """Narrow convs reading and writing the packed layout mid-network, bit-exact: rows under
    16 pixels (scalar pack and store) and of 18 and 28 (the shuffled 16-pixel loads and stores,
    the last one overlapping)."""
    from tests.test_tvm_layout import assert_exact

    ctx = assert_exact(NarrowBlock(), (batch, 1) + hw, AVX2)
    got = {r.layer: (r.variant, r.in_layout, r.out_layout)
           for r in ctx.kernels}  # type: ignore[attr-defined]
    assert got == {"stem": ("avx2_px16", "NCHW", "NCHW8c"),
                   "a": ("avx2_px16", "NCHW8c", "NCHW8c"),
                   "b": ("avx2_px16", "NCHW8c", "NCHW8c"),
                   "out": ("avx2_u8s8_p4", "NCHW8c", "NCHW")}
    from djpq_compiler.backends.tvm.kernels.report import kernel_table

    table = kernel_table(ctx.kernels)  # type: ignore[attr-defined]
    # the report gives each narrow layer's int16 bound and why it beat the channel lanes
    assert table.count("<= 32767 (int16 pair and partial sums)") == 3
    assert "products per pixel in channel lanes vs" in table and "a stem:" in table


def test_narrow_on_sixteen_lane_layout() -> None:
    """An AVX-512 target without VNNI (``skylake-avx512``: 16-lane ``NCHW16c`` layouts, AVX2's
    ``vpmaddubsw`` kernels) takes ``avx2_px16`` with its scalar pack and store: bit-exact."""
    from tests.test_tvm_layout import assert_exact

    ctx = assert_exact(NarrowBlock(), (2, 1, 9, 18), {"kind": "llvm", "mcpu": "skylake-avx512"})
    got = {r.layer: (r.variant, r.in_layout) for r in ctx.kernels}  # type: ignore[attr-defined]
    assert got["a"] == ("avx2_px16", "NCHW16c") and got["b"] == ("avx2_px16", "NCHW16c")


#: VNNI: (c_in, c_out, k, padding, batch, x_bits, signed, w_bits, hw, variant, weight lanes)
VNNI_CASES = [
    (13, 9, 3, 1, 32, 4, False, 4, (28, 28), "avx512_px16", 16),  # 9 x 2 vectors per tile
    (9, 13, 3, 1, 1, 4, False, 4, (28, 28), "avx512_px16", 1),  # 13 x 1: weights broadcast
    (13, 7, 3, 1, 2, 8, False, 8, (9, 11), "avx512_px16", 16),  # W8A8: past any int16 bound
    (11, 5, 1, 0, 32, 4, False, 4, (5, 9), "avx512_px16", 16),  # 1x1
    (6, 13, 3, 1, 1, 8, True, 8, (9, 20), "avx512_px16", 1),  # signed W8A8
    (14, 16, 3, 1, 1, 4, False, 4, (8, 20), "avx512_vnni", 0),  # 16 outputs: lanes all used
    (1, 13, 3, 1, 2, 8, False, 4, (9, 9), "avx512_vnni", 0),  # a stem keeps its im2col kernel
]


@needs_vnni
@pytest.mark.parametrize(("c_in", "c_out", "k", "padding", "batch", "x_bits", "signed", "w_bits",
                          "hw", "variant", "lanes"), VNNI_CASES)
def test_vnni_narrow_conv_exact(c_in: int, c_out: int, k: int, padding: int, batch: int,
                                x_bits: int, signed: bool, w_bits: int, hw: tuple[int, int],
                                variant: str, lanes: int) -> None:
    """``avx512_px16`` where the 16 channel lanes pad most of the work, bit-exact (the
    accumulator bound alone: W8A8 with the worst-case weights of ``int_layer`` included), its
    weights whole vectors or broadcast as the tile says; wide layers and stems keep VNNI's
    channel lanes."""
    layer = int_layer("conv", c_in, c_out, x_bits=x_bits, x_signed=signed, w_bits=w_bits, k=k,
                      padding=padding, seed=c_in * 17 + c_out)
    _, records = check(layer, (batch, c_in) + hw, x_bits, signed, VNNI)
    assert _variants(records) == [variant]
    if lanes:
        spec = ConvKernelSpec(batch, c_in, *hw, c_out, (k, k), (1, 1), (padding, padding),
                              (1, 1), "px16v", 1, "uint8", 0, 0, "uint8", 0, 255)
        assert narrow.weight_lanes(spec) == lanes
        assert narrow.pack_narrow_weight(np.ones((c_out, c_in, k, k), np.int64), spec).size == (
            narrow.padded_channels(spec) * -(-c_in // 4) * 4 * k * k * lanes)


@needs_vnni
def test_vnni_narrow_float_output_acc_shift_and_dilation() -> None:
    """The int32 accumulator of a float-output layer with ``acc_shift``, and dilation 2."""
    layer = int_layer("conv", 7, 5, x_bits=4, w_bits=4, out_scale=None, acc_shift=2)
    _, records = check(layer, (2, 7, 6, 9), 4, False, VNNI)
    assert _variants(records) == ["avx512_px16"]
    layer = int_layer("conv", 5, 7, x_bits=4, w_bits=4, padding=2, dilation=2, seed=9)
    _, records = check(layer, (2, 5, 11, 17), 4, False, VNNI)
    assert _variants(records) == ["avx512_px16"]


def test_vnni_narrow_selection_rule() -> None:
    """Pure selection on a VNNI target: pixels in lanes where the 16 channel lanes pad at least
    1.1x the work, whatever the int16 bound (vpdpbusd sums in int32); not for AMX choices,
    stride 2, stems, 16 outputs, or a padding ratio under 1.1."""
    vnni = frozenset({"avx2", "avx512bw", "avx512vnni"})
    # 16 x 16 per tap for 9 x 16: 1.66x the work
    assert pick((9, 13, 3, 3), features=vnni) == "avx512_px16"
    # 16 x 12 for 13 x 12 (and the row ends): 1.15x
    assert pick((13, 9, 3, 3), features=vnni) == "avx512_px16"
    assert pick((13, 7, 3, 3), features=vnni) == "avx512_px16"
    # W8A8: no int16 sums
    assert pick((9, 13, 3, 3), span=255, w=127, features=vnni) == "avx512_px16"
    assert pick((16, 16, 3, 3), features=vnni) == "avx512_vnni"  # 16 lanes all used: 0.93
    assert pick((9, 13, 3, 3), stride=(2, 2), features=vnni) == "avx512_vnni"
    # a stem: its im2col kernel reduces 12, not 36
    assert pick((13, 1, 3, 3), features=vnni) == "avx512_vnni"
    amx = frozenset(vnni | {"amx-int8"})
    facts = _facts((9, 13, 3, 3), features=amx)
    choice = dataclasses.replace(select_kernel(facts), variant="amx_int8")
    assert narrow_pixels(choice, facts, (1, 1), (1, 1), 28).variant == "amx_int8"


@needs_vnni
@pytest.mark.parametrize(("batch", "hw"), [(1, (12, 10)), (32, (20, 28))])
def test_vnni_narrow_packed_between_layers(batch: int, hw: tuple[int, int]) -> None:
    """resnet20's pruned block on VNNI: its narrow convs read and write ``NCHW16c`` through the
    256-byte shuffled pack and store (rows of 28) and the scalar ones (rows of 10), bit-exact;
    the report gives the int32 bound and the padded-work comparison."""
    from tests.test_tvm_layout import assert_exact

    ctx = assert_exact(NarrowBlock(), (batch, 1) + hw, VNNI)
    got = {r.layer: (r.variant, r.in_layout, r.out_layout)
           for r in ctx.kernels}  # type: ignore[attr-defined]
    # 9 -> 13: 16 / 13 lanes against rows of W + 2 over W: 1.03 at 10 columns, 1.15 at 28
    b = "avx512_px16" if hw[1] == 28 else "avx512_vnni"
    assert got == {"stem": ("avx512_vnni", "NCHW", "NCHW16c"),
                   "a": ("avx512_px16", "NCHW16c", "NCHW16c"),
                   "b": (b, "NCHW16c", "NCHW16c"),
                   "out": ("avx512_px16", "NCHW16c", "NCHW")}
    from djpq_compiler.backends.tvm.kernels.report import kernel_table

    table = kernel_table(ctx.kernels)  # type: ignore[attr-defined]
    assert table.count("(vpdpbusd sums exactly in int32)") == 4  # the stem's bound reads alike
    narrow_layers = sum(v == "avx512_px16" for v, _, _ in got.values())
    assert table.count("products per pixel in channel lanes vs") == narrow_layers


class SignedNarrow(torch.nn.Module):
    """A stem writing signed 8-bit codes (an int8 ``NCHW16c`` value on VNNI) into a narrow
    13 -> 9 conv, then a 9 -> 3 one."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.stem = conv(1, 13, 0.02, 0.05, out_signed=True, seed=30)
        self.a = conv(13, 9, 0.05, 0.05, seed=31)
        self.out = conv(9, 3, 0.05, 0.05, seed=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(self.stem(self.quant(x))))


@needs_vnni
@pytest.mark.parametrize("hw", [(5, 20), (6, 9)])
def test_vnni_narrow_reads_signed_packed_codes(hw: tuple[int, int]) -> None:
    """int8 codes in ``NCHW16c``: the shuffled 16-pixel pack reinterprets 256 bytes as u8 before
    adding the offset (rows of 20), the scalar one converts per code (rows of 9); bit-exact."""
    from tests.test_tvm_layout import assert_exact

    ctx = assert_exact(SignedNarrow(), (2, 1) + hw, VNNI)
    got = {r.layer: (r.variant, r.in_layout) for r in ctx.kernels}  # type: ignore[attr-defined]
    assert got["a"] == ("avx512_px16", "NCHW16c")
