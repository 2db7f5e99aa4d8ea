"""Layout conversions planned in a squeeze-excite / hardswish net, before vs after this code.

Prepares a torchvision net with random weights (``weights=None``), closes ~40 % of every gate
group at random (``djpq_compiler.testing.backend_zoo.pruned_converted``: odd pruned channel
counts), converts it, lowers it for the host's x86 target (``lower()``, no compilation) and
counts in the Relax module:

* ``unpack``: packed values turned back into NCHW (``permute_dims`` ``[0, 1, 4, 2, 3]``);
* ``pack``: small operands packed for a lane-wise op (``permute_dims`` ``[0, 1, 3, 4, 2]``,
  e.g. a squeeze-excite gate);
* written conv kernels reading NCHW input (each packs it inside) vs reading packed input;
* ops fused into the lane-wise chain kernels (``kernels/eltwise.py``; absent before).

Run it with each checkout's interpreter (the model and its conversion are the same code):

  python benchmarks/latency/eltwise_layout_count.py --model mobilenet_v3_small
  (cd /work/main && .venv/bin/python /path/to/eltwise_layout_count.py --model mobilenet_v3_small)

``--check`` also builds the net and compares it with the integer reference (bit-exact).
"""

from __future__ import annotations

import argparse
import re

import torch
import torchvision


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--check", action="store_true", help="build and compare bit-exact")
    args = ap.parse_args()

    from djpq_compiler.backends.tvm.build import target_spec
    from djpq_compiler.backends.tvm.emit import lower
    from djpq_compiler.testing.backend_zoo import pruned_converted, zoo_input

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None)
    x = zoo_input(args.model)
    converted = pruned_converted(model, x)[1]
    mod, ctx = lower(converted, [x], target_spec("x86")[0])
    text = mod.script()
    unpack = len(re.findall(r"R\.permute_dims\([^)]*axes=\[0, 1, 4, 2, 3\]", text))
    pack = len(re.findall(r"R\.permute_dims\([^)]*axes=\[0, 1, 3, 4, 2\]", text))
    written = [k for k in ctx.kernels if k.variant != "default"]
    nchw_in = sum(k.in_layout == "NCHW" for k in written)
    fused = getattr(ctx, "eltwise", [])
    ops = {type(converted.get_submodule(str(n.target))).__name__
           for n in converted.graph.nodes if n.op == "call_module"}
    print(f"{args.model}, input {tuple(x.shape)}: {len(written)} written conv/linear kernels "
          f"({nchw_in} read NCHW input and pack it, {len(written) - nchw_in} read packed input); "
          f"unpack conversions {unpack}; small-operand packs {pack}; "
          f"{len(fused)} fused lane-wise chain kernels "
          f"({sum(len(r.ops) for r in fused)} ops)")
    print("  integer ops:", ", ".join(sorted(ops)))
    if args.check:
        from djpq_compiler.backends import tvm as tvm_backend

        compiled = tvm_backend.build(converted, "x86", example_inputs=(x,))
        got, want = compiled(x), converted(x)
        diff = (got.double() - want.double()).abs().max().item()
        print(f"  built: max |TVM - reference| = {diff}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
