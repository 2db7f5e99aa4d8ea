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
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def int64_only() -> Iterator[None]:
    """Build with every written kernel's requantization in int64 (the code before the change)."""
    from djpq_compiler.backends.tvm.kernels import emit

    saved = emit.INT32_REQUANT_KINDS
    emit.INT32_REQUANT_KINDS = frozenset()
    try:
        yield
    finally:
        emit.INT32_REQUANT_KINDS = saved


def compare_builds(model: str, batch: int, rounds: int, isa: str,
                   variants: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]],
                   ) -> dict[str, Any]:
    """Build ``model`` (a committed DJPQ-trained one) once per variant (``build(..., "x86")``
    under the variant's context manager), check each bit-exact against the integer reference,
    time the VMs' ``main`` alternately by thread CPU time and return the record: median ms per
    variant, every round, each build's epilogue and kernel-variant counts, the load."""
    sys.argv = sys.argv[:1]
    sys.path.insert(0, str(HERE))
    import run as latency  # noqa: PLC0415

    latency.force_isa(isa)
    info = latency.trained_model(model, HERE / "models")
    x = torch.randn(batch, *info["shape"], generator=torch.Generator().manual_seed(1))
    rec = compare_converted(info["converted"], x, rounds, "x86", variants)
    return {"model": model, "batch": batch, "isa": isa, **rec}


def compare_converted(converted: Any, x: torch.Tensor, rounds: int, target: str,
                      variants: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]],
                      ) -> dict[str, Any]:
    """:func:`compare_builds` for any converted model and input: build it for ``target`` once
    per variant, check each build bit-exact, time the VMs alternately (thread CPU time)."""
    import tvm  # noqa: PLC0415

    from djpq_compiler.backends import tvm as tvm_backend

    want = converted(x)
    builds = {}
    for name, ctx in variants.items():
        with ctx():
            builds[name] = tvm_backend.build(converted, target, example_inputs=(x,))
    forms, kinds, layouts = {}, {}, {}
    for name, compiled in builds.items():
        got = compiled(x)
        if not torch.equal(got, want.to(got.dtype)):
            raise SystemExit(f"{name} build differs from the integer reference")
        forms[name] = dict(Counter(k.epilogue for k in compiled.kernels))
        kinds[name] = dict(Counter(k.variant for k in compiled.kernels))
        layouts[name] = dict(Counter(f"{k.in_layout} -> {k.out_layout}"
                                     for k in compiled.kernels if k.variant != "default"))
    vms = {k: tvm.relax.VirtualMachine(c.executable, tvm.cpu()) for k, c in builds.items()}
    arr = tvm.runtime.tensor(x.numpy(), tvm.cpu())
    for vm in vms.values():
        for _ in range(3):
            vm["main"](arr)
    reps = 5
    times: dict[str, list[float]] = {k: [] for k in vms}
    names = list(vms)
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for key in (names if r % 2 else names[::-1]):
            t0 = time.thread_time()
            for _ in range(reps):
                vms[key]["main"](arr)
            times[key].append((time.thread_time() - t0) / reps)
    load.append(os.getloadavg()[0])
    return {"median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "rounds_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
            "epilogues": forms, "variants": kinds, "layouts": layouts, "load": load,
            "reps": reps}


def model_ab(script: str, args: argparse.Namespace,
             variants: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]]) -> int:
    """An A/B script's ``--model`` run: :func:`compare_builds` of ``args.model`` (batch, rounds,
    isa) with two ``variants`` (the old rule first, the build's own second), the medians and
    their ratio printed, the record (with the command of ``script``, a file in this folder)
    written to ``args.out`` when given."""
    rec = compare_builds(args.model, args.batch, args.rounds, args.isa, variants)
    (old, new), med = variants, rec["median_ms"]
    print(f"{args.model} batch {args.batch} isa {args.isa}: {old} {med[old]:.3f} ms, "
          f"{new} {med[new]:.3f} ms, x{med[old] / med[new]:.3f} (thread CPU time, "
          f"median of {args.rounds} rounds of {rec['reps']}; load {rec['load'][0]:.1f} -> "
          f"{rec['load'][1]:.1f}); both bit-exact; kernels {rec['variants'][new]}")
    if args.out:
        rec["command"] = (f"TVM_NUM_THREADS=1 python benchmarks/latency/{script} --model "
                          f"{args.model} --batch {args.batch} --isa {args.isa} --rounds "
                          f"{args.rounds} --out {args.out}")
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


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
    rec = compare_builds(args.model, args.batch, args.rounds, args.isa,
                         {"int64": int64_only, "int32": contextlib.nullcontext})
    med, load, forms = rec["median_ms"], rec["load"], rec["epilogues"]
    print(f"{args.model} batch {args.batch} isa {args.isa}: int64 epilogue {med['int64']:.3f} ms,"
          f" int32 where planned {med['int32']:.3f} ms, x{med['int64'] / med['int32']:.3f} "
          f"(thread CPU time, median of {args.rounds} rounds of {rec['reps']}; load "
          f"{load[0]:.1f} -> {load[1]:.1f}); both bit-exact")
    print(f"  layers per epilogue: int64 build {forms['int64']}, int32 build {forms['int32']}")
    if args.json:
        args.json.write_text(json.dumps({
            **{k: rec[k] for k in ("model", "batch", "isa", "median_ms", "rounds_ms",
                                   "epilogues", "load")},
            "command": "TVM_NUM_THREADS=1 python benchmarks/latency/epilogue_ab.py "
                       f"--model {args.model} --batch {args.batch} --isa {args.isa} "
                       f"--rounds {args.rounds}"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
