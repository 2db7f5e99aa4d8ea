"""The TVM build path a user meets first: the library is loaded at build time (the first call
does not JIT-compile the model), and TVM's runtime log noise does not reach the terminal while
real warnings and errors still do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
from djpq_compiler.backends.tvm import adapter  # noqa: E402

TESTS = Path(__file__).resolve().parent

#: Builds the tiny test net, calls it and exports it; ``RAW`` exports through TVM directly.
_BUILD_AND_EXPORT = """
import sys, torch
from test_tvm_backend import BITS, Net, example, im
from djpq_compiler.backends import tvm as tvm_backend
gm = im.trace_integer(Net(BITS["low"]).eval())
x = (example((2, 3, 9, 9)), example((1, 2, 7, 7), signed=True))
model = tvm_backend.build(gm, "x86", example_inputs=x)
assert all(torch.equal(a, b) for a, b in zip(model(*x), gm(*x)))
if sys.argv[2] == "raw":
    model.executable.export_library(sys.argv[1])
else:
    model.export(sys.argv[1])
"""


def _run(path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-c", _BUILD_AND_EXPORT, str(path), mode],
                          capture_output=True, text=True, env=env, cwd=TESTS, timeout=600,
                          check=False)


def test_build_and_export_print_no_scope_saving_lines(tmp_path: Path) -> None:
    """The fd-level stderr of a build + call + export holds none of TVM's Scope Saving lines,
    while exporting through TVM directly (the control) does print them."""
    raw = _run(tmp_path / "raw.so", "raw")
    assert raw.returncode == 0, raw.stderr[-2000:]
    assert "Scope Saving" in raw.stderr  # the noise exists: this test can fail
    ours = _run(tmp_path / "ours.so", "ours")
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert "Scope Saving" not in ours.stderr
    assert (tmp_path / "ours.so").stat().st_size > 0


#: A build refused inside a converter (cumsum with a dtype): the BackendError, and nothing from
#: TVM's C++ side on the way out.
_REFUSED = """
import gc, torch
from torch import nn
from djpq_compiler.ir import modules as im
from djpq_compiler.backends.tvm import build
from djpq_compiler.errors import BackendError
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.d = im.Quantize(0.1, 8, False), im.Dequantize(0.1)
    def forward(self, x):
        return torch.cumsum(self.d(self.q(x)), 3, dtype=torch.float64)
try:
    build(im.trace_integer(M()), "x86", example_inputs=torch.rand(1, 2, 3, 4))
except BackendError as exc:
    print("refused:", "dtype= or out=" in str(exc))
gc.collect()
"""


def test_a_refused_build_leaves_no_tvm_warning_behind() -> None:
    """The builder's open blocks are closed on the error path (``Builder.abandon``): no
    "BlockBuilder destroyed with remaining blocks!" line on the terminal after the error."""
    done = subprocess.run([sys.executable, "-c", _REFUSED], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "refused: True"
    assert "BlockBuilder destroyed" not in done.stderr


def test_quiet_tvm_log_keeps_real_messages(capfd: pytest.CaptureFixture[str]) -> None:
    """Only the listed noise is dropped; other fd-2 output comes back, in order."""
    with adapter.quiet_tvm_log():
        os.write(2, b"[12:00:00] executable.cc:276: Warning: Scope Saving: global\n")
        os.write(2, b"[12:00:00] module.cc:1: Error: something real\n")
        os.write(2, b"last line without newline")
    err = capfd.readouterr().err
    assert "Scope Saving" not in err
    assert err.index("something real") < err.index("last line without newline")


def test_quiet_tvm_log_restores_stderr_on_error(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.quiet_tvm_log():
            os.write(2, b"kept before the error\n")
            raise RuntimeError("boom")
    os.write(2, b"after the block\n")
    err = capfd.readouterr().err
    assert err.index("kept before the error") < err.index("after the block")


def test_x86_build_loads_the_library_at_build_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LLVM JIT and one warm-up call on zeros happen in build() (load_seconds), not on the
    first call; the first call is still bit-exact; a cross build does not load."""
    import importlib

    from test_tvm_backend import BITS, Net, example, im

    build_module = importlib.import_module("djpq_compiler.backends.tvm.build")

    gm = im.trace_integer(Net(BITS["mid"]).eval())
    x = (example((1, 3, 9, 9)), example((1, 2, 7, 7), signed=True))
    calls: list[list[tuple[int, ...]]] = []
    call_vm = build_module._call_vm

    def counting(vm: object, tensors: list) -> list:
        calls.append([tuple(t.shape) for t in tensors])
        return call_vm(vm, tensors)

    monkeypatch.setattr(build_module, "_call_vm", counting)
    model = tvm_backend.build(gm, "x86", example_inputs=x)
    monkeypatch.undo()
    # one warm-up call, at the input shapes, through the path the caller's calls take (DLPack)
    assert calls == [[(1, 3, 9, 9), (1, 2, 7, 7)]]
    assert model.load_seconds > 0
    assert model._vm is not None  # the VM the first call uses exists already
    got = model(*x)
    assert all(torch.equal(a, b) for a, b in zip(got, gm(*x), strict=True))
    cross = tvm_backend.build(gm, "aarch64", example_inputs=x)
    assert cross.load_seconds == 0.0 and cross._vm is None


