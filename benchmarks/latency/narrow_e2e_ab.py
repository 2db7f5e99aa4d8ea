"""End-to-end A/B of the pixels-in-lanes kernels (issue 15): each committed DJPQ-trained model
built for the AVX2 target (``run.py --isa avx2``: ``avx2_px16``) or for this CPU (``--isa
native``: ``avx512_px16`` where it has AVX512-VNNI) with and without them
(``run.build_no_narrow``), both bit-exact with the integer reference, timed alone and
interleaved (alternating order every round), thread CPU time per call at one TVM thread.

``run.py --compare-no-narrow`` times the same two builds inside its full table, but there the
``tvm`` column always runs right after PyTorch in each round (its rotation keeps the cyclic
order), which cost it ~0.04 ms per call at batch 1 here even between identical builds; this
script times only the two TVM builds.

Usage:
  TVM_NUM_THREADS=1 python benchmarks/latency/narrow_e2e_ab.py --out benchmarks/latency
  TVM_NUM_THREADS=1 python benchmarks/latency/narrow_e2e_ab.py --isa native --out benchmarks/latency
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2,vgg7")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--isa", choices=("avx2", "native"), default="avx2",
                    help="avx2: the AVX2 kernels (mcpu=haswell); native: this CPU's")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    argv, sys.argv = sys.argv[1:], sys.argv[:1]
    sys.path.insert(0, str(HERE))
    import run as latency  # noqa: PLC0415

    from djpq_compiler.backends import tvm as tvm_backend

    if args.isa == "avx2":
        latency.force_isa("avx2")
    rows = []
    load = [os.getloadavg()[0]]
    for name in args.models.split(","):
        converted = latency.trained_model(name, HERE / "models")["converted"]
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                ref = converted(x)
            builds = {"narrow": tvm_backend.build(converted, "x86", example_inputs=(x,)),
                      "no_narrow": latency.build_no_narrow(converted, x)}
            exact = {k: bool(torch.equal(c(x), ref)) for k, c in builds.items()}
            variants = {k: dict(Counter(r.variant for r in c.kernels)) for k, c in builds.items()}
            fns = {k: latency.tvm_runner(c, x) for k, c in builds.items()}
            for fn in fns.values():
                fn()
            times: dict[str, list[float]] = {k: [] for k in fns}
            for r in range(args.rounds):
                for key in ("narrow", "no_narrow") if r % 2 else ("no_narrow", "narrow"):
                    start = time.thread_time()
                    fns[key]()
                    times[key].append((time.thread_time() - start) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"model": name, "batch": batch, "cpu_median_ms": med,
                   "speedup": med["no_narrow"] / med["narrow"], "bit_exact": exact,
                   "narrow_layers": sum(n for v, n in variants["narrow"].items()
                                        if v.endswith("_px16")),
                   "variants": variants}
            rows.append(row)
            print(f"{name} b{batch}: narrow {med['narrow']:.3f} ms, no_narrow "
                  f"{med['no_narrow']:.3f} ms, x{row['speedup']:.3f}, "
                  f"{row['narrow_layers']} pixels-in-lanes layers, exact {exact}", flush=True)
    load.append(os.getloadavg()[0])
    if args.out:
        meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                "command": "TVM_NUM_THREADS=1 python benchmarks/latency/narrow_e2e_ab.py "
                           + " ".join(argv), "loadavg_1min_before_after": load}
        out_name = "narrow_e2e_ab.json" if args.isa == "avx2" else "narrow_e2e_ab_native.json"
        (Path(args.out) / out_name).write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
