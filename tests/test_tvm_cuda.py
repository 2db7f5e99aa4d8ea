"""The CUDA ``cuda_dp4a`` conv/linear kernel: selection at its bound and one bit past it, the
arithmetic bit-exact on the CPU, ``dp4a`` in the PTX of the conv kernels.

No GPU is needed (nor used): the CPU check lowers the model for the CUDA target (so every layer
gets the kernel, weights and arguments the CUDA build gets) with each dp4a kernel scheduled as
for CUDA but emulated (``schedule_dp4a(emulate=True)``: block/thread loops serial, ``dp4a``
replaced by its definition) -- or not scheduled at all -- builds the module for ``llvm`` and
compares it bit for bit with the integer reference. What only a GPU would check (the thread
binding, ``__dp4a`` itself, CUDA code generation) is checked only by compiling it (nvcc, PTX);
the PTX test skips without nvcc.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from djpq_compiler.ir import modules as im

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
from test_tvm_kernels import One, inputs, int_layer  # noqa: E402

from djpq_compiler.backends.tvm import adapter  # noqa: E402
from djpq_compiler.backends.tvm.build import target_spec  # noqa: E402
from djpq_compiler.backends.tvm.emit import lower  # noqa: E402
from djpq_compiler.backends.tvm.kernels import cuda, emit  # noqa: E402
from djpq_compiler.backends.tvm.kernels.cuda_select import dp4a_arch  # noqa: E402
from djpq_compiler.backends.tvm.kernels.emit import target_features  # noqa: E402
from djpq_compiler.backends.tvm.kernels.select import LayerFacts, select_kernel  # noqa: E402
from djpq_compiler.errors import BackendError  # noqa: E402

CUDA = target_spec("cuda")[0]
FEATURES = target_features(CUDA)
SCHEDULE_DP4A = cuda.schedule_dp4a


def _facts(lo: int, hi: int, w_lo: int, w_hi: int, *, groups: int = 1,
           shape: tuple = (8, 8)) -> LayerFacts:
    weight = np.zeros(shape, dtype=np.int64)
    weight.flat[0], weight.flat[1] = w_lo, w_hi
    return LayerFacts("l", "conv2d", lo, hi, weight, np.zeros(0, np.int64), 0, groups, 1,
                      FEATURES, "cuda arch=sm_80")


def test_cuda_target_has_dp4a_from_sm_61() -> None:
    assert FEATURES == frozenset({"dp4a"})
    assert dp4a_arch("sm_61") and dp4a_arch("sm_90a") and not dp4a_arch("sm_60")
    assert target_features({**CUDA, "arch": "sm_52"}) == frozenset()


#: (activation codes lo..hi, weight lo..hi) -> variant, each bound next to one bit past it.
SELECT_LADDER = [
    ((0, 255), (-128, 127), "cuda_dp4a"),  # A8 unsigned x W8
    ((-128, 127), (-128, 127), "cuda_dp4a"),  # A8 signed: offset +128
    ((0, 15), (-8, 7), "cuda_dp4a"),
    ((0, 256), (-8, 7), "default"),  # one code past 8 bits
    ((-129, 127), (-8, 7), "default"),
    ((0, 255), (-129, 127), "default"),  # W9
    ((0, 255), (-128, 128), "default"),
]


@pytest.mark.parametrize(("act", "wts", "variant"), SELECT_LADDER)
def test_dp4a_selection_at_and_past_its_bound(act: tuple, wts: tuple, variant: str) -> None:
    choice = select_kernel(_facts(*act, *wts))
    assert choice.variant == variant
    if variant == "default":
        assert "dp4a needs" in choice.note
    else:
        assert "acc bound" in choice.bound and choice.kind == "dp4a"


def test_dp4a_selection_accumulator_depthwise_and_groups() -> None:
    big = _facts(0, 255, -128, 127, shape=(1, 2**17))
    big.weight[:] = -128
    assert select_kernel(big).variant == "default" and "needs int64" in select_kernel(big).note
    dw = select_kernel(_facts(0, 255, -8, 7, groups=8, shape=(8, 1, 3, 3)))
    assert dw.variant == "default" and "no CUDA depthwise kernel" in dw.note
    grouped = select_kernel(_facts(0, 255, -8, 7, groups=2, shape=(16, 8, 3, 3)))
    assert grouped.variant == "cuda_dp4a" and "2 groups" in grouped.note


def _emulated(monkeypatch: pytest.MonkeyPatch, scheduled: bool = True) -> None:
    """Make the dp4a kernels CPU-runnable: the CUDA schedule with serial loops and ``dp4a``'s
    definition (``emulate=True``), or no schedule at all (``scheduled=False``)."""
    monkeypatch.setattr(cuda, "schedule_dp4a",
                        (lambda func, spec, emulate=False: SCHEDULE_DP4A(func, spec, True))
                        if scheduled else (lambda func, spec, emulate=False: func))


def cpu_check(layer: nn.Module, shape: tuple[int, ...], x_bits: int, signed: bool,
              monkeypatch: pytest.MonkeyPatch, scheduled: bool = True) -> tuple:
    """Lower for CUDA with the dp4a kernels emulated (:func:`_emulated`), build for this CPU,
    compare every input of :func:`inputs` with the reference bit for bit. Returns the kernel
    records."""
    gm = im.trace_integer(One(layer, x_bits, signed).eval())
    xs = inputs(shape, x_bits, signed)
    emit._kernel.cache_clear()
    _emulated(monkeypatch, scheduled)
    try:
        mod, ctx = lower(gm, [xs[0]], CUDA)
    finally:
        emit._kernel.cache_clear()
    host = target_spec("x86")[0]
    vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(host)))
    for x in xs:
        got = torch.from_numpy(adapter.run_vm(vm, [x.numpy()])[0])
        want = gm(x)
        got = got.to(torch.int64) if ctx.output_kinds[0] == "int" else got
        assert got.shape == want.shape and torch.equal(got, want), (got - want).abs().max()
    assert len(torch.unique(gm(xs[0]))) > 3  # the requantization does not clip everything
    return tuple(ctx.kernels)


@pytest.mark.parametrize(("c_in", "c_out", "k", "stride", "padding", "batch", "hw"), [
    (13, 11, 3, 1, 1, 1, (9, 10)),  # odd pruned counts, 3x3
    (13, 11, 3, 1, 1, 2, (9, 10)),  # batch 2
    (21, 19, 3, 2, 1, 2, (11, 9)),  # strided
    (37, 5, 1, 1, 0, 1, (7, 13)),  # 1x1
])
def test_dp4a_conv_arithmetic_bit_exact_on_cpu(monkeypatch: pytest.MonkeyPatch, c_in: int,
                                               c_out: int, k: int, stride: int, padding: int,
                                               batch: int, hw: tuple) -> None:
    layer = int_layer("conv", c_in, c_out, x_bits=8, w_bits=8, k=k, stride=stride,
                      padding=padding, seed=c_in + batch)
    kernels = cpu_check(layer, (batch, c_in) + hw, 8, False, monkeypatch)
    assert [c.variant for c in kernels] == ["cuda_dp4a"]
    cpu_check(layer, (batch, c_in) + hw, 8, False, monkeypatch, scheduled=False)


@pytest.mark.parametrize(("x_bits", "signed", "w_bits", "variant"), [
    (8, True, 8, "cuda_dp4a"),  # signed activations: offset, corrected in the bias
    (4, False, 4, "cuda_dp4a"),
    (9, False, 8, "default"),  # one bit past: TVM's default lowering, still exact
    (8, False, 9, "default"),
])
def test_dp4a_bound_bit_exact_on_cpu(monkeypatch: pytest.MonkeyPatch, x_bits: int, signed: bool,
                                     w_bits: int, variant: str) -> None:
    layer = int_layer("conv", 9, 7, x_bits=x_bits, w_bits=w_bits, x_signed=signed, seed=w_bits)
    kernels = cpu_check(layer, (2, 9, 6, 7), x_bits, signed, monkeypatch)
    assert [c.variant for c in kernels] == [variant]


def test_dp4a_linear_grouped_and_float_output_bit_exact_on_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    linear = int_layer("linear", 23, 9, x_bits=8, w_bits=8, out_scale=None, acc_shift=1)
    assert [c.variant for c in cpu_check(linear, (2, 23), 8, False, monkeypatch)] \
        == ["cuda_dp4a"]
    grouped = int_layer("conv", 16, 24, x_bits=8, w_bits=8, groups=2, stride=2, seed=5)
    kernels = cpu_check(grouped, (2, 16, 9, 8), 8, False, monkeypatch)
    assert [c.variant for c in kernels] == ["cuda_dp4a"]
    assert "2 groups in one kernel" in kernels[0].note


@pytest.mark.parametrize(("c", "groups", "merged"), [
    (128, 32, "32 groups of 4 -> 4 channels merged 2 at a time into 16"),  # ResNeXt-like
    (96, 24, "24 groups of 4 -> 4 channels merged 2 at a time into 12"),
    (64, 4, None),  # 16 -> 16 per group: as they are
])
def test_dp4a_grouped_conv_in_one_kernel_bit_exact_on_cpu(
        monkeypatch: pytest.MonkeyPatch, c: int, groups: int, merged: str | None) -> None:
    """Every group of a grouped conv in one dp4a kernel over the images x groups batch
    (``ConvKernelSpec.conv_groups``; more than 16 groups too, narrow ones merged), emulated on
    the CPU: equal to the reference, on signed input codes."""
    layer = int_layer("conv", c, c, x_bits=8, w_bits=4, groups=groups, seed=groups)
    kernels = cpu_check(layer, (2, c, 7, 6), 8, True, monkeypatch)
    assert [k.variant for k in kernels] == ["cuda_dp4a"]
    assert "in one kernel" in kernels[0].note
    assert merged is None or merged in kernels[0].note


def _kernel_bodies(ptx: str) -> dict[str, str]:
    """``{entry name: body}`` of the PTX's ``.entry`` functions."""
    parts = re.split(r"^\.visible \.entry (\w+)\(", ptx, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize(("c_in", "c_out", "groups"), [(13, 11, 1), (128, 128, 32)])
def test_cuda_build_reports_dp4a_and_the_ptx_uses_it(c_in: int, c_out: int, groups: int) -> None:
    """A dense and a grouped conv (32 groups in one kernel) built for CUDA: the report names
    ``cuda_dp4a``, the source calls ``__dp4a`` and the PTX the conv kernel compiles to uses
    ``dp4a`` (where nvcc is installed)."""
    layer = int_layer("conv", c_in, c_out, x_bits=8, w_bits=8, groups=groups, seed=3)
    gm = im.trace_integer(One(layer, 8, False).eval())
    model = tvm_backend.build(gm, "cuda", example_inputs=inputs((1, c_in, 9, 10), 8, False)[0])
    assert [c.variant for c in model.kernels] == ["cuda_dp4a"]
    assert "cuda_dp4a" in model.kernel_report()
    source = model.cuda_source()
    assert "__dp4a(" in source
    try:
        tvm_backend.find_nvcc()
    except BackendError:
        pytest.skip("nvcc not installed: PTX not checked")
    ptx = tvm_backend.compile_cuda_to_ptx(source, arch="sm_80")
    conv = {name: body for name, body in _kernel_bodies(ptx).items()
            if name.startswith("djpq_cuda_dp4a") and re.search(r"\bld\.global\.\w+", body)}
    assert conv, sorted(_kernel_bodies(ptx))
    assert any(re.search(r"\bdp4a\.u32\.s32\b", body) for body in conv.values()), sorted(conv)


def test_cuda_emulated_build_of_a_mixed_net_bit_exact_on_cpu() -> None:
    """``build(..., "cuda-emulated")``: a net with a conv, depthwise and grouped convs, pools,
    add, concat and a linear, lowered as for CUDA (the same kernel records as the CUDA build),
    its dp4a kernels emulated, run on the CPU: equal to the reference. A CUDA build made after
    it gets the real ``__dp4a`` kernels (the emulated ones do not leak through the memo)."""
    from test_tvm_backend import BITS, Net, example

    gm = im.trace_integer(Net(BITS["mid"]).eval())
    x = (example((2, 3, 9, 9), seed=4), example((1, 2, 7, 7), signed=True))
    emulated = tvm_backend.build(gm, "cuda-emulated", example_inputs=x)
    real = tvm_backend.build(gm, "cuda", example_inputs=x)
    assert [(k.layer, k.variant) for k in emulated.kernels] \
        == [(k.layer, k.variant) for k in real.kernels]
    assert "cuda_dp4a" in {k.variant for k in emulated.kernels}
    for got, want in zip(emulated(*x), gm(*x), strict=True):
        assert torch.equal(got.to(want.dtype), want)
    assert "__dp4a(" in real.cuda_source()
    with pytest.raises(BackendError, match="cannot run on this"):
        real(*x)


def test_forcing_dp4a_past_its_bound_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU check can fail, and the bound is needed: 9-bit codes forced through the dp4a
    kernel wrap in u8 and give wrong codes."""
    import dataclasses

    from djpq_compiler.backends.tvm import converters

    def forced(facts: LayerFacts) -> object:
        return dataclasses.replace(select_kernel(facts), variant="cuda_dp4a")

    monkeypatch.setattr(converters, "select_kernel", forced)
    layer = int_layer("conv", 9, 7, x_bits=9, w_bits=8, seed=8)
    with pytest.raises(AssertionError, match=r"^tensor\(\d+\)"):  # the max |got - want|
        cpu_check(layer, (2, 9, 6, 7), 9, False, monkeypatch)
