"""The written lane-wise chain kernels alone: int32 steps vs the same kernel all in int64.

Takes the chains of a committed DJPQ-trained model (``lower()``'s ``eltwise`` records), builds
each chain's kernel twice (``int32=True``: the split multipliers of ``kernels/eltwise.py``;
``int32=False``: every step in int64, the reference's arithmetic, same schedule) for the host's
CPU and for AVX2 (``mcpu=haswell``: no AVX-512, so int64 multiplies are emulated), checks both
bit-exact against the reference arithmetic on random codes of the leaves' ranges, and times them
alternately (one thread), summed over the model's chains.

Usage:
  TVM_NUM_THREADS=1 python benchmarks/latency/eltwise_kernels.py --model resnet20 --batch 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _inputs(tree: Any, size: int, seed: int) -> list[np.ndarray]:
    from djpq_compiler.backends.tvm.kernels.eltwise import leaves_of

    gen = np.random.default_rng(seed)
    leaves = sorted({leaf.index: leaf for leaf in leaves_of(tree)}.values(),
                    key=lambda leaf: leaf.index)
    return [gen.integers(leaf.lo, leaf.hi + 1, size).astype(leaf.dtype) for leaf in leaves]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", choices=("vgg7", "resnet20", "mobilenetv2"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()

    sys.argv = sys.argv[:1]
    sys.path.insert(0, str(HERE))
    import run as latency  # noqa: PLC0415
    import tvm  # noqa: PLC0415

    from djpq_compiler.backends.tvm import adapter
    from djpq_compiler.backends.tvm.build import target_spec
    from djpq_compiler.backends.tvm.emit import container_dtype, lower
    from djpq_compiler.backends.tvm.kernels.eltwise import (
        build_chain_kernel,
        reference_eval,
        value_range,
    )

    load_before = os.getloadavg()
    converted = latency.trained_model(args.model, HERE / "models")["converted"]
    x = torch.randn(args.batch, 1, 28, 28)
    records = lower(converted, [x], target_spec("x86")[0])[1].eltwise
    dev = tvm.cpu()
    targets = {"host": {"kind": "llvm", "mcpu": adapter.system_cpu()},
               "avx2": {"kind": "llvm", "mcpu": "haswell"}}
    funcs: dict[tuple[str, bool], list[Any]] = {}
    data = []
    for i, rec in enumerate(records):
        inputs = [a.reshape(rec.shape) for a in _inputs(rec.tree, rec.elements, i)]
        out_dtype = container_dtype(*value_range(rec.tree))
        want = reference_eval(rec.tree, inputs)
        tensors = [tvm.runtime.tensor(a, dev) for a in inputs]
        tensors.append(tvm.runtime.tensor(np.zeros(rec.shape, out_dtype), dev))
        data.append(tensors)
        for tname, spec in targets.items():
            target = adapter.make_target(spec)
            for int32 in (True, False):
                func = build_chain_kernel(rec.tree, rec.shape, out_dtype, target, int32)
                lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
                lib["main"](*tensors)
                if not np.array_equal(tensors[-1].numpy(), want):
                    print(f"NOT EXACT: {rec.name} {tname} int32={int32}")
                    return 1
                funcs.setdefault((tname, int32), []).append(lib["main"])
    times: dict[tuple[str, bool], list[float]] = {k: [] for k in funcs}
    for _ in range(args.runs):
        for key, fs in funcs.items():
            t0 = time.perf_counter()
            for f, tensors in zip(fs, data, strict=True):
                f(*tensors)
            times[key].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    print(f"{args.model} batch {args.batch}: {len(records)} chains, "
          f"{sum(r.elements for r in records):,} elements; all variants bit-exact; "
          f"{args.runs} interleaved rounds, TVM_NUM_THREADS="
          f"{os.environ.get('TVM_NUM_THREADS', 'unset')}, load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}")
    for (tname, int32), ts in times.items():
        print(f"  {tname:5s} {'int32 steps' if int32 else 'all int64  '}  median "
              f"{1e3 * statistics.median(ts):6.3f} ms  min {1e3 * min(ts):6.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
