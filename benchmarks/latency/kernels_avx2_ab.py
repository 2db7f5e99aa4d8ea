"""A/B timing of written conv kernels on an AVX2 (haswell) target, one thread, interleaved.

Builds the scheduled PrimFunc of :func:`conv2d.build_conv_kernel` for a few layer shapes of the
benchmarked models at batch 32, compiles it for ``mcpu=haswell`` and times the compiled function
itself (no Relax VM) by thread CPU time over interleaved rounds, once per *variant*: a variant
is a name and a context manager that changes how the kernel is built (``VARIANTS``), so the
same process times before and after a change under the same load. Prints GMAC/s per shape and
variant, the ratio to the first variant, and whether every variant's output equals the first's.

Usage:
  TVM_NUM_THREADS=1 python benchmarks/latency/kernels_avx2_ab.py --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from djpq_compiler.backends.tvm.kernels import conv2d
from djpq_compiler.backends.tvm.kernels.conv2d import ConvKernelSpec, pack_weight

HASWELL = {"kind": "llvm", "mcpu": "haswell"}
#: The target the kernels are compiled for (``--mcpu``).
TARGET: dict[str, str] = dict(HASWELL)


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer: ``(name, spec, max|w|)``."""

    name: str
    spec: ConvKernelSpec
    w_max: int


