"""A/B of the Winograd kernel end to end: a W8A8 network built with and without it.

``avx2_wino_s16`` (``kernels/winograd.py``) replaces ``avx2_s16`` / ``avx2_u8s8_p1`` on 3x3
stride-1 layers of >= 28 channels (``select.winograd``). The DJPQ-trained reference nets have no
such layer (their 7-8-bit layers are stems and classifiers), so this builds
``run.resnet18_pruned`` at W8A8 (torchvision resnet18 at 224, half of every gate group closed,
seeded): once with Winograd disabled (``select.WINOGRAD_MIN_OUT`` past any output: the kernels
those layers had before) and once as ``build`` does it, checks both bit-exact against the
integer reference and times the VMs' ``main`` alternately by thread CPU time
(``epilogue_ab.compare_converted``). Per-layer numbers: ``KERNELS_avx2_winograd*.md``.

Usage (pause other jobs first; one thread):
  TVM_NUM_THREADS=1 python benchmarks/latency/winograd_ab.py --batch 1 --isa avx2 --rounds 9 \
      --out benchmarks/latency/winograd_ab_resnet18_w8a8_avx2.json
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--isa", choices=("native", "avx2"), default="avx2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if os.environ.get("TVM_NUM_THREADS") != "1":
        print("warning: run at TVM_NUM_THREADS=1 (thread CPU time counts the calling thread)")
    sys.argv = sys.argv[:1]
    import run as latency  # noqa: PLC0415

    latency.force_isa(args.isa)
    info = latency.resnet18_pruned(args.seed, 8)
    x = torch.randn(args.batch, *info["shape"], generator=torch.Generator().manual_seed(1))
    rec = epilogue_ab.compare_converted(info["converted"], x, args.rounds, "x86",
                                        {"no_winograd": no_winograd,
                                         "winograd": contextlib.nullcontext})
    med = rec["median_ms"]
    print(f"resnet18_w8a8 batch {args.batch} isa {args.isa}: without Winograd "
          f"{med['no_winograd']:.2f} ms, with {med['winograd']:.2f} ms, "
          f"x{med['no_winograd'] / med['winograd']:.3f} (thread CPU time, median of "
          f"{args.rounds} rounds); both bit-exact; kernels {rec['variants']}")
    if args.out:
        rec.update({"model": "resnet18_w8a8", "how": info["how"], "batch": args.batch,
                    "isa": args.isa,
                    "command": (f"TVM_NUM_THREADS=1 python benchmarks/latency/winograd_ab.py "
                                f"--batch {args.batch} --isa {args.isa} --rounds {args.rounds} "
                                f"--out {args.out}")})
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
