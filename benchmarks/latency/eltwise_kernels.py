"""The written lane-wise chain kernels alone: int32 steps vs all int64 vs the table form.

Takes the chains of a committed DJPQ-trained model (``lower()``'s ``eltwise`` records), builds
each chain's kernel three ways (``int32``: the split multipliers of ``kernels/eltwise.py``;
``int64``: every step in int64, the reference's arithmetic, same schedule; ``table``: one lookup
in the chain's table, ``build_table_kernel``) for the host's CPU and for AVX2 (``mcpu=haswell``:
no AVX-512, so int64 multiplies are emulated), checks each bit-exact against the reference
arithmetic on random codes of the leaves' ranges, and times them alternately (one thread,
thread CPU time), per chain and summed over the model's chains. ``chosen`` is the form
``chain_form`` picks for that target.

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
        build_table_kernel,
        chain_form,
        prefers_int32,
        reference_eval,
        tabulate,
        uses_gather,
        value_range,
    )

    load_before = os.getloadavg()
    converted = latency.trained_model(args.model, HERE / "models")["converted"]
    x = torch.randn(args.batch, 1, 28, 28)
    records = lower(converted, [x], target_spec("x86")[0])[1].eltwise
    dev = tvm.cpu()
    targets = {"host": {"kind": "llvm", "mcpu": adapter.system_cpu()},
               "avx2": {"kind": "llvm", "mcpu": "haswell"}}
    forms = ("int32", "int64", "table")
    funcs: dict[tuple[str, str], list[Any]] = {}
    chosen: dict[str, list[str]] = {t: [] for t in targets}
    data = []
    for i, rec in enumerate(records):
        inputs = [a.reshape(rec.shape) for a in _inputs(rec.tree, rec.elements, i)]
        out_dtype = container_dtype(*value_range(rec.tree))
        want = reference_eval(rec.tree, inputs)
        tensors = [tvm.runtime.tensor(a, dev) for a in inputs]
        out = tvm.runtime.tensor(np.zeros(rec.shape, out_dtype), dev)
        table = tvm.runtime.tensor(tabulate(rec.tree, out_dtype), dev)
        data.append({"int32": tensors + [out], "int64": tensors + [out],
                     "table": tensors + [table, out]})
        for tname, spec in targets.items():
            target = adapter.make_target(spec)
            chosen[tname].append(chain_form(rec.tree, out_dtype, prefers_int32(target),
                                            uses_gather(rec.tree, rec.shape, out_dtype, target)))
            for form in forms:
                func = (build_table_kernel(rec.tree, rec.shape, out_dtype, target)
                        if form == "table" else
                        build_chain_kernel(rec.tree, rec.shape, out_dtype, target,
                                           form == "int32"))
                lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
                lib["main"](*data[-1][form])
                if not np.array_equal(out.numpy(), want):
                    print(f"NOT EXACT: {rec.name} {tname} {form}")
                    return 1
                funcs.setdefault((tname, form), []).append(lib["main"])
    times: dict[tuple[str, str], list[list[float]]] = {k: [[] for _ in records] for k in funcs}
    for _ in range(args.runs):
        for (tname, form), fs in funcs.items():
            for j, (f, args_) in enumerate(zip(fs, data, strict=True)):
                t0 = time.thread_time()
                f(*args_[form])
                times[(tname, form)][j].append(time.thread_time() - t0)
    load_after = os.getloadavg()
    print(f"{args.model} batch {args.batch}: {len(records)} chains, "
          f"{sum(r.elements for r in records):,} elements; all forms bit-exact; "
          f"{args.runs} interleaved rounds, thread CPU time, TVM_NUM_THREADS="
          f"{os.environ.get('TVM_NUM_THREADS', 'unset')}, load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}")
    for tname in targets:
        print(f"\n{tname}: median ms per chain")
        print(f"  {'chain':44s} {'elements':>9s} " + " ".join(f"{f:>7s}" for f in forms)
              + "  chosen")
        for j, rec in enumerate(records):
            meds = [1e3 * statistics.median(times[(tname, f)][j]) for f in forms]
            print(f"  {rec.name[-44:]:44s} {rec.elements:9,d} "
                  + " ".join(f"{m:7.3f}" for m in meds) + f"  {chosen[tname][j]}")
        sums = {f: sum(1e3 * statistics.median(t) for t in times[(tname, f)]) for f in forms}
        best = sum(1e3 * statistics.median(times[(tname, c)][j])
                   for j, c in enumerate(chosen[tname]))
        print(f"  {'sum':44s} {'':9s} " + " ".join(f"{sums[f]:7.3f}" for f in forms)
              + f"  {best:.3f} (chosen forms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