def test_demo_tvm_stage_reports_the_kernel_per_layer(tmp_path: Path) -> None:
    """The demo's TVM stage is bit-exact, states the whole build time, and hands the report one
    kernel row per integer conv/linear layer when the build records kernels (none otherwise)."""
    from types import SimpleNamespace

    from tiny_models import Residual

    import djpq_compiler as djpq
    from djpq_compiler.workflows.demo_stages import backend_stages
    from djpq_compiler.workflows.report import KernelRow

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    converted = djpq.convert(djpq.prepare(Residual().eval(), x).eval())
    options = SimpleNamespace(tvm=True, onnx=False, latency_runs=1)
    fields, failures = backend_stages(options, converted, [x[:1], x], tmp_path)
    assert failures == [] and fields["tvm_bit_exact"] is True
    assert "build " in fields["tvm_note"]
    kernels = fields["tvm_kernels"]
    assert all(isinstance(k, KernelRow) for k in kernels)
    if hasattr(tvm_backend.CompiledModel, "kernels"):  # the build records kernels
        assert [k.layer for k in kernels] and len(kernels) == len(djpq.bops(converted).rows)
    else:
        assert kernels == []


def test_build_fuses_elementwise_chains_and_keeps_the_written_kernels() -> None:
    """Before ``tvm.compile`` the build fuses each chain of elementwise ops (requantization,
    clips, casts, the residual add) into one PrimFunc: a small residual net's Relax ``main`` has
    fewer ``call_tir`` bindings than after legalization alone, the written kernels' ``call_tir``
    PrimFuncs come through fusion and the CPU schedule unchanged, and the build stays bit-exact."""
    from tiny_models import Residual

    import djpq_compiler as djpq
    from djpq_compiler.backends.tvm.build import target_spec
    from djpq_compiler.backends.tvm.emit import lower

    tvm = adapter.load_tvm()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    converted = djpq.convert(djpq.prepare(Residual().eval(), x).eval())
    spec, _ = target_spec("x86")
    target = adapter.make_target(spec)
    mod, lowering = lower(converted, [x], spec)
    legalized = adapter.fuse_module(mod, target, passes=("LegalizeOps",))
    fused = adapter.fuse_module(mod, target)
    assert 0 < adapter.call_tir_count(fused) < adapter.call_tir_count(legalized)

    scheduled = adapter.schedule_elementwise(fused, target)
    kernels = {gv.name_hint: f for gv, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
               and int(f.attrs.get("op_pattern", -1)) == 8}
    written = [k for k in lowering.kernels if k.variant != "default"]
    chains = {n for n in kernels if n.startswith("fused_eltwise_")}  # kernels/eltwise.py
    convs = set(kernels) - chains
    # one PrimFunc per distinct kernel spec (same-shaped layers share one); none without AVX2
    assert bool(convs) == bool(written) and len(convs) <= len(written)
    assert chains and len(chains) <= len(lowering.eltwise)  # the residual tail is one
    for name, func in kernels.items():
        tvm.ir.assert_structural_equal(scheduled[name], func)

    model = tvm_backend.build(converted, "x86", example_inputs=(x,))
    assert torch.equal(model(x), converted(x))


