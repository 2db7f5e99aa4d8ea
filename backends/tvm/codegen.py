"""TVM-facing: ``tvm.compile`` for LLVM targets, in parallel parts and without redundant checks.

``tvm.compile`` hands every PrimFunc of a model to LLVM as one module: one thread optimizes it
(the ``tvm.compile`` time) and one thread turns it into machine code when the first VM is made
(the library load). For a large net (inception_v3: ~120 PrimFuncs) both are seconds each, and
about half of every PrimFunc's LLVM code is its packed-function wrapper checking each argument's
type, rank, shape, strides, dtype and device -- checks that can only fail for data from outside
the VM. :func:`compile_llvm` does what ``tvm.compile`` does (the same Relax pipeline, VM code
generation, default TIR pipeline and ``VMLink``), except that

* the PrimFuncs are compiled as several LLVM modules, in a thread pool (TVM releases the GIL),
  imported into one library; :func:`jit` turns them into machine code in parallel too. Each
  function's own code is the same as in one module (no PrimFunc calls another);
* TVM's TIR pass ``RemoveNoOp`` is skipped (:data:`SKIPPED_TIR_PASSES`): a third of the TIR
  pipeline's time, and the same machine code without it;
* only the PrimFuncs that can see the caller's tensors (an argument of a Relax function, or a
  view of one) keep TVM's argument checks; the others get ``tirx.disable_assert``. Their
  arguments are tensors the VM allocated itself for fixed shapes, so a check that held once holds
  for every call (the VM still checks each input's rank, dtype and shape at entry).

The result is an ordinary ``VMExecutable``: it runs, exports (``.so``/``.tar``) and cross-links
like the one ``tvm.compile`` returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from djpq_compiler.errors import BackendError

from .adapter import load_tvm

__all__ = ["BUILD_THREADS_ENV", "SKIPPED_TIR_PASSES", "build_threads", "checked_functions",
           "compile_llvm", "jit"]

#: Environment variable overriding :func:`build_threads` (a positive integer).
BUILD_THREADS_ENV = "DJPQ_TVM_BUILD_THREADS"
#: At most this many threads by default (LLVM modules gain nothing past the core count).
MAX_BUILD_THREADS = 8
#: The symbol prefix of a PrimFunc's packed wrapper in a TVM 0.27 LLVM module.
_FFI_PREFIX = "__tvm_ffi_"
_DISABLE_ASSERT = "tirx.disable_assert"
#: TIR passes of TVM's default pipeline that :func:`compile_llvm` skips: ``RemoveNoOp`` costs
#: about a third of the TIR pipeline on the written kernels' unrolled bodies (it simplifies
#: every statement to prove it a no-op) and changes nothing LLVM does not remove itself: the
#: machine code is instruction for instruction the same (``tests/test_tvm_codegen.py``,
#: ``benchmarks/latency/FIRST_CALL.md``).
SKIPPED_TIR_PASSES = ("tirx.RemoveNoOp",)


def build_threads() -> int:
    """Threads for compiling and loading: ``$DJPQ_TVM_BUILD_THREADS``, else the usable cores
    (at most :data:`MAX_BUILD_THREADS`).

    Raises:
        BackendError: The environment variable is not a positive integer.
    """
    value = os.environ.get(BUILD_THREADS_ENV)
    if value is not None:
        if not value.strip().isdigit() or int(value) < 1:
            raise BackendError(f"{BUILD_THREADS_ENV}={value!r}: expected a positive integer "
                               "(the threads that compile and load a TVM build)")
        return int(value)
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all cores
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_BUILD_THREADS))


@dataclass(frozen=True)
class _Part:
    """PrimFuncs compiled as one LLVM module; ``checked``: with TVM's argument checks."""

    funcs: dict[Any, Any]
    checked: bool


def checked_functions(mod: Any) -> set[str]:
    """Names of the PrimFuncs of a VM-lowered module that can receive a caller's tensor.

    Taint analysis over every Relax function (after ``relax.get_pipeline("default")``, calls are
    in destination-passing style): its parameters are tainted, and so is the result of any
    binding that reads a tainted value and is not a direct PrimFunc call (a reshape view, a tuple,
    a builtin). Every PrimFunc referenced by a binding that reads a tainted value is returned.
    """
    tvm = load_tvm()
    relax = tvm.relax
    prims = {gvar.name_hint for gvar, func in mod.functions.items()
             if isinstance(func, tvm.tirx.PrimFunc)}
    checked: set[str] = set()
    for _, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        tainted = {param for param in func.params}
        for binding in _bindings(func.body):
            if not any(var in tainted for var in relax.analysis.free_vars(binding.value)):
                continue
            called = {g.name_hint for g in relax.analysis.all_global_vars(binding.value)}
            checked |= called & prims
            value = binding.value
            direct = isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar) \
                and value.op.name_hint in prims
            if not direct:
                tainted.add(binding.var)
    return checked


