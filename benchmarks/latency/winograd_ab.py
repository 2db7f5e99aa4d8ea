"""A/B of the Winograd kernels end to end: a network built with and without them.

``avx2_wino4_s16`` (F(4x4, 3x3)) and ``avx2_wino_s16`` (F(2x2, 3x3), ``kernels/winograd.py``)
replace the channel-lane kernels on 3x3 stride-1 layers (``select.winograd``). The DJPQ-trained
reference nets have no layer either takes (28x28 inputs, 16-64 channels), so this builds
``run.resnet18_pruned`` (torchvision resnet18 at 224, half of every gate group closed, seeded) at
W4A8 (``--w-bits 4``, first conv and fc W8A8) or W8A8 (``--w-bits 8``) three ways: without
Winograd (``select.WINOGRAD_MIN_OUT`` past any output: the kernels those layers had before),
with F(2x2, 3x3) only (F(4x4, 3x3)'s speed rule off) and as ``build`` does it; checks each
bit-exact against the integer reference and times the VMs' ``main`` alternately by thread CPU
time (``epilogue_ab.compare_converted``). Per-layer numbers: ``KERNELS_avx2_winograd*.md``,
``KERNELS_avx2_wino4_all*.md``.

Usage (pause other jobs first; one thread):
  TVM_NUM_THREADS=1 python benchmarks/latency/winograd_ab.py --batch 1 --isa avx2 --rounds 9 \
      --w-bits 8 --out benchmarks/latency/winograd_ab_resnet18_w8a8_avx2.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import epilogue_ab  # noqa: E402


@contextlib.contextmanager
def no_winograd() -> Iterator[None]:
    """Builds inside take the kernels the layers had before the Winograd kernel."""
    from djpq_compiler.backends.tvm.kernels import select

    with mock.patch.object(select, "WINOGRAD_MIN_OUT", 2**31):
        yield


@contextlib.contextmanager
def f2_only() -> Iterator[None]:
    """Builds inside take F(2x2, 3x3) where it applies, never F(4x4, 3x3)."""
    from djpq_compiler.backends.tvm.kernels import select

    with mock.patch.object(select, "_winograd4_replaces", lambda *_: False):
        yield


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--isa", choices=("native", "avx2"), default="avx2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--w-bits", type=int, choices=(4, 8), default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if os.environ.get("TVM_NUM_THREADS") != "1":
        print("warning: run at TVM_NUM_THREADS=1 (thread CPU time counts the calling thread)")
    sys.argv = sys.argv[:1]
    import run as latency  # noqa: PLC0415

    latency.force_isa(args.isa)
    info = latency.resnet18_pruned(args.seed, args.w_bits)
    model = "resnet18_w8a8" if args.w_bits == 8 else "resnet18"
    x = torch.randn(args.batch, *info["shape"], generator=torch.Generator().manual_seed(1))
    rec = epilogue_ab.compare_converted(info["converted"], x, args.rounds, "x86",
                                        {"no_winograd": no_winograd, "f2_only": f2_only,
                                         "winograd": contextlib.nullcontext})
    med = rec["median_ms"]
    print(f"{model} batch {args.batch} isa {args.isa}: without Winograd "
          f"{med['no_winograd']:.2f} ms, F(2x2, 3x3) only {med['f2_only']:.2f} ms, with both "
          f"{med['winograd']:.2f} ms, x{med['no_winograd'] / med['winograd']:.3f} / "
          f"x{med['f2_only'] / med['winograd']:.3f} (thread CPU time, median of "
          f"{args.rounds} rounds); all bit-exact; kernels {rec['variants']}")
    if args.out:
        rec.update({"model": model, "how": info["how"], "batch": args.batch,
                    "isa": args.isa,
                    "command": (f"TVM_NUM_THREADS=1 python benchmarks/latency/winograd_ab.py "
                                f"--batch {args.batch} --isa {args.isa} --rounds {args.rounds} "
                                f"--w-bits {args.w_bits} --out {args.out}")})
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
