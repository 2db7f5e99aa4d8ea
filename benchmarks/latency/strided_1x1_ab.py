"""A/B of strided 1x1 convs on packed input: read directly (P lowered) vs a pack stage (P = 4).

A 1x1 conv without padding on packed u8 input may read the ``NCHW{L}c`` blocks directly, with P
lowered so that ``4 * P`` channels fit a block (``select.fit_groups_to_lanes``: P = 2 on AVX2's
``NCHW8c``). Until 2026-12-04 23:25 UTC every such 1x1 did; now only stride-1 ones do
(``converters.DIRECT_READ_STRIDES``): at stride 2 the direct read uses every other pixel of each
packed row, and a pack stage that gathers the strided pixels keeps P = 4. This script builds each
layer both ways (``direct``: stride 2 allowed again; ``pack``: as ``build()`` does now), packed
``NCHW{L}c`` in and out as inside a network (``kernels.tvm_callable(..., packed=True)``), checks
that both give the same codes and times them by thread CPU time over interleaved rounds
(``kernels.time_interleaved``); with ``--model`` a committed DJPQ-trained model end to end
instead (``epilogue_ab.compare_builds``: both builds bit-exact against the integer reference).

Usage (pause other jobs first; one thread):
  TVM_NUM_THREADS=1 python benchmarks/latency/strided_1x1_ab.py --rounds 15 \\
      --out benchmarks/latency/strided_1x1_ab.json
  TVM_NUM_THREADS=1 python benchmarks/latency/strided_1x1_ab.py --model resnet20 --batch 32 \\
      --rounds 15 --out benchmarks/latency/strided_1x1_ab_resnet20_avx2.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import kernels  # noqa: E402

from djpq_compiler.backends.tvm import converters  # noqa: E402


@contextlib.contextmanager
def direct_strided() -> Iterator[None]:
    """Builds inside let strided 1x1 convs read packed input directly (the rule before)."""
    saved = converters.DIRECT_READ_STRIDES
    converters.DIRECT_READ_STRIDES = ((1, 1), (2, 2))
    try:
        yield
    finally:
        converters.DIRECT_READ_STRIDES = saved


#: 1x1 convs (W4A8) at stride 2 (resnet downsample shortcuts, pruned and not) and stride 1
#: (unchanged by the rule: a control).
SHAPES = [
    kernels.Shape("r18 down 1x1 s2", 1, 128, 28, 256, 1, 2, 0, 4),
    kernels.Shape("1x1 s2 64->128 28", 1, 64, 28, 128, 1, 2, 0, 4),
    kernels.Shape("1x1 s2 32->64 28 b32", 32, 32, 28, 64, 1, 2, 0, 4),
    kernels.Shape("1x1 s2 16->32 28", 1, 16, 28, 32, 1, 2, 0, 4),
    kernels.Shape("pruned 1x1 s2 13->27 28 b32", 32, 13, 28, 27, 1, 2, 0, 4),
    kernels.Shape("1x1 s1 64->64 28 (control)", 1, 64, 28, 64, 1, 1, 0, 4),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default="")
    ap.add_argument("--mcpu", default="haswell")
    ap.add_argument("--model", choices=("resnet20",), default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--isa", choices=("native", "avx2"), default="avx2")
    args = ap.parse_args()
    if args.model:
        return _model_ab(args)
    rows: list[dict[str, Any]] = []
    for s in SHAPES:
        layer = kernels.make_layer(s)
        calls, variants = {}, {}
        for label, ctx in (("direct", direct_strided), ("pack", contextlib.nullcontext)):
            with ctx():
                calls[label], variants[label], _ = kernels.tvm_callable(
                    s, layer, True, args.mcpu, packed=True)
        same = bool(np.array_equal(kernels.nchw(calls["direct"](), s.c_out),
                                   kernels.nchw(calls["pack"](), s.c_out)))
        secs, _ = kernels.time_interleaved(calls, args.rounds, 0.03)
        gmac = {k: s.macs / v / 1e9 for k, v in secs.items()}
        rows.append({"shape": s.name, "variants": variants,
                     "gmacs": {k: round(v, 1) for k, v in gmac.items()},
                     "speedup": round(secs["direct"] / secs["pack"], 3), "same_codes": same})
        print(f"{s.name:30s} direct {variants['direct']} {gmac['direct']:6.1f} -> pack "
              f"{variants['pack']} {gmac['pack']:6.1f} GMAC/s "
              f"({secs['direct'] / secs['pack']:.2f}x), same codes: {same}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
            "command": "TVM_NUM_THREADS=1 python benchmarks/latency/strided_1x1_ab.py "
                       f"--rounds {args.rounds} --mcpu {args.mcpu} --out {args.out}",
            "mcpu": args.mcpu, "rows": rows}, indent=1) + "\n")
    return 0


def _model_ab(args: argparse.Namespace) -> int:
    from epilogue_ab import model_ab

    return model_ab("strided_1x1_ab.py", args,
                    {"direct": direct_strided, "pack": contextlib.nullcontext})


if __name__ == "__main__":
    raise SystemExit(main())
