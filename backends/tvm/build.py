"""Build a converted model with TVM for x86, aarch64 (cross) or CUDA; run and export it.

Targets (dicts, TVM 0.27):

* ``"x86"``: ``{"kind": "llvm", "mcpu": <this CPU>}``, plus ``"mattr": ["+amx-tile",
  "+amx-int8"]`` where the CPU reports AMX-INT8 and Linux grants the tile state (LLVM names such
  CPUs' model without it, e.g. ``rocketlake``); the result is callable here.
* ``"x86-avx2"`` / ``"x86-avx512"``: a portable x86 build for another machine than this one
  (:data:`PORTABLE_X86`): ``mcpu`` ``haswell`` (AVX2 + FMA: the AVX2 kernels; runs on any x86-64
  CPU with AVX2, AMD Zen included) or ``cascadelake`` (AVX-512 BW/VNNI kernels, no AMX). Callable
  here when this CPU has those features, else export it and load it on the device.
* ``"aarch64"``: ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon",
  "+dotprod"]}``, cross-compiled; ``export("m.tar")`` needs no toolchain, ``export("m.so")`` needs
  ``aarch64-linux-gnu-gcc``.
* ``"cuda"``: ``{"kind": "cuda", "arch": "sm_80"}`` with an llvm host; inspect the kernels with
  :meth:`CompiledModel.cuda_source` and compile them with :func:`compile_cuda_to_ptx`.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from djpq_compiler.errors import BackendError

from . import adapter, ms_adapter
from .emit import lower

__all__ = ["CUDA_EMULATED", "PORTABLE_X86", "TARGETS", "CompiledModel", "build",
           "compile_cuda_to_ptx", "find_nvcc", "host_has_features", "target_spec"]

#: What the CUDA build computes, run on this CPU (:func:`build`): a check target, not a deployment.
CUDA_EMULATED = "cuda-emulated"
TARGETS = ("x86", "x86-avx2", "x86-avx512", "aarch64", "cuda", CUDA_EMULATED)
#: The portable x86 targets: LLVM CPU model, and the features this host needs to run the build.
PORTABLE_X86 = {"x86-avx2": ("haswell", ("avx2", "fma")),
                "x86-avx512": ("cascadelake", ("avx512bw", "avx512vnni"))}
AARCH64_GCC = "aarch64-linux-gnu-gcc"


def target_spec(target: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The TVM target dict (and host dict) of a target name.

    Raises:
        BackendError: Unknown target name.
    """
    if target == "x86":
        spec: dict[str, Any] = {"kind": "llvm", "mcpu": adapter.system_cpu()}
        from .kernels.amx import request_amx

        if request_amx():  # the CPU has AMX-INT8 and Linux granted the tile state
            spec["mattr"] = ["+amx-tile", "+amx-int8"]
        return spec, None
    if target in PORTABLE_X86:
        return {"kind": "llvm", "mcpu": PORTABLE_X86[target][0]}, None
    if target == "aarch64":
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                "mattr": ["+neon", "+dotprod"]}, None
    if target in ("cuda", CUDA_EMULATED):  # the emulated build lowers as for CUDA (build())
        return {"kind": "cuda", "arch": "sm_80"}, {"kind": "llvm"}
    import difflib

    close = difflib.get_close_matches(str(target), TARGETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise BackendError(f"unknown TVM target {target!r}{hint}; choose one of "
                       f"{', '.join(TARGETS)}")


def host_has_features(features: Sequence[str]) -> bool:
    """Whether this CPU has every one of the LLVM ``features`` (e.g. ``"avx2"``)."""
    tvm = adapter.load_tvm()
    host = adapter.make_target({"kind": "llvm", "mcpu": adapter.system_cpu()})
    return all(bool(tvm.target.codegen.target_has_features(f, host)) for f in features)


#: The alignment TVM's kernels may assume of a tensor argument's data (``kAllocAlignment``).
ARG_ALIGNMENT = 64


def _call_vm(vm: Any, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``main`` on contiguous float32 CPU tensors and return its outputs as torch tensors.

    Inputs and outputs cross by DLPack, without copies: a model call at batch 1 spent ~60 of its
    150 us (vgg7, AVX2 build) copying the input into a new TVM tensor and the output into numpy
    and torch. An input whose data is not :data:`ARG_ALIGNMENT`-aligned (a slice of a larger
    tensor) is copied into a TVM tensor, which is. Each output keeps its VM tensor alive."""
    tvm = adapter.load_tvm()
    args = [tvm.runtime.from_dlpack(t) if t.data_ptr() % ARG_ALIGNMENT == 0
            else tvm.runtime.tensor(t.numpy(), tvm.cpu()) for t in tensors]
    result = vm["main"](*args)
    items = list(result) if not hasattr(result, "numpy") else [result]
    return [torch.from_dlpack(item) for item in items]


def _unaliased(out: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``out``, copied if it shares memory with an input (a model that returns its input)."""
    if out.numel() and any(out.data_ptr() == t.data_ptr() for t in inputs):
        return out.clone()
    return out


class CompiledModel:
    """A converted model compiled by TVM.

    Call it with float32 torch tensors shaped like the example inputs (host targets only): integer
    outputs come back as ``int64`` tensors (like the reference executor), float outputs as
    ``float32`` tensors.

    Attributes:
        target: A name of :data:`TARGETS`.
        ir_module: The Relax IRModule that was compiled.
        compile_seconds: Wall time of ``tvm.compile``.
        load_seconds: Wall time of loading the library for this host at build time (TVM
            JIT-compiles the LLVM module to machine code when the first VM is made; done in
            :func:`build`, with one warm-up call on zeros, so the first call costs what later
            calls do); ``0.0`` for targets that do not run here.
        tuned_kernels: ``(with a tuned schedule, total)`` kernels when built from a tuning
            database (``build(..., work_dir=...)``), else ``None``.
    """

    def __init__(self, target: str, executable: Any, ir_module: Any,
                 input_shapes: list[tuple[int, ...]], output_kinds: list[str],
                 output_tuple: bool, compile_seconds: float,
                 tuned_kernels: tuple[int, int] | None = None) -> None:
        self.target = target
        self.executable = executable
        self.ir_module = ir_module
        self.input_shapes = input_shapes
        self.output_kinds = output_kinds
        self.output_tuple = output_tuple
        self.compile_seconds = compile_seconds
        self.tuned_kernels = tuned_kernels
        self._vm: Any = None
        self.load_seconds = 0.0
        if self._runnable_here():
            start = time.perf_counter()
            self._vm = adapter.make_vm(executable)
            self._warm_up()
            self.load_seconds = time.perf_counter() - start

    def _warm_up(self) -> None:
        """One call on zeros through the path ``__call__`` takes (:func:`_call_vm`, DLPack): the
        VM allocates its memory pool and the kernels' pages are touched here rather than in the
        caller's first call (first call ~= steady calls)."""
        _call_vm(self._vm, [torch.zeros(s, dtype=torch.float32) for s in self.input_shapes])

    def _runnable_here(self) -> bool:
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        if self.target in ("x86", CUDA_EMULATED):
            return x86
        if self.target in PORTABLE_X86:
            return x86 and host_has_features(PORTABLE_X86[self.target][1])
        if self.target == "aarch64":
            return platform.machine().lower() in ("aarch64", "arm64")
        return False

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the compiled model on this machine.

        Raises:
            BackendError: Cross-compiled/CUDA target, or inputs of the wrong number/shape.
        """
        if not self._runnable_here():
            raise BackendError(
                f"a model built for target={self.target!r} cannot run on this "
                f"{platform.machine()} host; export() it and load it on the device"
            )
        shapes = [tuple(t.shape) for t in inputs]
        if shapes != self.input_shapes:
            raise BackendError(f"compiled for input shapes {self.input_shapes}, got {shapes}; "
                               "rebuild with matching example_inputs")
        tensors = [t.detach().to(device="cpu", dtype=torch.float32).contiguous() for t in inputs]
        if self._vm is None:  # made at build time for host targets; reused
            self._vm = adapter.make_vm(self.executable)
        results = _call_vm(self._vm, tensors)
        outs = tuple(
            r.to(torch.int64) if kind == "int" else _unaliased(r, tensors)
            for r, kind in zip(results, self.output_kinds, strict=True)
        )
        return outs if self.output_tuple else outs[0]

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write the compiled library: ``.so`` (linked) or ``.tar`` (objects, no toolchain).

        An x86 library with AMX kernels (``amx_int8`` in :meth:`kernel_report`) runs only in a
        process that holds the AMX tile state: call ``kernels.amx.request_amx()`` there before
        the first call (Linux raises SIGILL otherwise; this object does it itself).

        Raises:
            BackendError: Bad suffix, or an aarch64 ``.so`` without the cross compiler.
        """
        out = Path(path)
        if out.suffix not in (".so", ".tar"):
            raise BackendError(f"export path must end in .so or .tar, got {out.name!r}")
        cross = None
        if out.suffix == ".so" and self.target == "aarch64":
            cross = shutil.which(AARCH64_GCC)
            if cross is None:
                raise BackendError(
                    f"linking an aarch64 .so needs {AARCH64_GCC}: "
                    "apt-get install gcc-aarch64-linux-gnu (or export a .tar, which needs no "
                    "toolchain)"
                )
        out.parent.mkdir(parents=True, exist_ok=True)
        adapter.export_library(self.executable, str(out), cross)
        return out

    def cuda_source(self) -> str:
        """The generated CUDA C source (target ``"cuda"`` only)."""
        if self.target != "cuda":
            raise BackendError(f"cuda_source() needs target='cuda', this is {self.target!r}")
        return adapter.cuda_source(self.executable)

    #: One ``KernelChoice`` per integer conv/linear layer: the kernel it got and the bound used.
    kernels: tuple[Any, ...] = ()
    #: One ``kernels.eltwise.ChainRecord`` per fused lane-wise kernel (requantize / add / clip
    #: chains): the ops it fused and, per requantization, int32 or int64 and why.
    eltwise: tuple[Any, ...] = ()

    def kernel_report(self) -> str:
        """A table of :attr:`kernels` (layer, op, variant, MACs, bound / reason), then one of
        :attr:`eltwise` (the fused lane-wise kernels and the arithmetic of each step)."""
        from .kernels.eltwise import eltwise_table
        from .kernels.report import kernel_table

        return kernel_table(self.kernels) + "\n\n" + eltwise_table(list(self.eltwise))

    def script(self) -> str:
        """The Relax IRModule as TVMScript text."""
        return str(self.ir_module.script())


def _as_inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if torch.is_tensor(example_inputs):
        return [example_inputs]
    return list(example_inputs)


def build(converted: fx.GraphModule, target: str = "x86",
          example_inputs: torch.Tensor | Sequence[torch.Tensor] = (),
          work_dir: str | os.PathLike[str] | None = None) -> CompiledModel:
    """Lower a converted model to Relax and compile it for ``target``.

    Args:
        converted: The output of ``convert()`` (``records.stage(gm) == "converted"``).
        target: ``"x86"`` (this CPU), ``"x86-avx2"`` / ``"x86-avx512"`` (portable x86 builds
            for other machines), ``"aarch64"`` or ``"cuda"``; or ``"cuda-emulated"``, a check
            of the CUDA build without a GPU: the model lowered for CUDA (every layer gets the
            kernel, packed weights and arguments the CUDA build gets), each ``dp4a`` kernel with
            its CUDA schedule emulated (``kernels.cuda.emulated``: block/thread loops serial,
            ``dp4a`` replaced by its four-product definition), compiled for and run on this CPU
            (slow; it checks the lowering and the kernels' definitions, loop structure and
            indexing, not the thread binding, ``__dp4a`` itself or CUDA code generation).
        example_inputs: One float32 tensor (or a sequence, one per input) fixing static shapes.
        work_dir: A directory filled by :func:`~djpq_compiler.backends.tvm.tune`: every kernel
            with a record in its JSON database is compiled with its best tuned schedule (the
            others keep TVM's default); nothing is tuned here. ``x86`` only.

    Returns:
        The :class:`CompiledModel`.

    Raises:
        BackendError: Unsupported nodes (all listed at once), bad inputs, an unknown target, or a
            ``work_dir`` without a tuning database.
        MissingExtraError: TVM is not installed.
    """
    spec, host = target_spec(target)
    if not isinstance(converted, fx.GraphModule):
        raise BackendError(f"build() needs the converted GraphModule, got {type(converted)}")
    if work_dir is not None:
        _check_database(target, work_dir)
    inputs = _as_inputs(example_inputs)
    if target == CUDA_EMULATED:
        from .kernels.cuda import emulated

        with emulated():
            ir_module, lowering = lower(converted, inputs, spec)
        spec, host = target_spec("x86")  # compiled for this CPU
    else:
        ir_module, lowering = lower(converted, inputs, spec)
    start = time.perf_counter()
    tuned = None
    if work_dir is None:
        executable = adapter.compile_module(ir_module, adapter.make_target(spec, host))
    else:
        from .tune import tuning_target

        tvm_target = tuning_target(target)
        database = ms_adapter.open_database(Path(work_dir), create=False)
        fused = ms_adapter.fuse(ir_module, tvm_target)
        applied, scheduled, ir_scheduled_total = ms_adapter.apply_database(
            fused, tvm_target, database)
        if spec.get("kind") == "llvm":  # what has no record gets the untuned CPU schedule
            applied = adapter.schedule_elementwise(applied, tvm_target)
        executable = ms_adapter.compile_fused(applied, tvm_target)
        tuned = (scheduled, ir_scheduled_total)
    seconds = time.perf_counter() - start
    compiled = CompiledModel(target, executable, ir_module, [tuple(t.shape) for t in inputs],
                             lowering.output_kinds, lowering.output_tuple, seconds, tuned)
    compiled.kernels = tuple(lowering.kernels)
    compiled.eltwise = tuple(lowering.eltwise)
    return compiled


def _check_database(target: str, work_dir: str | os.PathLike[str]) -> None:
    """Refuse a tuned build that cannot apply: wrong target or no database in ``work_dir``."""
    from .tune import TUNABLE_TARGETS, database_exists

    if target not in TUNABLE_TARGETS:
        raise BackendError(f"build(target={target!r}, work_dir=...): tuned schedules exist for "
                           f"{', '.join(TUNABLE_TARGETS)} only; drop work_dir for this target")
    if not database_exists(work_dir):
        raise BackendError(
            f"build(work_dir={str(work_dir)!r}): no meta_schedule database there (expected "
            "database_workload.json and database_tuning_record.json); run "
            "djpq_compiler.backends.tvm.tune(converted, ..., work_dir=...) first, or drop work_dir"
        )


def find_nvcc() -> str:
    """Path of the local nvcc (``/usr/local/cuda/bin/nvcc`` or on ``PATH``).

    Raises:
        BackendError: No nvcc found.
    """
    default = Path("/usr/local/cuda/bin/nvcc")
    if default.is_file():
        return str(default)
    found = shutil.which("nvcc")
    if found is None:
        raise BackendError("nvcc not found (looked in /usr/local/cuda/bin and on PATH); "
                           "install the CUDA toolkit to compile the generated CUDA source")
    return found


def compile_cuda_to_ptx(source: str, arch: str = "sm_80", timeout: float = 300.0) -> str:
    """Compile CUDA C source to PTX text with the local nvcc.

    Raises:
        BackendError: nvcc is missing or rejects the source (its stderr is included).
    """
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory(prefix="djpq_ptx_") as tmp:
        src, ptx = Path(tmp, "kernels.cu"), Path(tmp, "kernels.ptx")
        src.write_text(source)
        cmd = [nvcc, "--ptx", f"-arch={arch}", "-O3", "-o", str(ptx), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise BackendError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        return ptx.read_text()
