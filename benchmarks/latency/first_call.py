"""Build time, first call and steady-state call of the TVM x86 build of large converted nets.

For each torchvision model (``weights=None``, eval mode) at a small input: ``prepare`` with
``DJPQConfig()`` (calibrated on the example input), ~40 % of every gate group closed at random
(as ``tests/test_tvm_zoo.py`` does), ``convert``; then, in a fresh ``CompiledModel``:
``build`` (wall time of the whole call; ``load_seconds`` is the part that JIT-compiles the
library, done at build time since the fix), the first ``model(x)`` and the median of ``--runs``
further calls. ``--modes one_module,eager`` measures the path before ``codegen.compile_llvm``
and the current one alternately in one run (``lazy``: before the first-call fix; see
:func:`measure`). ``build_cpu_s`` is the CPU time of the build (all threads): on a shared host
it varies less than the wall time. Each (model, mode) runs in its own subprocess, so
one build's TVM state (JIT, caches) does not warm the next.

Usage:
  python benchmarks/latency/first_call.py --models resnext50_32x4d:64,inception_v3:96 \
      --out benchmarks/latency/first_call.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _compile_as_one_module() -> None:
    """Replay ``tvm.compile`` as the build used it before ``codegen.compile_llvm``: one LLVM
    module with every argument check, made into machine code by the VM on one thread."""
    from djpq_compiler.backends.tvm import adapter, codegen

    tvm = adapter.load_tvm()
    codegen.compile_llvm = lambda mod, target, **_: tvm.compile(mod, target=target)
    codegen.jit = lambda executable, threads=None: None


def _register_all_intrinsics() -> None:
    """Replay the intrinsic registration before it was made lazy: every intrinsic of
    ``kernels/intrin.py`` parsed and registered at the first kernel of a build."""
    from djpq_compiler.backends.tvm.kernels import conv2d, intrin

    conv2d.register_intrinsics = lambda *_: intrin.register_intrinsics()  # type: ignore[assignment]


def _before_session() -> None:
    """Replay the build before the 2026-12-03 22:11 session: every intrinsic registered at once,
    TVM's TIR pipeline with ``RemoveNoOp``, no warm-up call at load."""
    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.backends.tvm import codegen

    _register_all_intrinsics()
    codegen.SKIPPED_TIR_PASSES = ()
    tvm_backend.CompiledModel._warm_up = lambda self: None  # type: ignore[method-assign]


def _pack_rolled() -> None:
    """Experiment (not the default): the conv kernels' pack loop over columns rolled, only its
    channel lanes unrolled (``conv2d.PACK_UNROLL_WIDTH = 0``)."""
    from djpq_compiler.backends.tvm.kernels import conv2d

    conv2d.PACK_UNROLL_WIDTH = 0


def converted_model(name: str, size: int, batch: int = 1) -> tuple[Any, Any]:
    """``(converted, x)``: torchvision ``name`` (random init, seed 0) prepared on a
    ``(batch, 3, size, size)`` input, about 40 % of every group's gates closed (seeded, one
    channel kept), converted to integers. Shared by ``first_call_profile.py`` and
    ``first_call_asm_check.py`` so all three build the same model."""
    import torch
    import torchvision

    import djpq_compiler as djpq
    from djpq_compiler.convert import convert
    from djpq_compiler.prepared import gates

    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    prepared = djpq.prepare(torchvision.models.get_model(name, weights=None).eval(), x)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, gate in gates(prepared):
            gate.mu[torch.rand(gate.mu.shape, generator=gen) < 0.4] = 1e-3
            gate.mu[0] = 1.0
    return convert(prepared.eval()), x


