"""A/B of the AVX2 channel-lane kernels' register tile: one 8-channel block vs two.

Until 2026-12-04 ``conv2d.choose_tiles`` gave the ``vpmaddubsw`` kernels with P <= 2 and the
int16 (``avx2_s16``) kernels two output-channel blocks per register tile whenever the layer has
more than 8 output channels; with an odd block count (a pruned 23 -> 3 blocks, 40 -> 5) that pads
a whole block of zero-weight channels. Now they take two only where the block count is even
(one otherwise). This script builds each shape's kernel both ways (``before``: the old rule,
kept here; ``after``: :func:`conv2d.choose_tiles`), compiles for ``mcpu=haswell`` and times
the compiled PrimFunc by thread CPU time over interleaved rounds (``kernels_avx2_ab.time_calls``),
checking that both give the same codes.

With ``--model``, a committed DJPQ-trained model end to end instead (``epilogue_ab.compare_builds``:
both builds bit-exact against the integer reference, the VM's ``main`` timed alternately).

Usage (pause other jobs first; one thread):
  TVM_NUM_THREADS=1 python benchmarks/latency/tiles_ab.py --rounds 7 \
      --out benchmarks/latency/tiles_ab.json
  TVM_NUM_THREADS=1 python benchmarks/latency/tiles_ab.py --model mobilenetv2 --batch 32 \
      --isa avx2 --rounds 15 --out benchmarks/latency/tiles_ab_mobilenetv2_avx2.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_avx2_ab as ab  # noqa: E402

from djpq_compiler.backends.tvm.kernels import conv2d  # noqa: E402
from djpq_compiler.backends.tvm.kernels.conv2d import ConvKernelSpec  # noqa: E402

_CHOOSE_TILES = conv2d.choose_tiles


def before_tiles(spec: ConvKernelSpec) -> tuple[int, int]:
    """The rule of ``choose_tiles`` before this change for the AVX2 dense kernels (``ubsw``,
    ``wd``); the other kinds' rules did not change."""
    if spec.depthwise or spec.kind not in ("ubsw", "wd"):
        return _CHOOSE_TILES(spec)
    tile_oc = 2 if (spec.kind == "wd" or spec.groups <= 2) and spec.out_channels > 8 else 1
    return conv2d.width_tile(spec.out_size[1], 7 if tile_oc == 1 else 5), tile_oc


def build(spec: ConvKernelSpec, w_max: int) -> tuple[Any, Any]:
    """Compile ``spec``'s kernel (NCHW u8 in and out) under the current tile rule; (call, output
    getter). The data are drawn per real channel and zero-padded to the kernel's channel
    count, so both tile rules see the same layer."""
    import tvm

    func, (_, tile_oc) = conv2d.build_conv_kernel(spec)
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=tvm.target.Target(ab.TARGET))
    rng = np.random.default_rng(0)
    n, c, oc = spec.batch, spec.in_channels, spec.out_channels
    x = rng.integers(0, 256, (n, c, spec.height, spec.width)).astype(spec.in_dtype)
    weight = rng.integers(-w_max, w_max + 1, (oc, c) + spec.kernel)
    size = spec.out_blocks(tile_oc) * spec.oc_lanes

    def padded(values: np.ndarray, dtype: str) -> np.ndarray:
        out = np.zeros(size, dtype)
        out[:oc] = values
        return out

    bias = padded(rng.integers(-500, 500, oc), "int32")
    mult = padded(rng.integers(2**29, 2**30, oc), spec.mult_dtype)
    arrays = [x, conv2d.pack_weight(weight, spec, tile_oc), bias, mult,
              np.full(size, 2**37, "int64"), np.full(size, 38, "int64"),
              np.zeros((n, oc) + spec.out_size, spec.out_dtype)]
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
    fn = lib["main"]
    return (lambda: fn(*args)), (lambda: args[-1].numpy())


