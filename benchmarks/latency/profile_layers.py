"""Where the time of a TVM-built DJPQ model goes, per VM call (issue #15).

Builds one committed DJPQ-trained model (``models/*.pt``) with ``build()``, then times every
``call_tir`` / packed call the Relax VM makes (``VirtualMachine.set_instrument``: a timestamp
before and after each call) over ``--runs`` calls of ``main``, and sums them per category:

* ``conv:<variant>``: a written conv/linear kernel (``djpq_<variant>_<layer>``; these include
  their own pack of the NCHW input and unpack of the output);
* ``fused``: the fused elementwise chains (requantize, add, ReLU, clip, casts ...);
* ``pool``, ``layout``, ``other``: pooling, reshape/transpose-like calls, everything else
  (TVM's default-lowered remainder).

The instrument adds a Python call per VM call, so the shares are what matter; ``total`` is also
timed without it. Prints a table and optionally writes JSON.

Usage:
  TVM_NUM_THREADS=1 python benchmarks/latency/profile_layers.py --model resnet20 --batch 32
  TVM_NUM_THREADS=1 python benchmarks/latency/profile_layers.py --model resnet20 --batch 32 \
      --isa avx2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def category(symbol: str) -> str:
    """The profile category of a VM call symbol."""
    if symbol.startswith("djpq_"):
        return "conv:" + symbol[5:].split("_", 2)[0] + "_" + symbol[5:].split("_", 2)[1]
    low = symbol.lower()
    if "pool" in low:
        return "pool"
    if any(k in low for k in ("reshape", "transpose", "permute", "layout", "flatten")):
        return "layout"
    if low.startswith("fused") or any(k in low for k in ("add", "clip", "cast", "shift",
                                                         "multiply", "maximum", "minimum")):
        return "fused"
    return "other:" + symbol


def profile(vm: Any, arr: Any, runs: int,
            counts: dict[str, int] | None = None,
            clock: Any = time.perf_counter) -> tuple[dict[str, float], dict[str, float], float]:
    """Per-symbol and per-category seconds per call of ``main``, and the instrumented total;
    ``counts`` (if given) receives the number of calls per symbol and call of ``main``.
    ``clock``: ``time.thread_time`` times the calling thread's CPU (at one TVM thread every
    kernel runs on it), unaffected by other processes holding the core."""
    starts: dict[str, float] = {}
    per_symbol: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        now = clock()
        if before:
            starts[symbol] = now
        else:
            per_symbol[symbol] += now - starts.pop(symbol)
            calls[symbol] += 1
        return 0

    vm.set_instrument(instrument)
    t0 = clock()
    for _ in range(runs):
        vm["main"](arr)
    total = (clock() - t0) / runs
    vm.set_instrument(None)
    symbols = {k: v / runs for k, v in per_symbol.items()}
    if counts is not None:
        counts.update({k: v // runs for k, v in calls.items()})
    cats: dict[str, float] = defaultdict(float)
    for k, v in symbols.items():
        cats[category(k)] += v
    return symbols, dict(cats), total


def kernel_rates(kernels: Any, symbols: dict[str, float], counts: dict[str, int]) -> str:
    """Per written-kernel symbol: calls, ms per call of ``main``, MACs per kernel call and
    GMAC/s (same-spec layers share one symbol, named after the first; MACs from that layer's
    record, which counts the whole batch)."""
    lines = ["  written kernels: calls, ms, GMAC/s, variant, layout in -> out, epilogue"]
    for choice in kernels:
        symbol = f"djpq_{choice.variant}_{choice.layer}"
        if symbol not in symbols:
            continue
        ms = symbols[symbol] * 1e3
        n = counts.get(symbol, 1)
        rate = choice.macs * n / (symbols[symbol] * 1e9) if symbols[symbol] else 0.0
        lines.append(f"    {choice.layer:40s} {n:2d} {ms:7.3f} {rate:7.1f}  {choice.variant} "
                     f"{choice.in_layout} -> {choice.out_layout}, {choice.epilogue}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20",
                    choices=("vgg7", "resnet20", "mobilenetv2", "resnet18"),
                    help="a committed DJPQ-trained model, or resnet18: run.py's pruned resnet18 "
                         "at 224 (seed 0)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--nchw", action="store_true",
                    help="layout planning off (NCHW between all layers; run.py's tvm_nchw)")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="the ISA the build targets (run.py's --isa: avx2 = an AVX2-only "
                         "haswell target, run on this CPU)")
    ap.add_argument("--cpu", action="store_true",
                    help="time with the thread's CPU clock (time.thread_time) instead of wall "
                         "time: robust to a loaded host at TVM_NUM_THREADS=1")
    ap.add_argument("--no-narrow", action="store_true",
                    help="build without the pixels-in-lanes kernel (avx2_px16: "
                         "select.NARROW_MIN_GAIN = inf)")
    args = ap.parse_args()

    sys.argv = sys.argv[:1]
    sys.path.insert(0, str(HERE))
    import run as latency  # noqa: PLC0415
    import tvm  # noqa: PLC0415

    from djpq_compiler.backends import tvm as tvm_backend

    latency.force_isa(args.isa)
    info = (latency.resnet18_pruned(0) if args.model == "resnet18"
            else latency.trained_model(args.model, HERE / "models"))
    converted = info["converted"]
    x = torch.randn(args.batch, *info["shape"],
                    generator=torch.Generator().manual_seed(args.batch))
    if args.nchw:
        compiled = latency.build_nchw(converted, x)
    elif args.no_narrow:
        compiled = latency.build_no_narrow(converted, x)
    else:
        compiled = tvm_backend.build(converted, "x86", example_inputs=(x,))
    vm = tvm.relax.VirtualMachine(compiled.executable, tvm.cpu())
    arr = tvm.runtime.tensor(x.numpy(), tvm.cpu())
    for _ in range(3):
        vm["main"](arr)
    clock = time.thread_time if args.cpu else time.perf_counter
    plain = []
    for _ in range(args.runs):
        t0 = clock()
        vm["main"](arr)
        plain.append(clock() - t0)
    counts: dict[str, int] = {}
    symbols, cats, total = profile(vm, arr, args.runs, counts, clock)
    steady = statistics.median(plain)
    what = (" (NCHW between layers)" if args.nchw else "") + (
        " (no avx2_px16)" if args.no_narrow else "") + (" [thread CPU time]" if args.cpu else "")
    print(f"{args.model} batch {args.batch}{what}: main {steady * 1e3:.2f} ms "
          f"(median of {args.runs}), "
          f"instrumented {total * 1e3:.2f} ms, in calls {sum(cats.values()) * 1e3:.2f} ms")
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} {v * 1e3:8.3f} ms  {100 * v / total:5.1f} %")
    print("  top calls:")
    for k, v in sorted(symbols.items(), key=lambda kv: -kv[1])[:15]:
        print(f"    {k:44s} {v * 1e3:8.3f} ms")
    print(kernel_rates(compiled.kernels, symbols, counts))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "batch": args.batch,
                                         "steady_ms": steady * 1e3, "instrumented_ms": total * 1e3,
                                         "categories_ms": {k: v * 1e3 for k, v in cats.items()},
                                         "calls_ms": {k: v * 1e3 for k, v in symbols.items()},
                                         "calls_per_main": counts},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
