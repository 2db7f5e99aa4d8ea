"""A/B of the written grouped-conv kernels against TVM's generic lowering, on ResNeXt-50.

ResNeXt-50 32x4d's 3x3 convs have 32 groups of 4-32 channels: before 2026-12-04 no written
kernel took them (per-group kernels needed <= 16 groups of >= 4 -> 8 channels), so TVM's
generic lowering ran them. Now narrow or numerous groups are merged block-diagonally
(``select.merge_groups``) and every group runs in one kernel whose batch is the images x groups
(``ConvKernelSpec.conv_groups``). This script builds the same converted model (as
``first_call.py`` makes it: torchvision weights at random init, prepared and converted with
mixed bits) three times in one process: ``generic`` with grouped convs sent to the generic
lowering (the code before the change, for these layers), ``narrowest_merge`` with groups merged
only as far as the kernels need (not to fill the packed layout's lane blocks: the rule before
2026-12-04 23:10 UTC) and ``written`` as ``build()`` makes it; checks each
bit-exact against the integer reference and times them alternately (thread CPU time, one TVM
thread: ``epilogue_ab.compare_converted``).

Usage (pause other jobs first):
  TVM_NUM_THREADS=1 python benchmarks/latency/grouped_ab.py --isa avx2 \\
      --out benchmarks/latency/grouped_ab_resnext50_avx2.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@contextlib.contextmanager
def generic_grouped() -> Iterator[None]:
    """Builds inside send every grouped (non-depthwise) conv to TVM's generic lowering."""
    from djpq_compiler.backends.tvm.kernels import select

    saved = select.MIN_GROUP_IN, select.MAX_MERGE
    select.MIN_GROUP_IN, select.MAX_MERGE = 10**9, 1  # no group wide enough, no merge
    try:
        yield
    finally:
        select.MIN_GROUP_IN, select.MAX_MERGE = saved


@contextlib.contextmanager
def narrowest_merge() -> Iterator[None]:
    """Builds inside merge groups only as far as the kernels need (``select.merge_factor``
    without the lane-filling step: the rule before 2026-12-04 23:10 UTC)."""
    from djpq_compiler.backends.tvm.kernels import select

    saved = select.LANE_MERGE_EXTRA
    select.LANE_MERGE_EXTRA = 0
    try:
        yield
    finally:
        select.LANE_MERGE_EXTRA = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnext50_32x4d")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--isa", choices=("native", "avx2"), default="avx2")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    argv, sys.argv = sys.argv, sys.argv[:1]
    import first_call  # noqa: PLC0415
    from epilogue_ab import compare_converted  # noqa: PLC0415

    sys.argv = argv
    converted, x = first_call.converted_model(args.model, args.size, batch=args.batch)
    target = "x86-avx2" if args.isa == "avx2" else "x86"
    rec = compare_converted(converted, x, args.rounds, target,
                            {"generic": generic_grouped, "narrowest_merge": narrowest_merge,
                             "written": contextlib.nullcontext})
    med = rec["median_ms"]
    print(f"{args.model} at {args.size}, batch {args.batch}, {target}: grouped convs generic "
          f"{med['generic']:.3f} ms, written with the narrowest merge "
          f"{med['narrowest_merge']:.3f} ms (x{med['generic'] / med['narrowest_merge']:.2f}), "
          f"written as built {med['written']:.3f} ms "
          f"(x{med['generic'] / med['written']:.2f}) (thread CPU time, median of {args.rounds} "
          f"rounds of {rec['reps']}; load {rec['load'][0]:.1f} -> {rec['load'][1]:.1f}); both "
          f"bit-exact; kernels {rec['variants']}")
    if args.out:
        rec.update(model=args.model, size=args.size, batch=args.batch, target=target,
                   command="TVM_NUM_THREADS=1 python benchmarks/latency/grouped_ab.py "
                           f"--model {args.model} --size {args.size} --batch {args.batch} "
                           f"--isa {args.isa} --rounds {args.rounds} --out {args.out}")
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