@contextlib.contextmanager
def old_rule() -> Iterator[None]:
    """Kernels built inside use :func:`before_tiles` (``emit``'s per-process memo of scheduled
    kernels is emptied on entry and exit, so no kernel crosses between the rules)."""
    from djpq_compiler.backends.tvm.kernels import emit

    new = conv2d.choose_tiles
    conv2d.choose_tiles = before_tiles
    emit._kernel.cache_clear()
    try:
        yield
    finally:
        conv2d.choose_tiles = new
        emit._kernel.cache_clear()


#: (name, batch, in, hw, out, kind, P, max|w|): pruned odd and even channel counts, P = 1 / 2
#: (6-7-bit weights at 8-bit activations, or P lowered for channel padding), int16 (W8A8).
SHAPES = [
    ("pruned 19->23 14x14 P1", 1, 19, 14, 23, "ubsw", 1, 7),
    ("pruned 32->24 14x14 P2", 1, 32, 14, 24, "ubsw", 2, 7),
    ("pruned 64->40 28x28 P2", 1, 64, 28, 40, "ubsw", 2, 7),
    ("pruned 12->40 14x14 P1 b32", 32, 12, 14, 40, "ubsw", 1, 7),
    ("7->13 28x28 P2 b32", 32, 7, 28, 13, "ubsw", 2, 7),
    ("16->16 28x28 P2", 1, 16, 28, 16, "ubsw", 2, 7),
    ("32->32 14x14 P1", 1, 32, 14, 32, "ubsw", 1, 7),
    ("64->64 56x56 P2", 1, 64, 56, 64, "ubsw", 2, 7),
    ("128->128 28x28 P1", 1, 128, 28, 128, "ubsw", 1, 7),
    ("W8A8 20->20 14x14", 1, 20, 14, 20, "wd", 1, 127),
    ("W8A8 64->40 28x28", 1, 64, 28, 40, "wd", 1, 127),
    ("W8A8 64->64 28x28", 1, 64, 28, 64, "wd", 1, 127),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="")
    ap.add_argument("--model", choices=("vgg7", "resnet20", "mobilenetv2"), default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--isa", choices=("native", "avx2"), default="avx2")
    args = ap.parse_args()
    if args.model:
        return _model_ab(args)
    rows: list[dict[str, Any]] = []
    for name, n, c, hw, oc, kind, p, w_max in SHAPES:
        spec = ab._spec(n, c, hw, oc, 3, 1, kind, p, in_lanes=0, out_lanes=0)
        calls, outs, tiles = {}, {}, {}
        for label, ctx in (("before", old_rule), ("after", contextlib.nullcontext)):
            with ctx():
                tiles[label] = conv2d.choose_tiles(spec)
                calls[label], outs[label] = build(spec, w_max)
        secs = ab.time_calls(calls, args.rounds)
        for fn in calls.values():
            fn()
        same = bool(np.array_equal(outs["before"](), outs["after"]()))
        gmac = {k: ab.macs(spec) / v / 1e9 for k, v in secs.items()}
        rows.append({"shape": name, "tiles_before": tiles["before"],
                     "tiles_after": tiles["after"], "gmacs_before": round(gmac["before"], 1),
                     "gmacs_after": round(gmac["after"], 1),
                     "speedup": round(secs["before"] / secs["after"], 3), "same_codes": same})
        print(f"{name:28s} {tiles['before']} -> {tiles['after']}: {gmac['before']:6.1f} -> "
              f"{gmac['after']:6.1f} GMAC/s ({secs['before'] / secs['after']:.2f}x), same codes: "
              f"{same}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
            "command": "TVM_NUM_THREADS=1 python benchmarks/latency/tiles_ab.py "
                       f"--rounds {args.rounds} --out {args.out}",
            "target": ab.TARGET, "rows": rows}, indent=1) + "\n")
    return 0


def _model_ab(args: argparse.Namespace) -> int:
    from epilogue_ab import model_ab

    return model_ab("tiles_ab.py", args, {"before": old_rule, "after": contextlib.nullcontext})


if __name__ == "__main__":
    raise SystemExit(main())
