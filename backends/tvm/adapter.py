"""The one module that touches TVM: version pin, Relax building, targets, compile, run, export.

Every other file of the TVM backend goes through this adapter, so a TVM upgrade (0.27 renamed
``tvm.tir`` to ``tvm.tirx``, ``.struct_info`` to ``.ty``, ``tvm.nd.array`` to
``tvm.runtime.tensor``, ``imported_modules`` to ``imports``; REFERENCE.md §3) is a change here
only. ``import tvm`` is slow (~3 s) and imports torch, so it happens lazily, on first use.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from djpq_compiler.errors import BackendError, MissingExtraError

__all__ = [
    "TVM_LOG_NOISE",
    "TVM_VERSION",
    "Builder",
    "compile_module",
    "call_tir_count",
    "cuda_source",
    "export_library",
    "fuse_module",
    "load_tvm",
    "make_target",
    "make_vm",
    "quiet_tvm_log",
    "run_vm",
    "schedule_elementwise",
]

#: The TVM release this backend is written and tested against (pyproject's ``tvm`` extra).
TVM_VERSION = "0.27.0"

#: Lines of TVM's C++ runtime log that say nothing to a user of this backend and are dropped by
#: :func:`quiet_tvm_log`. ``Scope Saving``: TVM 0.27's ``VMExecutable`` logs one warning per
#: memory scope each time an executable is serialized (every ``export_library``). ``Fast mode
#: segfaults``: TOPI's ``take`` warns on every legalization of a ``take`` in its default mode;
#: every ``take`` this backend emits reads positions proven in range (a lookup table's index from
#: the checked code range, clipped on packed values; constant index tables; ``index_select``'s
#: checked positions).
TVM_LOG_NOISE: tuple[str, ...] = ("Warning: Scope Saving:",
                                  "Warning: Fast mode segfaults when there are out-of-bounds")

_STDERR_LOCK = threading.RLock()


@functools.cache
def load_tvm() -> Any:
    """Import TVM once and check its version.

    Returns:
        The ``tvm`` module.

    Raises:
        MissingExtraError: TVM is not installed (install the ``tvm`` extra).
        BackendError: The installed TVM is not the pinned release.
    """
    try:
        import tvm
        import tvm.relax  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            "the TVM backend needs Apache TVM, which is not installed: "
            "pip install 'djpq-compiler[tvm]'"
        ) from exc
    version = str(getattr(tvm, "__version__", "unknown"))
    if not version.startswith(TVM_VERSION):
        raise BackendError(
            f"the TVM backend is pinned to apache-tvm {TVM_VERSION}.x but {version} is installed; "
            "reinstall it with pip install 'djpq-compiler[tvm]'"
        )
    return tvm


def make_target(spec: dict[str, Any], host: dict[str, Any] | None = None) -> Any:
    """Return ``tvm.target.Target(spec, host)`` (targets are dicts in TVM 0.27)."""
    tvm = load_tvm()
    return tvm.target.Target(spec, host=host) if host is not None else tvm.target.Target(spec)


def system_cpu() -> str:
    """LLVM's name for this machine's CPU (``"mcpu": "native"`` would mean a generic CPU)."""
    return str(load_tvm().target.codegen.llvm_get_system_cpu())


class Builder:
    """A thin wrapper of ``relax.BlockBuilder`` with the ops the emitter needs.

    Each op method emits one binding into the current dataflow block and returns the new var.
    Shapes are static; :meth:`shape` and :meth:`dtype` read them back from the var's type.
    """

    def __init__(self) -> None:
        tvm = load_tvm()
        self._relax = tvm.relax
        self._op = tvm.relax.op
        self._bb = tvm.relax.BlockBuilder()
        #: Written kernels already in this module, by kernel spec: ``(name, PrimFunc)``.
        self.kernel_cache: dict[Any, tuple[str, Any]] = {}

    # -- function structure -------------------------------------------------------------------
    def var(self, name: str, shape: Sequence[int], dtype: str) -> Any:
        """A function parameter of static shape and dtype."""
        return self._relax.Var(name, self._relax.TensorType(tuple(shape), dtype))

    def function(self, name: str, params: list[Any]) -> Any:
        """Context manager opening function ``name`` with ``params``."""
        return self._bb.function(name, params)

    def dataflow(self) -> Any:
        """Context manager opening a dataflow block."""
        return self._bb.dataflow()

    def abandon(self) -> None:
        """Close what an exception left open inside :meth:`function` (the binding block TVM
        begins after a dataflow block, and the function's variable scope), so that the builder's
        destructor does not log "BlockBuilder destroyed with remaining blocks!" after a refused
        build. Best effort: nothing more is built with this builder."""
        with contextlib.suppress(Exception):
            self._bb._end_block()
        with contextlib.suppress(Exception):
            self._bb.end_scope()

    def emit_output(self, outputs: list[Any]) -> Any:
        """Emit the (tuple of) outputs of the dataflow block."""
        value = outputs[0] if len(outputs) == 1 else self._relax.Tuple(outputs)
        return self._bb.emit_output(value)

    def finish(self, output: Any) -> Any:
        """Close the function with ``output`` and return the IRModule."""
        self._bb.emit_func_output(output)
        return self._bb.finalize()

    # -- types --------------------------------------------------------------------------------
    @staticmethod
    def shape(expr: Any) -> tuple[int, ...]:
        """Static shape of a tensor expression."""
        return tuple(int(v) for v in expr.ty.shape)

    @staticmethod
    def dtype(expr: Any) -> str:
        """Element dtype of a tensor expression (``"int8"``, ``"float32"``, ...)."""
        return str(expr.ty.dtype)

    # -- ops ----------------------------------------------------------------------------------
    def _emit(self, call: Any) -> Any:
        return self._bb.emit(call)

    def const(self, value: Any, dtype: str) -> Any:
        """A constant with an explicit dtype (without it ints default to int32)."""
        return self._relax.const(np.asarray(value).astype(dtype), dtype)

    def astype(self, x: Any, dtype: str) -> Any:
        return x if self.dtype(x) == dtype else self._emit(self._op.astype(x, dtype))

    def binary(self, name: str, a: Any, b: Any) -> Any:
        """Elementwise ``add``, ``subtract``, ``multiply``, ``divide``, ``floor_divide``,
        ``right_shift`` (broadcasting; both operands must share a dtype)."""
        return self._emit(getattr(self._op, name)(a, b))

    def unary(self, name: str, x: Any) -> Any:
        """Elementwise ``round`` (half to even), ``floor``, ..."""
        return self._emit(getattr(self._op, name)(x))

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """Emit any op of ``relax.op`` by its dotted name (``"take"``, ``"mean"``,
        ``"nn.avg_pool2d"``), for converters of less common ops (``float_ops.py``)."""
        fn = self._op
        for part in op.split("."):
            fn = getattr(fn, part)
        return self._emit(fn(*args, **kwargs))

    def clip(self, x: Any, lo: int | float, hi: int | float) -> Any:
        return self._emit(self._op.clip(x, lo, hi))

    def conv2d(self, x: Any, w: Any, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, out_dtype: str) -> Any:
        """NCHW/OIHW convolution accumulating in ``out_dtype``; padding is 2 or 4 ints."""
        return self._emit(self._op.nn.conv2d(
            x, w, strides=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
            groups=groups, out_dtype=out_dtype))

    def matmul(self, a: Any, b: Any, out_dtype: str) -> Any:
        return self._emit(self._op.matmul(a, b, out_dtype=out_dtype))

    def max_pool2d(self, x: Any, kernel: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], ceil_mode: bool) -> Any:
        return self._emit(self._op.nn.max_pool2d(
            x, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), ceil_mode))

    def concat(self, xs: list[Any], axis: int) -> Any:
        return self._emit(self._op.concat(xs, axis=axis))

    def reshape(self, x: Any, shape: Sequence[int]) -> Any:
        return self._emit(self._op.reshape(x, tuple(int(s) for s in shape)))

    def permute(self, x: Any, axes: Sequence[int]) -> Any:
        return self._emit(self._op.permute_dims(x, list(axes)))

    def call_tir(self, func: Any, name: str, args: list[Any], shape: Sequence[int],
                 dtype: str) -> Any:
        """Add the TIR PrimFunc ``func`` as ``name`` and call it (``relax.call_tir``)."""
        gvar = self._bb.add_func(func, name)
        out_ty = self._relax.TensorType(tuple(int(s) for s in shape), dtype)
        return self._emit(self._relax.call_tir(gvar, args, out_ty))

    def strided_slice(self, x: Any, axes: list[int], begin: list[int], end: list[int],
                      strides: list[int]) -> Any:
        return self._emit(self._op.strided_slice(x, axes, begin, end, strides))


@contextlib.contextmanager
def quiet_tvm_log(noise: Sequence[str] = TVM_LOG_NOISE) -> Iterator[None]:
    """Drop TVM's known-noise log lines, keep everything else it writes to stderr.

    TVM's C++ ``LOG(...)`` writes straight to file descriptor 2, below Python's ``sys.stderr``,
    so the descriptor is pointed at a temporary file while the block runs; afterwards every
    captured line that contains none of ``noise`` is written back to the real stderr (warnings
    and errors stay visible, in order, just after the block). Without a usable descriptor 2 the
    block runs unfiltered.
    """
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):
            yield
            return
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                lines = tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                kept = "".join(line for line in lines if not any(n in line for n in noise))
                if kept:
                    os.write(2, kept.encode())


#: Relax passes run by :func:`fuse_module`, in order (the legalize stage of TVM's CPU pipeline).
FUSION_PASSES: tuple[str, ...] = (
    "LegalizeOps", "AnnotateTIROpPattern", "FoldConstant", "FuseOps", "FuseTIR")


def fuse_module(mod: Any, target: Any, passes: Sequence[str] = FUSION_PASSES) -> Any:
    """Legalize a Relax IRModule and fuse its elementwise chains into single PrimFuncs.

    ``tvm.compile``'s default pipeline for CPU targets legalizes every Relax op to its own
    PrimFunc and runs them one loop nest each (an int64 requantization is ~6 of them); this runs
    ``passes`` (:data:`FUSION_PASSES`, names in ``relax.transform``) first, so each chain of
    injective ops becomes one PrimFunc.
    The written kernels are ``op_pattern`` 8 (opaque), so ``FuseOps`` leaves their ``call_tir``
    and their scheduled PrimFuncs as they are. Integer ops only change order of evaluation per
    element, never the arithmetic, so the result stays bit-exact.
    """
    tvm = load_tvm()
    seq = tvm.transform.Sequential([getattr(tvm.relax.transform, name)()
                                    for name in passes])
    with target:
        return seq(mod)


#: Elements of a fused loop nest below which :func:`schedule_elementwise` does not parallelize
#: it (a thread-pool launch costs more than such a loop).
PARALLEL_MIN_ELEMENTS = 1 << 14


def _integer_only(sch: Any, blocks: list[Any]) -> bool:
    for info in blocks:
        block = sch.get(info.block_rv)
        regions = list(block.reads) + list(block.writes)
        if any(not str(r.source.dtype).startswith(("int", "uint", "bool")) for r in regions):
            return False
    return True


def _schedule_loops(sch: Any, block: Any) -> None:
    """Fuse a spatial block's loops, vectorize the innermost 16/8/4 and parallelize the rest."""
    loops = sch.get_loops(block)
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = int(sch.get(fused).extent)
    lanes = next((v for v in (16, 8, 4) if extent % v == 0 and extent > v), 0)
    if lanes:
        outer, inner = sch.split(fused, factors=[None, lanes])
        sch.vectorize(inner)
    else:
        outer = fused
    if extent >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)


