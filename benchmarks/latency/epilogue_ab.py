"""A/B of the int32 requantization epilogue (``backends/tvm/kernels/requant32.py``), interleaved.

Builds one committed DJPQ-trained model twice in one process: ``int64`` with every written
kernel's requantization in int64 (``emit.INT32_REQUANT_KINDS`` emptied: the code before the
change) and ``int32`` as ``build()`` makes it (int32 wherever ``plan_int32`` finds a plan). Checks
both bit-exact against the integer reference, then times ``main`` alternately by the calling
thread's CPU time (run at ``TVM_NUM_THREADS=1``: every kernel runs on that thread, so other
processes on the machine do not count) and prints medians, the ratio, and how many conv/linear
layers took each epilogue.

Usage:
  TVM_NUM_THREADS=1 python benchmarks/latency/epilogue_ab.py --model resnet20 --batch 32 \
      --isa avx2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def _build(converted: Any, x: torch.Tensor, int32: bool) -> Any:
    """Build with the int32 requantization allowed (as ``build()`` does) or switched off."""
    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.backends.tvm.kernels import emit

    saved = emit.INT32_REQUANT_KINDS
    if not int32:
        emit.INT32_REQUANT_KINDS = frozenset()
    try:
        return tvm_backend.build(converted, "x86", example_inputs=(x,))
    finally:
        emit.INT32_REQUANT_KINDS = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", choices=("vgg7", "resnet20", "mobilenetv2"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--isa", choices=("native", "avx2"), default="native")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if os.environ.get("TVM_NUM_THREADS") != "1":
        print("warning: run at TVM_NUM_THREADS=1 (thread CPU time counts the calling thread)")
    sys.argv = sys.argv[:1]
    sys.path.insert(0, str(HERE))
    import run as latency  # noqa: PLC0415
    import tvm  # noqa: PLC0415

    latency.force_isa(args.isa)
    info = latency.trained_model(args.model, HERE / "models")
    converted = info["converted"]
    x = torch.randn(args.batch, *info["shape"], generator=torch.Generator().manual_seed(1))
    want = converted(x)
    builds = {"int64": _build(converted, x, False), "int32": _build(converted, x, True)}
    forms = {}
    for name, compiled in builds.items():
        got = compiled(x)
        if not torch.equal(got, want.to(got.dtype)):
            raise SystemExit(f"{name} build differs from the integer reference")
        forms[name] = dict(Counter(k.epilogue for k in compiled.kernels))
    vms = {k: tvm.relax.VirtualMachine(c.executable, tvm.cpu()) for k, c in builds.items()}
    arr = tvm.runtime.tensor(x.numpy(), tvm.cpu())
    for vm in vms.values():
        for _ in range(3):
            vm["main"](arr)
    reps = 5
    times: dict[str, list[float]] = {k: [] for k in vms}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for key in (("int64", "int32") if r % 2 else ("int32", "int64")):
            t0 = time.thread_time()
            for _ in range(reps):
                vms[key]["main"](arr)
            times[key].append((time.thread_time() - t0) / reps)
    load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{args.model} batch {args.batch} isa {args.isa}: int64 epilogue {med['int64']:.3f} ms,"
          f" int32 where planned {med['int32']:.3f} ms, x{med['int64'] / med['int32']:.3f} "
          f"(thread CPU time, median of {args.rounds} rounds of {reps}; load {load[0]:.1f} -> "
          f"{load[1]:.1f}); both bit-exact")
    print(f"  layers per epilogue: int64 build {forms['int64']}, int32 build {forms['int32']}")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "batch": args.batch, "isa": args.isa, "median_ms": med,
            "rounds_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
            "epilogues": forms, "load": load,
            "command": "TVM_NUM_THREADS=1 python benchmarks/latency/epilogue_ab.py "
                       f"--model {args.model} --batch {args.batch} --isa {args.isa} "
                       f"--rounds {args.rounds}"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