def _bindings(body: Any) -> list[Any]:
    """The bindings of a Relax function body, in order (a non-``SeqExpr`` body has none)."""
    blocks = getattr(body, "blocks", ())
    return [binding for block in blocks for binding in block.bindings]


def _parts(funcs: dict[Any, Any], checked: set[str], count: int) -> list[_Part]:
    """The checked PrimFuncs in one part, the others round-robin into ``count`` parts."""
    keep = {g: f for g, f in funcs.items() if g.name_hint in checked}
    rest = [(g, f) for g, f in funcs.items() if g.name_hint not in checked]
    parts = [_Part(keep, True)] if keep else []
    count = max(1, min(count, len(rest)))
    parts += [_Part(dict(rest[i::count]), False) for i in range(count) if rest[i::count]]
    return parts


def _map(fn: Callable[[Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def compile_llvm(mod: Any, target: Any, relax_pipeline: Any = None,
                 threads: int | None = None) -> Any:
    """``tvm.compile(mod, target)`` for an ``llvm`` target (x86, aarch64), see the module doc.

    Args:
        mod: A Relax IRModule (PrimFuncs scheduled or not).
        target: A ``tvm.target.Target`` of kind ``llvm``.
        relax_pipeline: A Relax pass to run instead of ``relax.get_pipeline("default")``.
        threads: Compile threads (default :func:`build_threads`).

    Returns:
        The ``VMExecutable``.
    """
    tvm = load_tvm()
    relax = tvm.relax
    from tvm.relax import vm_build  # tvm.compile's own steps (TVM is pinned, adapter.py)

    if str(target.kind.name) != "llvm":
        raise BackendError(f"compile_llvm needs an llvm target, got {target.kind.name!r}")
    pipeline = relax_pipeline if relax_pipeline is not None else relax.get_pipeline("default")
    with target:
        lowered = pipeline(mod)
    attrs = dict(lowered.attrs) if lowered.attrs else {}
    if attrs.get("external_mods"):  # BYOC libraries: leave the linking to tvm.compile
        return tvm.compile(mod, target=target, relax_pipeline=pipeline)
    checked = checked_functions(lowered)
    builder = relax.ExecBuilder()
    leftover = vm_build._vmcodegen(builder, lowered, "bytecode")
    funcs = {g: f for g, f in leftover.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    threads = build_threads() if threads is None else max(1, threads)
    parts = _parts(funcs, checked, 2 * threads if threads > 1 else 1)
    context = tvm.transform.PassContext.current()
    config = dict(context.config)

    def build(part: _Part) -> Any:
        # PassContext is per thread: each worker enters the caller's, plus the checks setting
        options = {**config, _DISABLE_ASSERT: bool(config.get(_DISABLE_ASSERT)) or not part.checked}
        with tvm.transform.PassContext(opt_level=context.opt_level, config=options,
                                       required_pass=list(context.required_pass),
                                       disabled_pass=[*context.disabled_pass,
                                                      *SKIPPED_TIR_PASSES]):
            part_mod = tvm.IRModule(part.funcs, attrs=leftover.attrs)
            part_mod = vm_build._auto_attach_system_lib_prefix(part_mod, target, None)
            return tvm.tirx.build(part_mod, target=target)

    libs = _map(build, parts, threads)
    lib: Any = libs[0] if libs else None
    for other in libs[1:]:
        lib.import_module(other)
    params = dict(attrs.get("const_name_to_constant", {}))
    return vm_build.VMExecutable(relax._ffi_api.VMLink(builder, target, lib, [], params))


def _llvm_modules(module: Any) -> list[Any]:
    found, stack = [], [module]
    while stack:
        current = stack.pop()
        if current.kind == "llvm":
            found.append(current)
        stack.extend(current.imports)
    return found


def _jit_one(module: Any) -> None:
    """Make an LLVM module generate its machine code (it does on its first function lookup)."""
    names = [str(n) for n in module.get_function("get_func_names")()]
    name = next((n[len(_FFI_PREFIX):] for n in names if n.startswith(_FFI_PREFIX)), None)
    if name is not None:
        module.get_function(name)


def jit(executable: Any, threads: int | None = None) -> None:
    """Generate the machine code of every LLVM module of a host executable, in parallel.

    Without this the VM does it module by module when it is created; the code is the same.
    """
    threads = build_threads() if threads is None else max(1, threads)
    modules = _llvm_modules(executable.mod)
    if threads > 1 and len(modules) > 1:
        _map(_jit_one, modules, threads)
