"""Where the build time of a large net goes, phase by phase (wall and process CPU seconds).

Builds one torchvision model like ``first_call.py`` does (same preparation, x86, eager load)
with timers wrapped around the build's phases: Python lowering (of which kernel scheduling and
intrinsic registration), Relax fusion, elementwise scheduling, the Relax pipeline, VM code
generation, the parallel LLVM builds, ``VMLink`` and the library load (JIT).

Usage:
  python benchmarks/latency/first_call_profile.py --model inception_v3:96
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from first_call import converted_model  # the script's folder is on sys.path

_TOTALS: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), _cpu()
        try:
            return fn(*args, **kwargs)
        finally:
            entry = _TOTALS[name]
            entry[0] += time.perf_counter() - t0
            entry[1] += _cpu() - c0
            entry[2] += 1

    return wrapper


def _instrument() -> None:
    import importlib

    from djpq_compiler.backends.tvm import adapter, codegen
    from djpq_compiler.backends.tvm.kernels import conv2d, emit, intrin

    build = importlib.import_module("djpq_compiler.backends.tvm.build")
    tvm = adapter.load_tvm()
    build.lower = _timed("lower (python, total)", build.lower)
    emit._kernel = _timed("  conv kernel schedule", emit._kernel.__wrapped__)
    intrin.register_intrinsics = _timed("  register_intrinsics", intrin.register_intrinsics)
    conv2d.register_intrinsics = intrin.register_intrinsics
    adapter.fuse_module = _timed("fuse_module", adapter.fuse_module)
    adapter.schedule_elementwise = _timed("schedule_elementwise", adapter.schedule_elementwise)
    codegen.compile_llvm = _timed("compile_llvm (total)", codegen.compile_llvm)
    pipeline = tvm.relax.get_pipeline

    def get_pipeline(*a: Any, **k: Any) -> Any:
        return _timed("  relax pipeline", pipeline(*a, **k))

    tvm.relax.get_pipeline = get_pipeline
    from tvm.relax import vm_build

    vm_build._vmcodegen = _timed("  vm codegen", vm_build._vmcodegen)
    codegen._map = _timed("  llvm parts (parallel)", codegen._map)
    codegen.checked_functions = _timed("  taint analysis", codegen.checked_functions)
    codegen.jit = _timed("jit (parallel)", codegen.jit)
    adapter.make_vm = _timed("make_vm (total load)", adapter.make_vm)
    build.adapter.make_vm = adapter.make_vm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="inception_v3:96")
    args = ap.parse_args()
    name, _, size = args.model.partition(":")
    import torch

    from djpq_compiler.backends import tvm as tvm_backend

    converted, x = converted_model(name, int(size))
    _instrument()
    t0, c0 = time.perf_counter(), _cpu()
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    total = (time.perf_counter() - t0, _cpu() - c0)
    with torch.no_grad():
        exact = bool(torch.equal(compiled(x), converted(x)))
    rows = {k: {"wall_s": round(v[0], 2), "cpu_s": round(v[1], 2), "calls": v[2]}
            for k, v in _TOTALS.items()}
    print(json.dumps({"model": args.model, "build_wall_s": round(total[0], 2),
                      "build_cpu_s": round(total[1], 2), "bit_exact": exact,
                      "loadavg": os.getloadavg(), "phases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
