"""Where TVM and the integer reference differ on a net with float islands: one build that also
outputs every ``Quantize``'s codes, compared on the gate's two inputs; prints each differing
quantizer with its max code difference, the fraction of codes that differ and the op it reads.

Usage: python benchmarks/torchvision_zoo/island_flips.py MODEL   (random init, gate's pruning)

This shows the end-to-end picture (flips and their growth downstream). Whether a difference is
only propagation is decided by the teacher-forced per-op check the gate runs,
``djpq_compiler.backends.tvm.verify.verify_per_op``.
"""

from __future__ import annotations

import sys
import time

import torch
import torchvision

from djpq_compiler.backends import tvm as tvm_backend
from djpq_compiler.ir import modules as im
from djpq_compiler.testing.backend_zoo import pruned_converted, zoo_input


def _describe(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    return f"{node.op}:{getattr(node.target, '__name__', node.target)}"


def main() -> None:
    torch.set_num_threads(1)
    name = sys.argv[1] if len(sys.argv) > 1 else "swin_t"
    model = torchvision.models.get_model(name, weights=None).eval()
    x = zoo_input(name)
    _, converted = pruned_converted(model, x)
    quantizers = [n for n in converted.graph.nodes if n.op == "call_module"
                  and isinstance(converted.get_submodule(str(n.target)), im.Quantize)]
    out = next(n for n in converted.graph.nodes if n.op == "output")
    out.args = ((out.args[0], *quantizers),)
    converted.recompile()
    start = time.perf_counter()
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    print(f"{name}: build {time.perf_counter() - start:.0f} s, {len(quantizers)} quantizers")
    inputs = [x, torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 2]
    for i, inp in enumerate(inputs):
        got, want = compiled(inp), converted(inp)
        final = float((got[0].double() - want[0].double()).abs().max())
        print(f"input {i}: final output max |diff| {final:.3g}")
        for node, g, w in zip(quantizers, got[1:], want[1:], strict=True):
            diff = (g - w).abs()
            if diff.numel() and int(diff.max()):
                print(f"  {node.name}: max {int(diff.max())} LSB, "
                      f"{float((diff > 0).double().mean()):.2e} of codes, reads "
                      f"{_describe(converted, node.args[0])}")


if __name__ == "__main__":
    main()
