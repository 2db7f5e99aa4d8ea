"""A/B of the pixels-in-lanes kernel (``avx2_px16``) against the channel-lane kernel the layer
would otherwise get, on one conv layer in the packed layout (``NCHW8c`` in and out, as inside a
model on AVX2), bit for bit and by thread CPU time, interleaved (issue 15).

Each layer is lowered through ``convert_conv2d`` for ``mcpu=haswell`` twice: with
``select.NARROW_MIN_GAIN`` 0 (every stride-1 u8s8 layer takes ``avx2_px16``, to measure it where
the rule would not choose it) and infinity (never). Random A4/W4 codes (``kernels.make_layer``).

Usage:
  TVM_NUM_THREADS=1 python benchmarks/latency/narrow_packed_ab.py --out benchmarks/latency
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import fx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import kernels as K  # noqa: E402

#: name, batch, C_in, HW, C_out, k, stride, pad, w_bits, a_bits (resnet20's pruned layers)
SHAPES = [("r20 s0 13->9", 32, 13, 28, 9), ("r20 s0 9->13", 32, 9, 28, 13),
          ("r20 s0 13->7", 32, 13, 28, 7), ("r20 s0 7->13", 32, 7, 28, 13),
          ("r20 s1 31->27 (14x14)", 32, 31, 14, 27), ("r20 s0 13->9 b1", 1, 13, 28, 9),
          ("r20 s0 9->13 b1", 1, 9, 28, 13)]


def build(s: K.Shape, layer: K.Layer, gain: float) -> tuple[Callable[[], Any], str]:
    """The layer on packed ``NCHW8c`` u8 input writing packed output; (call, variant)."""
    import tvm

    from djpq_compiler.backends.tvm import adapter
    from djpq_compiler.backends.tvm.converters import convert_conv2d
    from djpq_compiler.backends.tvm.emit import IntValue, Lowering
    from djpq_compiler.backends.tvm.kernels import select
    from djpq_compiler.backends.tvm.layout import Layout, LayoutPlan

    with mock.patch.object(select, "NARROW_MIN_GAIN", gain):
        root = torch.nn.Module()
        root.conv = K.int_module(s, layer)
        graph = fx.Graph()
        node = graph.call_module("conv", (graph.placeholder("x"),))
        graph.output(node)
        gm = fx.GraphModule(root, graph)
        bb = adapter.Builder()
        target = {"kind": "llvm", "mcpu": "haswell"}
        ctx = Lowering(gm, bb, target)
        ctx.plan = LayoutPlan(8, frozenset({"conv"}))
        blocks = -(-s.c_in // 8)
        param = bb.var("x", (s.batch, blocks, s.hw, s.hw, 8), "uint8")
        with bb.function("main", [param]):
            with bb.dataflow():
                ctx.env[next(iter(gm.graph.nodes))] = IntValue(param, 0, 2 ** s.a_bits - 1,
                                                               Layout(8, s.c_in))
                out = convert_conv2d(ctx, node)
                result = bb.emit_output([out.expr])  # type: ignore[union-attr]
            mod = bb.finish(result)
        vm = adapter.make_vm(adapter.compile_module(mod, adapter.make_target(target)))
    full = np.zeros((s.batch, blocks * 8, s.hw, s.hw), np.uint8)
    full[:, :s.c_in] = layer.x
    packed = np.ascontiguousarray(full.reshape(s.batch, blocks, 8, s.hw, s.hw)
                                  .transpose(0, 1, 3, 4, 2))
    arg = tvm.runtime.tensor(packed, tvm.cpu())
    fn = vm["main"]
    return (lambda: fn(arg)), ctx.kernels[0].variant


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for name, batch, c_in, hw, c_out in SHAPES:
        s = K.Shape(name, batch, c_in, hw, c_out, 3, 1, 1, 4, 4)
        layer = K.make_layer(s)
        new, new_variant = build(s, layer, 0.0)
        old, old_variant = build(s, layer, float("inf"))
        equal = bool(np.array_equal(new().numpy(), old().numpy()))
        start = time.thread_time()
        new()
        reps = max(3, int(0.03 / max(time.thread_time() - start, 1e-6)))
        times: dict[str, list[float]] = {"new": [], "old": []}
        for r in range(args.rounds):
            for key in ("new", "old") if r % 2 else ("old", "new"):
                fn = new if key == "new" else old
                start = time.thread_time()
                for _ in range(reps):
                    fn()
                times[key].append((time.thread_time() - start) / reps)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        from djpq_compiler.backends.tvm.kernels.select import _lane_work, _narrow_work

        shape = (c_out, c_in, 3, 3)
        p = int(old_variant.rsplit("_p", 1)[1])
        row = {"layer": name, "batch": batch, "macs": s.macs, "new_variant": new_variant,
               "old_variant": old_variant, "bit_equal": equal, "new_ms": med["new"],
               "old_ms": med["old"], "x_old": med["old"] / med["new"],
               "work_ratio": _lane_work(shape, p) / _narrow_work(shape, hw, 1),
               "new_gmacs": s.macs / med["new"] / 1e6, "old_gmacs": s.macs / med["old"] / 1e6}
        rows.append(row)
        print(f"{name:24s} {new_variant} {med['new']:.3f} ms  {old_variant} {med['old']:.3f} ms"
              f"  x_old {row['x_old']:.2f}  work ratio {row['work_ratio']:.2f}  equal {equal}",
              flush=True)
    if args.out:
        meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                "command": "TVM_NUM_THREADS=1 python benchmarks/latency/narrow_packed_ab.py "
                           + " ".join(sys.argv[1:])}
        (Path(args.out) / "narrow_packed_ab.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