def _spec(n: int, c: int, hw: int, oc: int, k: int, s: int, kind: str, groups: int,
          in_lanes: int = 8, out_lanes: int = 8, acc: str = "int32") -> ConvKernelSpec:
    return ConvKernelSpec(n, c, hw, hw, oc, (k, k), (s, s), (k // 2, k // 2), (1, 1), kind,
                          groups, "uint8", 0, 0, "uint8", 0, 255, "int32", in_lanes, out_lanes,
                          acc)


CASES = [
    Case("stem 1->16 28 P1", _spec(32, 1, 28, 16, 3, 1, "ubsw", 1, in_lanes=0), 62),
    Case("b1 stem 1->16 28 P1", _spec(1, 1, 28, 16, 3, 1, "ubsw", 1, in_lanes=0), 62),
    Case("b1 vgg7 3x3 16->16 28", _spec(1, 16, 28, 16, 3, 1, "ubsw", 4), 15),
    Case("b1 vgg7 3x3 64->64 7", _spec(1, 64, 7, 64, 3, 1, "ubsw", 4), 15),
    Case("stem 1->16 28 P2", _spec(32, 1, 28, 16, 3, 1, "ubsw", 2, in_lanes=0), 31),
    Case("stem 1->16 28 P4", _spec(32, 1, 28, 16, 3, 1, "ubsw", 4, in_lanes=0), 15),
    Case("r20 3x3 11->16 28 P4", _spec(32, 11, 28, 16, 3, 1, "ubsw", 4), 7),
    Case("r20 3x3 11->16 28 P1", _spec(32, 11, 28, 16, 3, 1, "ubsw", 1), 7),
    Case("mbv2 dw 61 s2 28", _spec(32, 61, 28, 61, 3, 2, "dw8", 1, acc="int16"), 7),
    Case("mbv2 dw 128 7", _spec(32, 128, 7, 128, 3, 1, "dw8", 1, acc="int16"), 7),
    Case("mbv2 dw 61 s2 28 dw16", _spec(32, 61, 28, 61, 3, 2, "dw16", 1, in_lanes=16,
                                         out_lanes=16, acc="int16"), 7),
    Case("mbv2 dw 128 7 dw16", _spec(32, 128, 7, 128, 3, 1, "dw16", 1, in_lanes=16,
                                      out_lanes=16, acc="int16"), 7),
    Case("mbv2 1x1 16->61 28", _spec(32, 16, 28, 61, 1, 1, "ubsw", 4, in_lanes=8), 7),
    Case("mbv2 1x1 61->24 14", _spec(32, 61, 14, 24, 1, 1, "ubsw", 2), 7),
    Case("mbv2 1x1 16->61 28 signed P4",
         dataclasses.replace(_spec(32, 16, 28, 61, 1, 1, "ubsw", 4), act_offset=128), 7),
    Case("mbv2 1x1 16->61 28 signed P2",
         dataclasses.replace(_spec(32, 16, 28, 61, 1, 1, "ubsw", 2), act_offset=128), 7),
    Case("r20 3x3 13->9 28", _spec(32, 13, 28, 9, 3, 1, "ubsw", 4), 7),
    Case("r20 3x3 13->9 28 in16", _spec(32, 13, 28, 9, 3, 1, "ubsw", 4, in_lanes=16), 7),
    Case("r20 3x3 13->9 28 P2", _spec(32, 13, 28, 9, 3, 1, "ubsw", 2), 7),
    Case("r20 3x3 7->13 28", _spec(32, 7, 28, 13, 3, 1, "ubsw", 4), 7),
    Case("r20 3x3 7->13 28 P2", _spec(32, 7, 28, 13, 3, 1, "ubsw", 2), 7),
    Case("vgg7 3x3 32->32 14", _spec(32, 32, 14, 32, 3, 1, "ubsw", 4), 7),
    Case("r20 1x1 s2 31->64 14", _spec(32, 31, 14, 64, 1, 2, "ubsw", 2), 15),
    Case("r20 3x3 64->64 7", _spec(32, 64, 7, 64, 3, 1, "ubsw", 4), 7),
    Case("r20 3x3 31->28 14", _spec(32, 31, 14, 28, 3, 1, "ubsw", 4), 7),
]

#: name -> context manager factory; the first is the reference.
def _patched(**values: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A variant that sets module attributes of ``conv2d`` while the kernel is built."""
    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        old = {k: getattr(conv2d, k) for k in values}
        for k, v in values.items():
            setattr(conv2d, k, v)
        try:
            yield
        finally:
            for k, v in old.items():
                setattr(conv2d, k, v)
    return ctx


def _split(spec: ConvKernelSpec) -> ConvKernelSpec:
    return dataclasses.replace(spec, split_shift=True)


def _same(spec: ConvKernelSpec) -> ConvKernelSpec:
    return spec


Variant = tuple[Callable[[ConvKernelSpec], ConvKernelSpec],
                Callable[[], contextlib.AbstractContextManager[Any]]]
def _im2col(spec: ConvKernelSpec) -> ConvKernelSpec:
    return dataclasses.replace(spec, split_shift=True, im2col=True)


def _bias_in_round(spec: ConvKernelSpec) -> ConvKernelSpec:
    return dataclasses.replace(spec, split_shift=True, bias_in_round=True,
                               im2col=conv2d.im2col_pays(spec))


#: Every variant this harness knows; ``--variants`` picks (the first is the reference).
ALL_VARIANTS: dict[str, Variant] = {
    "before": (_same, _patched(BATCH_OUTER_MIN=10**9)),  # before commit 693b2c2
    "batch_outer": (_same, _patched(BATCH_OUTER_MIN=2)),
    "split_shift": (_split, _patched(BATCH_OUTER_MIN=10**9)),
    "both": (_split, _patched(BATCH_OUTER_MIN=2)),  # commit 693b2c2
    "im2col": (_im2col, _patched(BATCH_OUTER_MIN=2)),  # commit 6fd5277 (for the stems)
    "bias_in_round": (_bias_in_round, _patched(BATCH_OUTER_MIN=2)),
}


def _to_vnni(spec: ConvKernelSpec) -> ConvKernelSpec:
    """The same layer as an AVX-512 kernel: ``vnni`` (P = 1) or ``dw16``, 16-lane layouts."""
    kind = "dw16" if spec.depthwise else "vnni"
    lanes = 16 if spec.in_lanes else 0
    return dataclasses.replace(spec, kind=kind, groups=1, in_lanes=lanes,
                               out_lanes=16 if spec.out_lanes else 0)


def macs(spec: ConvKernelSpec) -> int:
    oh, ow = spec.out_size
    kh, kw = spec.kernel
    per = 1 if spec.depthwise else spec.in_channels
    return spec.batch * spec.out_channels * oh * ow * kh * kw * per


def build(case: Case, spec: ConvKernelSpec) -> tuple[Callable[[], Any], Callable[[], np.ndarray]]:
    """Compile ``case`` as ``spec`` under the current variant; (call, output getter)."""
    import tvm

    func, (tile_w, tile_oc) = conv2d.build_conv_kernel(spec)
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=tvm.target.Target(TARGET))
    rng = np.random.default_rng(0)
    n, c, h, w = spec.batch, spec.in_channels, spec.height, spec.width
    lanes = spec.in_lanes
    x = rng.integers(0, 32, (n, -(-c // lanes), h, w, lanes) if lanes else (n, c, h, w))
    weight = rng.integers(-case.w_max, case.w_max + 1,
                          (spec.out_channels, 1 if spec.depthwise else c) + spec.kernel)
    size = spec.out_blocks(tile_oc) * spec.oc_lanes
    oh, ow = spec.out_size
    ol = spec.out_lanes
    out_shape = (n, -(-spec.out_channels // ol), oh, ow, ol) if ol else (n, spec.out_channels,
                                                                         oh, ow)
    bias = rng.integers(-500, 500, size).astype("int32")
    mult = rng.integers(2**29, 2**30, size).astype(spec.mult_dtype)
    rnd = np.full(size, 2**37, "int64")
    if spec.bias_in_round:
        rnd = rnd + bias.astype(np.int64) * mult
    arrays = [x.astype(spec.in_dtype), pack_weight(weight, spec, tile_oc), bias, mult, rnd,
              np.full(size, 6, "int32") if spec.split_shift else np.full(size, 38, "int64"),
              np.zeros(out_shape, spec.out_dtype)]
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
    fn = lib["main"]
    return (lambda: fn(*args)), (lambda: args[-1].numpy())


def time_calls(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median thread-CPU seconds per call, interleaved rounds of ~0.2 s each."""
    reps = {}
    for k, fn in calls.items():
        fn()
        t = time.thread_time()
        fn()
        reps[k] = max(3, min(200, int(0.2 / max(time.thread_time() - t, 1e-6))))
    out: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t = time.thread_time()
            for _ in range(reps[k]):
                calls[k]()
            out[k].append((time.thread_time() - t) / reps[k])
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="", help="substring of the case names to run")
    ap.add_argument("--variants", default="before,batch_outer,split_shift,both",
                    help=f"comma-separated, from {', '.join(ALL_VARIANTS)}")
    ap.add_argument("--mcpu", default="haswell",
                    help="LLVM CPU (haswell: AVX2; e.g. cascadelake with --vnni)")
    ap.add_argument("--vnni", action="store_true",
                    help="time the cases as avx512_vnni / avx512_dw16 kernels (16 lanes)")
    args = ap.parse_args()
    TARGET["mcpu"] = args.mcpu
    variants = {k: ALL_VARIANTS[k] for k in args.variants.split(",")}
    print(f"load {os.getloadavg()}")
    for case in CASES:
        if args.only and args.only not in case.name:
            continue
        if args.vnni:
            case = dataclasses.replace(case, spec=_to_vnni(case.spec))
        calls, outs = {}, {}
        for name, (transform, ctx) in variants.items():
            with ctx():
                try:
                    calls[name], outs[name] = build(case, transform(case.spec))
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"  {case.name}: {name} failed: {type(exc).__name__}: {exc}")
        secs = time_calls(calls, args.rounds)
        ref = next(iter(calls))
        refout = outs[ref]()
        for name, s in secs.items():
            same = np.array_equal(outs[name](), refout)
            print(f"{case.name:24s} {name:14s} {s * 1e3:8.3f} ms {macs(case.spec) / s / 1e9:7.1f} "
                  f"GMAC/s  x{secs[ref] / s:5.2f}  same={same}")
    print(f"load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