def measure(name: str, size: int, batch: int, runs: int, mode: str) -> dict[str, Any]:
    """Build ``name`` at ``size`` and time its build, first call and steady-state calls.

    ``mode="lazy"`` replays the path before the first fix: the build does not load the library
    (``CompiledModel`` is told the target cannot run here while it is constructed), so the first
    call makes the VM and pays the LLVM JIT, as ``CompiledModel.__call__`` still does for a model
    that was not loaded; the library is compiled as one LLVM module (``tvm.compile``).
    ``mode="one_module"``: the build loads the library, compiled by ``tvm.compile`` as one LLVM
    module (the path before ``codegen.compile_llvm``). ``mode="eager"``: ``build`` as it is.
    ``mode="all_intrinsics"``: every tensor intrinsic registered at the first kernel (before they
    were registered one by one, as needed). ``mode="before_session"``: that, plus TVM's TIR
    ``RemoveNoOp`` and no warm-up call at load (the build before 2026-12-03 22:11 UTC).
    ``mode="pack_rolled"``: an experiment, the conv kernels' pack with its column loop rolled
    (``conv2d.PACK_UNROLL_WIDTH = 0``). ``mode="no_warm_up"``: ``eager`` without the warm-up
    call on zeros that ``CompiledModel`` makes at load.
    """
    import torch

    from djpq_compiler.backends import tvm as tvm_backend

    converted, x = converted_model(name, size, batch)
    cls = tvm_backend.CompiledModel
    runnable = cls._runnable_here
    if mode == "lazy":
        cls._runnable_here = lambda self: False  # type: ignore[method-assign]
    if mode in ("lazy", "one_module"):
        _compile_as_one_module()
    if mode == "all_intrinsics":
        _register_all_intrinsics()
    if mode == "before_session":
        _before_session()
    if mode == "pack_rolled":
        _pack_rolled()
    if mode == "no_warm_up":  # eager, without the warm-up call on zeros at load
        cls._warm_up = lambda self: None  # type: ignore[method-assign]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    build_s, build_cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    cls._runnable_here = runnable  # type: ignore[method-assign]
    t0 = time.perf_counter()
    first = compiled(x)
    first_s = time.perf_counter() - t0
    steady = []
    for _ in range(runs):
        t0 = time.perf_counter()
        compiled(x)
        steady.append(time.perf_counter() - t0)
    with torch.no_grad():
        exact = bool(torch.equal(first, converted(x)))
    med = statistics.median(steady)
    return {"model": name, "mode": mode, "input": [batch, 3, size, size],
            "build_s": round(build_s, 2), "build_cpu_s": round(build_cpu, 2),
            "compile_seconds": round(compiled.compile_seconds, 2),
            "load_seconds": round(getattr(compiled, "load_seconds", 0.0), 2),
            "build_plus_first_call_s": round(build_s + first_s, 2),
            "loadavg_1min": round(os.getloadavg()[0], 1),
            "first_call_s": round(first_s, 3), "steady_call_s": round(med, 4),
            "first_over_steady": round(first_s / med, 2), "bit_exact": exact}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnext50_32x4d:64,inception_v3:96",
                    help="NAME:SIZE,... (torchvision names)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="one_module,eager",
                    help="lazy: the first call loads the library (before the first fix); "
                         "one_module: build loads it, compiled by tvm.compile as one LLVM module; "
                         "eager: build as it is now; all_intrinsics: every tensor intrinsic "
                         "registered at the first kernel (before lazy registration); "
                         "before_session: that + RemoveNoOp + no warm-up call; "
                         "pack_rolled: experiment, the kernels' pack column loop rolled; "
                         "no_warm_up: eager without the warm-up call at load; "
                         "each model runs once per mode, alternating")
    ap.add_argument("--build-threads", default=None,
                    help="DJPQ_TVM_BUILD_THREADS for the builds (default: the usable cores)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole alternation this many times")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args(argv)
    if args.one:
        name, _, size = args.one.partition(":")
        print(json.dumps(measure(name, int(size), args.batch, args.runs, args.modes)))
        return 0
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads),
           "OMP_NUM_THREADS": str(args.threads)}
    if args.build_threads is not None:
        env["DJPQ_TVM_BUILD_THREADS"] = str(args.build_threads)
    results = []
    jobs = [(item, mode) for _ in range(args.rounds) for item in args.models.split(",")
            for mode in args.modes.split(",")]
    for item, mode in jobs:
        cmd = [sys.executable, __file__, "--one", item, "--modes", mode, "--batch",
               str(args.batch), "--runs", str(args.runs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            results.append({"model": item, "mode": mode,
                            "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        doc = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "loadavg": os.getloadavg()[0], "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
