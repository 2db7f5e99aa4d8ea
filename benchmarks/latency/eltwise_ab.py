"""A/B of the fused lane-wise kernels (``backends/tvm/kernels/eltwise.py``), interleaved.

Builds one committed DJPQ-trained model in one process: ``A`` with the lane-wise ops
(``IntAdd``, ``Requantize``, ``IntClip``) emitted op by op as Relax int64 arithmetic and fused by
TVM (the code before the kernel; ``converters.chains_enabled`` patched off), ``B`` with the
written chain kernels (table, int32 or int64 forms as ``eltwise.chain_form`` picks for the
target), and ``B`` with each arithmetic form forced (no tables). Checks each bit-exact against
the integer reference, then times them alternately (A, B, ..., A, B, ...) and reports medians,
the time spent in the lane-wise calls of each (``VirtualMachine.set_instrument``) and the load
average before and after.

Usage:
  TVM_NUM_THREADS=1 python benchmarks/latency/eltwise_ab.py --model resnet20 --batch 32
  TVM_NUM_THREADS=1 python benchmarks/latency/eltwise_ab.py --model resnet20 --batch 32 \
      --isa avx2   # the AVX2 kernels (mcpu=haswell), where tables are chosen
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def _build(converted: Any, x: torch.Tensor, chains: bool, int32: bool | None = None) -> Any:
    """Build with the chain kernels off, on (their own table/int32/int64 choice) or on with
    the arithmetic form ``int32`` (True) or int64 (False) forced, no tables."""
    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.backends.tvm import converters
    from djpq_compiler.backends.tvm.kernels import eltwise

    saved = converters.chains_enabled, eltwise.prefers_int32, eltwise.chain_form
    if not chains:
        converters.chains_enabled = lambda ctx: False
    if int32 is not None:
        eltwise.prefers_int32 = lambda target: int32
        eltwise.chain_form = lambda *_: "int32" if int32 else "int64"
    try:
        return tvm_backend.build(converted, "x86", example_inputs=(x,))
    finally:
        converters.chains_enabled, eltwise.prefers_int32, eltwise.chain_form = saved


def _lanewise_ms(vm: Any, arr: Any, runs: int) -> dict[str, float]:
    """Milliseconds per call of ``main`` spent in each fused elementwise call (``fused*``)."""
    starts: dict[str, float] = {}
    spent: dict[str, float] = defaultdict(float)

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        now = time.perf_counter()
        if before:
            starts[symbol] = now
        else:
            spent[symbol] += now - starts.pop(symbol)
        return 0

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](arr)
    vm.set_instrument(None)
    return {k: 1e3 * v / runs for k, v in spent.items() if k.startswith("fused")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", choices=("vgg7", "resnet20", "mobilenetv2"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--calls", type=int, default=0, help="print the N slowest lane-wise calls")
    ap.add_argument("--table", action="store_true", help="print B's chain kernels and bounds")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: build for mcpu=haswell (run.py's --isa)")
    args = ap.parse_args()

    sys.argv = sys.argv[:1]
    sys.path.insert(0, str(HERE))
    import run as latency  # noqa: PLC0415
    import tvm  # noqa: PLC0415

    latency.force_isa(args.isa)
    load_before = os.getloadavg()
    converted = latency.trained_model(args.model, HERE / "models")["converted"]
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(args.batch))
    want = converted(x)
    builds = {"A (op by op, int64)": _build(converted, x, False),
              "B (chain kernels)": _build(converted, x, True),
              "B, int32 forced": _build(converted, x, True, True),
              "B, int64 forced": _build(converted, x, True, False)}
    for name, compiled in builds.items():
        tables = sum(r.table for r in compiled.eltwise)
        print(f"{name}: {len(compiled.eltwise)} chain kernels, {tables} of them tables")
    arr = tvm.runtime.tensor(x.numpy(), tvm.cpu())
    vms = {}
    for name, compiled in builds.items():
        got = compiled(x)
        exact = torch.equal(got.to(want.dtype), want)
        print(f"{name}: bit-exact vs reference: {exact}")
        if not exact:
            return 1
        vms[name] = tvm.relax.VirtualMachine(compiled.executable, tvm.cpu())
        for _ in range(3):
            vms[name]["main"](arr)
    times: dict[str, list[float]] = {name: [] for name in vms}
    for _ in range(args.runs):
        for name, vm in vms.items():
            t0 = time.perf_counter()
            vm["main"](arr)
            times[name].append(time.perf_counter() - t0)
    lanewise: dict[str, list[dict[str, float]]] = {name: [] for name in vms}
    for _ in range(max(args.runs // 5, 2)):
        for name, vm in vms.items():
            lanewise[name].append(_lanewise_ms(vm, arr, 5))
    load_after = os.getloadavg()
    print(f"{args.model} batch {args.batch}, --isa {args.isa}, TVM_NUM_THREADS="
          f"{os.environ.get('TVM_NUM_THREADS', 'unset')}, {args.runs} interleaved calls each, "
          f"load average before {load_before[0]:.2f}/{load_before[1]:.2f}, after "
          f"{load_after[0]:.2f}/{load_after[1]:.2f}")
    for name, ts in times.items():
        calls = lanewise[name]
        totals = [sum(c.values()) for c in calls]
        print(f"  {name:22s} main median {1e3 * statistics.median(ts):7.2f} ms  "
              f"(min {1e3 * min(ts):.2f})  lane-wise calls median {statistics.median(totals):.3f}"
              f" ms (min {min(totals):.3f}; {len(calls)} instrumented groups of 5 calls)")
        if args.calls:
            for sym in sorted(calls[0], key=lambda k: -calls[0][k])[:args.calls]:
                med = statistics.median(c[sym] for c in calls)
                print(f"      {med:7.3f} ms  {sym[:90]}")
    if args.table:
        from djpq_compiler.backends.tvm.build import target_spec
        from djpq_compiler.backends.tvm.emit import lower
        from djpq_compiler.backends.tvm.kernels.eltwise import eltwise_table

        print(eltwise_table(lower(converted, [x], target_spec("x86")[0])[1].eltwise))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