def _cpu_elementwise_rule() -> Any:
    """A dlight rule for the fused integer elementwise PrimFuncs of a CPU build.

    Inlines every block that can be inlined (one loop nest per fused chain instead of one per
    op, no intermediate buffers), then vectorizes and parallelizes each remaining spatial block.
    Only PrimFuncs whose every buffer is an integer one: integer arithmetic is the same however
    the expressions are nested, while inlining float ops lets LLVM contract ``a * b + c`` into an
    FMA (a different rounding). Reductions and anything it cannot normalize are left alone.
    """
    load_tvm()
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import ScheduleRule, try_inline

    class CpuElementwise(ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc):
                return None
            sch = s_tir.Schedule(func)
            blocks = normalize_prim_func(sch)
            if not blocks or not _integer_only(sch, blocks):
                return None
            if not all(b.is_injective() for b in blocks):
                return None
            for info in try_inline(sch, blocks):
                _schedule_loops(sch, info.block_rv)
            return sch

    return CpuElementwise()


def _flatten_passes() -> Any:
    """TIR lowering up to ``FlattenBuffer``, then ``StmtSimplify`` (:func:`flatten_scheduled`)."""
    tvm = load_tvm()
    s_tir, tirx = tvm.s_tir, tvm.tirx
    return tvm.transform.Sequential([
        s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(), s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(), tirx.transform.StmtSimplify()])