def test_scheduled_elementwise_functions_index_their_buffers_contiguously() -> None:
    """The CPU schedule fuses an elementwise loop nest into one vectorized loop; the build then
    flattens and simplifies it, so no buffer index keeps the per-lane ``// 784 * 784`` arithmetic
    (which LLVM turns into byte gathers) and the function is marked opaque for Relax's fusion.
    A 13-channel 7x7 tensor makes the vector width divide no inner dimension."""
    tvm = adapter.load_tvm()
    from tvm.script import tirx as T

    shape = (2, 13, 7, 7)

    @T.prim_func(s_tir=True)
    def requant(a: T.Buffer(shape, "int32"), b: T.Buffer(shape, "uint8")) -> None:
        for i0, i1, i2, i3 in T.grid(*shape):
            with T.sblock("c"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                b[v0, v1, v2, v3] = T.Cast("uint8", T.max(T.min(
                    (T.Cast("int64", a[v0, v1, v2, v3]) * T.int64(1 << 30) + T.int64(1 << 29))
                    >> T.int64(30), T.int64(255)), T.int64(0)))

    target = adapter.make_target({"kind": "llvm", "mcpu": "skylake-avx512"})
    mod = adapter.schedule_elementwise(tvm.IRModule({"requant": requant}), target)
    func = mod["requant"]
    assert int(func.attrs["op_pattern"]) == 8
    text = func.script()
    assert ".view(" in text and "//" not in text and "%" not in text
    a = np.random.default_rng(0).integers(-2**31, 2**31 - 1, size=shape, dtype=np.int64)
    a = a.astype("int32")
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=adapter.make_target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(shape, "uint8"))
    lib["main"](tvm.runtime.tensor(a), out)
    expect = np.clip((a.astype(np.int64) * (1 << 30) + (1 << 29)) >> 30, 0, 255)
    assert np.array_equal(out.numpy(), expect.astype("uint8"))


def test_calls_cross_by_dlpack_safely() -> None:
    """``model(x)`` hands tensors to the VM by DLPack: an input at an unaligned address (a
    slice of a larger tensor) gives the same result as an aligned copy, results of two calls
    stay independent, and an output that is the input itself comes back as a copy."""
    from test_tvm_backend import BITS, Net, example, im

    from djpq_compiler.backends.tvm.build import ARG_ALIGNMENT

    gm = im.trace_integer(Net(BITS["mid"]).eval())
    x = (example((1, 3, 9, 9)), example((1, 2, 7, 7), signed=True))
    model = tvm_backend.build(gm, "x86", example_inputs=x)
    want = gm(*x)
    big = torch.cat([torch.zeros(1), x[0].reshape(-1)])
    unaligned = big[1:].view(1, 3, 9, 9)
    assert unaligned.data_ptr() % ARG_ALIGNMENT != 0 and torch.equal(unaligned, x[0])
    first = model(unaligned, x[1])
    assert all(torch.equal(a, b) for a, b in zip(first, want, strict=True))
    model(x[0] * 3, x[1] * 3)  # a second call must not change the first call's results
    assert all(torch.equal(a, b) for a, b in zip(first, want, strict=True))

    class Same(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t

    t = torch.rand(1, 2, 3, 4)
    echo = tvm_backend.build(im.trace_integer(Same()), "x86", example_inputs=t)
    out = echo(t)
    assert torch.equal(out, t) and out.data_ptr() != t.data_ptr()
