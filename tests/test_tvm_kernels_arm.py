"""The aarch64 ``neon_sdot`` conv kernel: selection at its bound and one bit past it, bit-exact
under qemu-aarch64 (batch 1 and 2, odd pruned channel counts, strided and 1x1 convs, a linear),
and ``sdot`` in the disassembly of the exported library's conv kernels.

The selection tests are pure Python; the others skip, naming what is missing, without qemu-user,
the aarch64 cross toolchain (gcc/g++/binutils) or the aarch64 TVM runtime wheels.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from djpq_compiler.ir import modules as im

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
from test_tvm_kernels import One, inputs, int_layer  # noqa: E402

from djpq_compiler.backends.tvm import aarch64_runner  # noqa: E402
from djpq_compiler.backends.tvm.build import target_spec  # noqa: E402
from djpq_compiler.backends.tvm.kernels.emit import target_features  # noqa: E402
from djpq_compiler.backends.tvm.kernels.report import kernel_table  # noqa: E402
from djpq_compiler.backends.tvm.kernels.select import LayerFacts, select_kernel  # noqa: E402

ARM = target_spec("aarch64")[0]
ARM_FEATURES = target_features(ARM)
OBJDUMP = "aarch64-linux-gnu-objdump"


def _facts(lo: int, hi: int, w_lo: int, w_hi: int, *, groups: int = 1, shape: tuple = (8, 8),
           features: frozenset[str] | None = ARM_FEATURES, acc_shift: int = 0) -> LayerFacts:
    weight = np.zeros(shape, dtype=np.int64)
    weight.flat[0], weight.flat[1] = w_lo, w_hi
    return LayerFacts("l", "conv2d", lo, hi, weight, np.zeros(0, np.int64), acc_shift, groups,
                      1, features, "aarch64")


def test_default_aarch64_target_has_dotprod() -> None:
    assert ARM_FEATURES == frozenset({"dotprod"})
    plain = {k: v for k, v in ARM.items() if k != "mattr"}
    assert target_features(plain) == frozenset()
    choice = select_kernel(_facts(0, 255, -8, 7, features=target_features(plain)))
    assert choice.variant == "default" and "no AVX2 (nor aarch64 dotprod)" in choice.note


#: (activation codes lo..hi, weight lo..hi) -> variant, each bound next to one bit past it.
SELECT_LADDER = [
    ((0, 255), (-128, 127), "neon_sdot", -128),  # A8 unsigned x W8: offset -128
    ((-128, 127), (-128, 127), "neon_sdot", 0),  # A8 signed: no offset
    ((0, 127), (-8, 7), "neon_sdot", 0),  # 7-bit unsigned codes fit int8 as they are
    ((-4, 3), (-8, 7), "neon_sdot", 0),
    ((0, 511), (-8, 7), "default", None),  # A9: one bit past (codes span 512 values)
    ((-256, 255), (-8, 7), "default", None),
    ((0, 255), (-256, 255), "default", None),  # W9: one bit past
    ((0, 255), (-128, 128), "default", None),  # 128 does not fit int8
]


@pytest.mark.parametrize(("act", "wts", "variant", "offset"), SELECT_LADDER)
def test_sdot_selection_at_and_past_its_bound(act: tuple, wts: tuple, variant: str,
                                              offset: int | None) -> None:
    facts = _facts(*act, *wts)
    choice = select_kernel(facts)
    assert choice.variant == variant
    if offset is not None:
        assert facts.offset_for("sdot") == offset
        assert f"offset {offset}" in choice.note and "acc bound" in choice.bound
    else:
        assert "sdot needs" in choice.note


def test_sdot_selection_accumulator_and_depthwise_fall_back() -> None:
    big = _facts(0, 255, -128, 127, shape=(1, 2**17), acc_shift=0)
    big.weight[:] = -128
    assert select_kernel(big).variant == "default"
    assert "needs int64" in select_kernel(big).note
    dw = _facts(0, 255, -8, 7, groups=8, shape=(8, 1, 3, 3))
    choice = select_kernel(dw)
    assert choice.variant == "neon_dw8_acc16" and "<= 32767" in choice.bound  # 4-bit taps
    dw8 = _facts(0, 255, -128, 127, groups=8, shape=(8, 1, 3, 3))
    dw8.weight[:] = -128  # 9 taps * 128 * span 256: past int16 sums, int32 sums remain
    choice = select_kernel(dw8)
    assert choice.variant == "neon_dw8" and "<= 32767" in choice.bound
    wide = _facts(0, 2**15, -8, 7, groups=8, shape=(8, 1, 3, 3))  # one code past int16
    choice = select_kernel(wide)
    assert choice.variant == "default" and "too wide for int16" in choice.note
    grouped = _facts(0, 255, -8, 7, groups=2, shape=(16, 8, 3, 3))
    choice = select_kernel(grouped)
    assert choice.variant == "neon_sdot" and "2 groups" in choice.note


def check_arm(layer: nn.Module, shape: tuple[int, ...], x_bits: int, signed: bool,
              tmp_path: Path) -> tuple:
    """Build for aarch64, export a .so, run random and worst-case codes under qemu, compare
    with the integer reference bit for bit. Returns the kernel records and the library."""
    gm = im.trace_integer(One(layer, x_bits, signed).eval())
    xs = inputs(shape, x_bits, signed)
    model = tvm_backend.build(gm, "aarch64", example_inputs=(xs[0],))
    library = model.export(tmp_path / "layer.so")
    for x in xs:
        want = gm(x)
        (got,) = aarch64_runner.run_library(library, [x.numpy()]).outputs
        got_t = torch.from_numpy(np.ascontiguousarray(got)).to(want.dtype)
        assert got_t.shape == want.shape
        assert torch.equal(got_t, want), (got_t - want).abs().max()
    assert len(torch.unique(gm(xs[0]))) > 3  # the requantization does not clip everything
    return model.kernels, library


@pytest.mark.parametrize(("c_in", "c_out", "k", "stride", "padding", "batch", "hw"), [
    (13, 11, 3, 1, 1, 1, (9, 10)),  # odd pruned counts, 3x3
    (13, 11, 3, 1, 1, 2, (9, 10)),  # batch 2
    (21, 19, 3, 2, 1, 2, (11, 9)),  # strided
    (37, 5, 1, 1, 0, 1, (7, 13)),  # 1x1
    (3, 37, 1, 2, 0, 2, (8, 9)),  # 1x1 strided, 3 input channels
])
def test_sdot_conv_bit_exact_under_qemu(aarch64_qemu: None, tmp_path: Path, c_in: int, c_out: int,
                                        k: int, stride: int, padding: int, batch: int,
                                        hw: tuple) -> None:
    layer = int_layer("conv", c_in, c_out, x_bits=8, w_bits=8, k=k, stride=stride,
                      padding=padding, seed=c_in + batch)
    kernels, _ = check_arm(layer, (batch, c_in) + hw, 8, False, tmp_path)
    assert [c.variant for c in kernels] == ["neon_sdot"]


#: (activation bits, signed, weight bits) -> variant: the sdot bound (A8 x W8) and one bit past.
QEMU_LADDER = [
    (8, False, 8, "neon_sdot"),
    (8, True, 8, "neon_sdot"),
    (4, False, 4, "neon_sdot"),
    (9, False, 8, "default"),  # activations one bit past: TVM's default lowering, still exact
    (8, False, 9, "default"),  # weights one bit past
]


@pytest.mark.parametrize(("x_bits", "signed", "w_bits", "variant"), QEMU_LADDER)
def test_sdot_bound_bit_exact_under_qemu(aarch64_qemu: None, tmp_path: Path, x_bits: int,
                                         signed: bool, w_bits: int, variant: str) -> None:
    layer = int_layer("conv", 9, 7, x_bits=x_bits, w_bits=w_bits, x_signed=signed, seed=w_bits)
    kernels, _ = check_arm(layer, (2, 9, 6, 7), x_bits, signed, tmp_path)
    assert [c.variant for c in kernels] == [variant]
    if variant == "default":
        assert "sdot needs" in kernels[0].note


def test_sdot_linear_and_float_output_bit_exact_under_qemu(aarch64_qemu: None,
                                                           tmp_path: Path) -> None:
    layer = int_layer("linear", 23, 9, x_bits=8, w_bits=8, out_scale=None, acc_shift=1)
    kernels, _ = check_arm(layer, (2, 23), 8, False, tmp_path)
    assert [c.variant for c in kernels] == ["neon_sdot"]


def _function_bodies(disassembly: str) -> dict[str, str]:
    """``objdump -d`` text split into ``{symbol: body}``."""
    parts = re.split(r"^[0-9a-f]+ <([^>]+)>:\n", disassembly, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_disassembly_shows_sdot_in_conv_kernels(aarch64_qemu: None, tmp_path: Path) -> None:
    if shutil.which(OBJDUMP) is None:
        pytest.skip(f"{OBJDUMP} not installed (binutils-aarch64-linux-gnu)")
    layer = int_layer("conv", 13, 11, x_bits=8, w_bits=8, seed=3)
    kernels, library = check_arm(layer, (1, 13, 9, 10), 8, False, tmp_path)
    text = subprocess.run([OBJDUMP, "-d", str(library)], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    bodies = _function_bodies(text)
    conv = {name: body for name, body in bodies.items() if name.startswith("djpq_neon_sdot")}
    assert conv, sorted(bodies)[:20]
    for name, body in conv.items():
        assert re.search(r"\bsdot\s+v\d+\.4s", body), name
    report = kernel_table(kernels)
    assert "neon_sdot" in report and "100.0 % of MACs in written kernels" in report


def test_sdot_grouped_conv_bit_exact_under_qemu(aarch64_qemu: None, tmp_path: Path) -> None:
    """A grouped conv (groups of 8 -> 12 channels) runs in one sdot kernel whose batch is the
    images x groups, bit-exact under qemu."""
    layer = int_layer("conv", 16, 24, x_bits=8, w_bits=8, groups=2, stride=2, seed=5)
    kernels, _ = check_arm(layer, (2, 16, 9, 8), 8, False, tmp_path)
    assert [c.variant for c in kernels] == ["neon_sdot"] and "2 groups" in kernels[0].note


@pytest.mark.parametrize(("channels", "x_bits", "signed", "w_bits", "stride", "batch", "variant"), [
    (7, 8, False, 8, 1, 1, "neon_dw8"),  # odd pruned count, W8A8
    (13, 8, True, 8, 2, 2, "neon_dw8"),  # signed codes (offset), strided, batch 2
    (9, 15, False, 12, 1, 1, "neon_dw8"),  # the int16 bound: 15-bit codes
    (11, 8, False, 4, 1, 2, "neon_dw8_acc16"),  # W4A8: int16 tap sums
    (9, 16, False, 8, 1, 1, "default"),  # one bit past it
])
def test_depthwise_bit_exact_under_qemu(aarch64_qemu: None, tmp_path: Path, channels: int,
                                        x_bits: int, signed: bool, w_bits: int, stride: int,
                                        batch: int, variant: str) -> None:
    layer = int_layer("conv", channels, channels, x_bits=x_bits, w_bits=w_bits,
                      x_signed=signed, groups=channels, stride=stride, seed=channels)
    kernels, _ = check_arm(layer, (batch, channels, 8, 9), x_bits, signed, tmp_path)
    assert [c.variant for c in kernels] == [variant]
    if variant == "default":
        assert "too wide for int16" in kernels[0].note


def test_disassembly_shows_neon_multiply_accumulate_in_depthwise(aarch64_qemu: None,
                                                                 tmp_path: Path) -> None:
    if shutil.which(OBJDUMP) is None:
        pytest.skip(f"{OBJDUMP} not installed (binutils-aarch64-linux-gnu)")
    layer = int_layer("conv", 16, 16, x_bits=8, w_bits=8, groups=16, seed=7)
    kernels, library = check_arm(layer, (1, 16, 9, 10), 8, False, tmp_path)
    assert [c.variant for c in kernels] == ["neon_dw8"]
    text = subprocess.run([OBJDUMP, "-d", str(library)], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    dw = {name: body for name, body in _function_bodies(text).items()
          if name.startswith("djpq_neon_dw8")}
    assert dw
    for name, body in dw.items():  # int16 x int16 -> int32 lanes, 4 at a time
        assert re.search(r"\b(smlal2?|mla)\s+v\d+\.4s", body), name


def test_forcing_sdot_past_its_bound_is_wrong(aarch64_qemu: None, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound is needed: 9-bit codes forced through sdot wrap in int8 and give wrong codes."""
    import dataclasses

    from djpq_compiler.backends.tvm import converters

    def forced(facts: LayerFacts) -> object:
        return dataclasses.replace(select_kernel(facts), variant="neon_sdot")

    monkeypatch.setattr(converters, "select_kernel", forced)
    layer = int_layer("conv", 9, 7, x_bits=9, w_bits=8, seed=8)
    with pytest.raises(AssertionError, match=r"^tensor\(\d+\)"):  # the max code difference
        check_arm(layer, (1, 9, 6, 7), 9, False, tmp_path)


def test_depthwise_int32_requantization_under_qemu(aarch64_qemu: None, tmp_path: Path) -> None:
    """A W4A4 depthwise layer with 4-bit output codes takes the int32 requantization
    (``kernels/requant32.py``; the depthwise kind is shared with AVX2): bit-exact on aarch64
    too, and recorded as such."""
    layer = int_layer("conv", 11, 11, x_bits=4, w_bits=4, groups=11, seed=11, out_bits=4,
                      out_signed=False)
    kernels, _ = check_arm(layer, (2, 11, 8, 9), 4, False, tmp_path)
    assert [(c.variant, c.epilogue) for c in kernels] == [("neon_dw8_acc16",
                                                           "int32 requantization")]