def flatten_scheduled(func: Any, target: Any) -> Any:
    """Lower a scheduled elementwise PrimFunc to flat buffers and simplify its indices.

    TVM 0.27's TIR pipeline vectorizes right after ``FlattenBuffer`` without simplifying in
    between, so a loop nest fused into one vectorized loop keeps its ``i // 784 * 784 + ...``
    index arithmetic per lane and LLVM emits byte-by-byte gathers and scatters (``vpinsrb`` /
    ``vpextrb``: ~5x slower). Flattening and simplifying first turns every index back into
    ``outer * lanes + lane``, a contiguous vector access. The rest of ``tvm.compile``'s pipeline
    leaves the already-lowered function as it is; it is marked opaque (``op_pattern`` 8) so that
    Relax's own ``FuseOps`` never tries to fuse it again.
    """
    tvm = load_tvm()
    mod = tvm.IRModule({"main": func})
    with target:
        lowered = _flatten_passes()(mod)["main"]
    # Relax passes of tvm.compile (RewriteDataflowReshape) expect a root block: wrap the body
    root = tvm.s_tir.SBlock([], [], [], "root", lowered.body)
    lowered = lowered.with_body(tvm.s_tir.SBlockRealize([], True, root))
    return lowered.with_attr("op_pattern", 8)


