"""``codegen.compile_llvm``: ``tvm.compile`` for LLVM targets in parallel parts, with TVM's
argument checks kept exactly where a caller's tensor arrives.

The built model equals ``tvm.compile``'s build output for output, whatever the number of parts;
the PrimFuncs that read a Relax function's parameters (or a view of one) keep their checks, so a
bad tensor from outside is still refused; the thread setting is validated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
from test_tvm_backend import BITS, Net, example, im  # noqa: E402

from djpq_compiler.backends.tvm import adapter, codegen  # noqa: E402
from djpq_compiler.backends.tvm.build import target_spec  # noqa: E402
from djpq_compiler.backends.tvm.emit import lower  # noqa: E402
from djpq_compiler.errors import BackendError  # noqa: E402


def _tiny() -> tuple[object, tuple[torch.Tensor, ...]]:
    gm = im.trace_integer(Net(BITS["low"]).eval())
    return gm, (example((2, 3, 9, 9)), example((1, 2, 7, 7), signed=True))


def _run(executable: object, arrays: list[np.ndarray]) -> list[np.ndarray]:
    return adapter.run_vm(adapter.make_vm(executable), arrays)


def test_parts_and_threads_give_the_tvm_compile_result() -> None:
    """One part or several (compiled on several threads, imported into one library): the same
    outputs as ``tvm.compile`` on the same module, equal to the integer reference."""
    tvm = adapter.load_tvm()
    gm, x = _tiny()
    spec, _ = target_spec("x86")
    target = adapter.make_target(spec)
    mod, _ = lower(gm, list(x), spec)
    mod = adapter.schedule_elementwise(adapter.fuse_module(mod, target), target)
    arrays = [t.numpy() for t in x]
    with target:
        want = _run(tvm.compile(mod, target=target), arrays)
    for threads in (1, 3):
        executable = codegen.compile_llvm(mod, target, threads=threads)
        modules = codegen._llvm_modules(executable.mod)
        assert len(modules) == (2 if threads == 1 else 1 + 2 * threads)  # checked part + rest
        got = _run(executable, arrays)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    reference = gm(*x)
    assert all(torch.equal(torch.from_numpy(a).to(r.dtype), r)
               for a, r in zip(want, reference, strict=True))


def test_functions_reading_a_parameter_or_a_view_of_one_keep_their_checks() -> None:
    """Taint analysis on the VM-lowered module: ``first`` reads a reshape (a view) of the
    parameter, ``second`` only a tensor the VM allocated."""
    tvm = adapter.load_tvm()
    from tvm.script import ir as I  # noqa: N812
    from tvm.script import relax as R  # noqa: N812
    from tvm.script import tirx as T

    @I.ir_module
    class Module:
        @T.prim_func(s_tir=True)
        def first(a: T.Buffer((2, 3), "int32"), b: T.Buffer((2, 3), "int32")) -> None:
            for i, j in T.grid(2, 3):
                with T.sblock("b"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    b[vi, vj] = a[vi, vj] + 1

        @T.prim_func(s_tir=True)
        def second(a: T.Buffer((2, 3), "int32"), b: T.Buffer((2, 3), "int32")) -> None:
            for i, j in T.grid(2, 3):
                with T.sblock("b"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    b[vi, vj] = a[vi, vj] * 2

        @R.function
        def main(x: R.Tensor((6,), "int32")) -> R.Tensor((2, 3), "int32"):
            cls = Module
            with R.dataflow():
                v = R.reshape(x, (2, 3))
                a = R.call_tir(cls.first, (v,), R.Tensor((2, 3), "int32"))
                b = R.call_tir(cls.second, (a,), R.Tensor((2, 3), "int32"))
                R.output(b)
            return b

    target = adapter.make_target({"kind": "llvm"})
    with target:
        lowered = tvm.relax.get_pipeline("default")(Module)
    assert codegen.checked_functions(lowered) == {"first"}
    executable = codegen.compile_llvm(Module, target, threads=2)
    (out,) = _run(executable, [np.arange(6, dtype="int32")])
    assert np.array_equal(out, (np.arange(6).reshape(2, 3) + 1) * 2)


def test_a_bad_tensor_from_the_caller_is_still_refused() -> None:
    """A caller's input with a byte offset reaches a PrimFunc whose checks were kept: TVM
    refuses it instead of reading the wrong bytes."""
    tvm = adapter.load_tvm()
    gm, x = _tiny()
    model = tvm_backend.build(gm, "x86", example_inputs=x)
    flat = np.zeros(x[0].numel() + 16, dtype="float32")
    flat[16:] = x[0].numpy().reshape(-1)
    shifted = tvm.runtime.tensor(flat)._create_view(tuple(x[0].shape), "float32",
                                                   relative_byte_offset=64)
    with pytest.raises(ValueError, match="byte_offset"):
        model._vm["main"](shifted, tvm.runtime.tensor(x[1].numpy()))


@pytest.mark.parametrize("value", ["0", "-2", "two", " "])
def test_bad_thread_setting_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(codegen.BUILD_THREADS_ENV, value)
    with pytest.raises(BackendError, match=codegen.BUILD_THREADS_ENV):
        codegen.build_threads()


def test_thread_setting_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(codegen.BUILD_THREADS_ENV, "3")
    assert codegen.build_threads() == 3
    monkeypatch.delenv(codegen.BUILD_THREADS_ENV)
    assert 1 <= codegen.build_threads() <= codegen.MAX_BUILD_THREADS


def test_intrinsics_register_one_at_a_time_with_the_same_description() -> None:
    """A kernel registers only the intrinsic it tensorizes with; what is registered is the
    description built by the module (structurally equal), and registering all names them all."""
    import subprocess
    import sys

    code = (
        "from djpq_compiler.backends.tvm import adapter\n"
        "from djpq_compiler.backends.tvm.kernels import intrin\n"
        "tvm = adapter.load_tvm()\n"
        "get = lambda n: tvm.s_tir.TensorIntrin.get(n, allow_missing=True)\n"
        "names = lambda: {n for n in intrin._builders() if get(n) is not None}\n"
        "assert names() == set(), names()\n"
        "intrin.register_intrinsics('vnni')\n"
        "assert names() == {'djpq_avx512_vnni'}, names()\n"
        "got = tvm.s_tir.TensorIntrin.get('djpq_avx512_vnni')\n"
        "desc, impl = intrin._vnni()\n"
        "tvm.ir.assert_structural_equal(got.desc, desc)\n"
        "tvm.ir.assert_structural_equal(got.impl, impl)\n"
        "intrin.register_intrinsics()\n"
        "assert len(names()) == 8, names()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_skipped_tir_passes_leave_the_machine_code_unchanged() -> None:
    """Every PrimFunc of a lowered model (written kernels, fused elementwise, TVM's default
    convs of the avg pools) compiles to the same instructions with and without
    ``SKIPPED_TIR_PASSES``."""
    tvm = adapter.load_tvm()
    from tvm.relax import vm_build

    gm, x = _tiny()
    spec, _ = target_spec("x86")
    target = adapter.make_target(spec)
    mod, ctx = lower(gm, list(x), spec)
    assert any(c.variant != "default" for c in ctx.kernels)  # a written kernel is among them
    mod = adapter.schedule_elementwise(adapter.fuse_module(mod, target), target)
    with target:
        lowered = tvm.relax.get_pipeline("default")(mod)
    leftover = vm_build._vmcodegen(tvm.relax.ExecBuilder(), lowered, "bytecode")
    funcs = {g: f for g, f in leftover.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(funcs) > 5

    def instructions(gvar: object, func: object, disabled: list[str]) -> list[str]:
        with tvm.transform.PassContext(opt_level=3, disabled_pass=disabled):
            lib = tvm.tirx.build(tvm.IRModule({gvar: func}, attrs=leftover.attrs), target=target)
        asm = lib.inspect_source("asm")
        return [ln for ln in asm.splitlines() if ln.startswith("\t") and not ln.startswith("\t.")]

    for gvar, func in funcs.items():
        assert instructions(gvar, func, []) == \
            instructions(gvar, func, list(codegen.SKIPPED_TIR_PASSES)), gvar.name_hint
