"""A/B of the TVM build's compile steps on one DJPQ-trained model (issue #15).

Lowers the model once (written kernels included) and compiles it three ways: ``unfused``
(``tvm.compile`` on the module as lowered), ``fused`` (``adapter.fuse_module`` first) and
``fused+sched`` (also ``adapter.schedule_elementwise``: what ``build()`` does on CPU). Prints the
``call_tir`` counts, whether the written kernels' PrimFuncs survive fusion unchanged, whether each
build is bit-exact with the integer reference executor, and the median ms of ``--runs`` rounds
timed interleaved on one thread.

Usage:
  TVM_NUM_THREADS=1 python benchmarks/latency/fusion_ab.py --model resnet20 --batch 32 --runs 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", choices=("vgg7", "resnet20", "mobilenetv2"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()

    sys.argv = sys.argv[:1]  # run.py parses its own arguments only when it is __main__
    sys.path.insert(0, str(HERE))
    import run as latency  # noqa: PLC0415

    from djpq_compiler.backends.tvm import adapter
    from djpq_compiler.backends.tvm.build import target_spec
    from djpq_compiler.backends.tvm.emit import lower

    tvm = adapter.load_tvm()
    converted = latency.trained_model(args.model, HERE / "models")["converted"]
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(args.batch))
    with torch.no_grad():
        ref = converted(x).numpy()
    spec, _ = target_spec("x86")
    target = adapter.make_target(spec)
    mod, _ = lower(converted, [x], spec)
    fused = adapter.fuse_module(mod, target)
    legalized = adapter.fuse_module(mod, target, passes=("LegalizeOps",))
    print(f"call_tir in main: legalized {adapter.call_tir_count(legalized)}, "
          f"fused {adapter.call_tir_count(fused)}")
    kernels = [(gv.name_hint, f) for gv, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
               and int(f.attrs.get("op_pattern", -1)) == 8]
    scheduled = adapter.schedule_elementwise(fused, target)
    same = 0
    for name, func in kernels:
        tvm.ir.assert_structural_equal(scheduled[name], func)
        same += 1
    print(f"written kernels: {len(kernels)}, unchanged after fusion and schedule: {same}")

    variants = {"unfused": dict(fuse=False), "fused": dict(fuse=True, schedule=False),
                "fused+sched": dict(fuse=True, schedule=True)}
    vms = {}
    for name, kw in variants.items():
        t0 = time.perf_counter()
        exe = adapter.compile_module(mod, target, **kw)
        seconds = time.perf_counter() - t0
        vms[name] = adapter.make_vm(exe)
        exact = np.array_equal(adapter.run_vm(vms[name], [x.numpy()])[0], ref)
        print(f"{name:12s} compile {seconds:.1f} s, bit-exact {exact}")
    times: dict[str, list[float]] = {k: [] for k in vms}
    order = list(vms)
    for r in range(args.runs):
        for name in order[r % 3:] + order[: r % 3]:
            t0 = time.perf_counter()
            adapter.run_vm(vms[name], [x.numpy()])
            times[name].append(1e3 * (time.perf_counter() - t0))
    print("median ms: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