def schedule_elementwise(mod: Any, target: Any) -> Any:
    """Apply :func:`_cpu_elementwise_rule` to the unscheduled PrimFuncs of ``mod`` (CPU targets;
    the written kernels carry ``tirx.is_scheduled`` and are skipped), then flatten each function
    it scheduled (:func:`flatten_scheduled`)."""
    tvm = load_tvm()
    from tvm.s_tir import dlight

    def scheduled(func: Any) -> bool:
        return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))

    # ApplyDefaultSchedule may update the module it is given in place: note first which
    # functions were not scheduled yet
    todo = {gvar.name_hint for gvar, func in mod.functions.items()
            if isinstance(func, tvm.tirx.PrimFunc) and not scheduled(func)}
    with target:
        out = dlight.ApplyDefaultSchedule(_cpu_elementwise_rule())(mod)
    for gvar, func in list(out.functions.items()):
        if gvar.name_hint in todo and isinstance(func, tvm.tirx.PrimFunc) and scheduled(func):
            out.update_func(gvar, flatten_scheduled(func, target))
    return out


def compile_module(mod: Any, target: Any, fuse: bool = True, schedule: bool = True) -> Any:
    """``tvm.compile`` a Relax IRModule to a VM executable.

    With ``fuse``, :func:`fuse_module` runs first; with ``schedule`` too and a CPU (``llvm``)
    target, :func:`schedule_elementwise` then schedules the fused elementwise PrimFuncs (GPU
    targets get dlight's GPU rules from ``tvm.compile``'s own pipeline). LLVM targets are
    compiled by :func:`.codegen.compile_llvm` (``tvm.compile``'s steps, in parallel parts).
    """
    from .codegen import compile_llvm

    llvm = str(target.kind.name) == "llvm"
    with quiet_tvm_log():
        if fuse:
            mod = fuse_module(mod, target)
            if schedule and llvm:
                mod = schedule_elementwise(mod, target)
        return compile_llvm(mod, target) if llvm else load_tvm().compile(mod, target=target)


def call_tir_count(mod: Any, func: str = "main") -> int:
    """How many ``call_tir`` bindings Relax function ``func`` of ``mod`` has."""
    tvm = load_tvm()
    call_tir = tvm.ir.Op.get("relax.call_tir")
    found: list[int] = []

    def visit(expr: Any) -> None:
        if isinstance(expr, tvm.relax.Call) and expr.op.same_as(call_tir):
            found.append(1)

    tvm.relax.analysis.post_order_visit(mod[func], visit)
    return len(found)


def make_vm(executable: Any) -> Any:
    """A Relax VM for a host (CPU) executable (create once, call :func:`run_vm` many times).

    Creating it JIT-compiles the executable's LLVM modules to machine code (the VM looks up every
    kernel), once per executable: :func:`.codegen.jit` does it first, one thread per module.
    """
    from .codegen import jit
    from .kernels.amx import request_amx

    request_amx()  # AMX kernels need the process's tile state before their first instruction
    tvm = load_tvm()
    with quiet_tvm_log():
        jit(executable)
        return tvm.relax.VirtualMachine(executable, tvm.cpu())


def run_vm(vm: Any, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``main`` of a VM from :func:`make_vm` on numpy arrays; returns numpy arrays."""
    tvm = load_tvm()
    dev = tvm.cpu()
    result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays])
    items = list(result) if not hasattr(result, "numpy") else [result]
    return [item.numpy() for item in items]


def export_library(executable: Any, path: str, cross_compiler: str | None = None) -> None:
    """Write ``path``: a ``.so`` linked by ``cross_compiler`` (or the host cc), or a ``.tar``."""
    tvm = load_tvm()
    with quiet_tvm_log():
        if cross_compiler is None:
            executable.export_library(path)
            return
        fcompile = tvm.support.cc.cross_compiler(cross_compiler)
        executable.export_library(path, fcompile=fcompile)


def cuda_source(executable: Any) -> str:
    """The CUDA C source of the device kernels of a CUDA executable (``imports`` tree walk)."""
    stack = [executable.mod]
    while stack:
        module = stack.pop()
        if module.kind == "cuda":
            return str(module.inspect_source("cuda"))
        stack.extend(module.imports)
    raise BackendError("the executable holds no CUDA module; build it with target='cuda'")
