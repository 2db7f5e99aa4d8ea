"""Where a claims run's BOPs sit: each layer's share of the integer model's BOPs, by layer kind.

A row of ``results.jsonl`` records, per conv/linear layer, ``[weight bits, activation bits, kept
output channels, output channels]`` (``bits``). With each layer's MACs (from the float model's
``djpq.bops`` report) the integer BOPs of a layer are ``MACs * kept_out/out * kept_in/in * b_w *
b_a``, where a layer's kept input fraction is the previous layer's kept output fraction (1 for a
depthwise conv, whose output channel reads one input channel; 1 for the first layer). That input
rule holds where a residual add ties the stream's channels into one gate group (so the layer
before an add and the one after it keep the same channels); it reproduces the recorded reduction
of the committed mobilenetv2, vgg7 and resnet20 rows, and each printout shows both numbers.

Usage:
  python benchmarks/paper_claims/layers.py --model mobilenetv2 --method djpq --gamma 5
      [--checkpoint 01d749cd6be1] [--steps 700] [--finalize 0.1] [--seed 0] [--per-layer]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class LayerShare:
    """One layer of a run: its kind, bits, kept outputs and share of the integer BOPs."""

    name: str
    kind: str
    b_w: int
    b_a: int
    kept: int
    total: int
    macs_share: float
    bops_share: float


@dataclass(frozen=True)
class Shares:
    """A run's layers, the BOPs share of each layer kind, and the estimate's reduction."""

    layers: tuple[LayerShare, ...]
    by_kind: tuple[tuple[str, float], ...]
    estimated_reduction: float
    recorded_reduction: float


def layer_kind(module: Any, name: str, first: bool) -> str:
    """``stem`` (first layer), ``depthwise``, ``pointwise`` (1x1 conv), ``conv`` or ``linear``."""
    import torch

    if first:
        return "stem"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "pointwise" if tuple(module.kernel_size) == (1, 1) else "conv"


def shares(row: dict[str, Any], model: Any, example: Any) -> Shares:
    """Per-layer and per-kind BOPs shares of ``row`` (a ``results.jsonl`` line) on ``model``."""
    import djpq_compiler as djpq

    report = djpq.bops(model, example)
    macs = {r.name: r.bops / (32 * 32) for r in report.rows}
    modules = dict(model.named_modules())
    total_macs = sum(macs.values())
    bops: dict[str, float] = {}
    kinds: dict[str, str] = {}
    prev: float | None = None
    for name, (b_w, b_a, kept, total) in row["bits"].items():
        kind = kinds[name] = layer_kind(modules[name], name, prev is None)
        kept_in = 1.0 if prev is None or kind == "depthwise" else prev
        bops[name] = macs[name] * kept / total * kept_in * b_w * b_a
        prev = kept / total
    integer = sum(bops.values())
    layers = []
    by_kind: dict[str, float] = {}
    for name, (b_w, b_a, kept, total) in row["bits"].items():
        kind = kinds[name]
        share = bops[name] / integer
        by_kind[kind] = by_kind.get(kind, 0.0) + share
        layers.append(LayerShare(name, kind, b_w, b_a, kept, total, macs[name] / total_macs,
                                 share))
    return Shares(tuple(layers), tuple(sorted(by_kind.items())),
                  total_macs * 32 * 32 / integer, row["bops_reduction"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", default="djpq")
    parser.add_argument("--gamma", type=float, required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--finalize", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-layer", action="store_true")
    parser.add_argument("--results", default=str(HERE / "results.jsonl"))
    args = parser.parse_args()
    import torch

    from djpq_compiler.workflows import zoo

    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    hits = [r for r in rows if r["model"] == args.model and r["method"] == args.method
            and r["gamma"] == args.gamma and r.get("steps") == args.steps
            and r.get("finalize", 0.1) == args.finalize and r.get("seed", 0) == args.seed
            and (args.checkpoint is None or r.get("checkpoint") == args.checkpoint)]
    if not hits:
        raise SystemExit("no such run in the results file")
    model = zoo.get_model(args.model)
    for row in hits:
        s = shares(row, model, torch.zeros(1, 1, 28, 28))
        print(f"{row['model']} {row['method']} γ={row['gamma']:g} (checkpoint "
              f"{row.get('checkpoint')}): {100 * row['integer_acc']:.2f} % at "
              f"{s.recorded_reduction:.1f}× (estimate {s.estimated_reduction:.1f}×)")
        print("  BOPs share by kind: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in s.by_kind))
        if args.per_layer:
            for la in s.layers:
                print(f"  {la.name:24s} {la.kind:9s} w{la.b_w} a{la.b_a} "
                      f"{la.kept:4d}/{la.total:<4d} MACs {100 * la.macs_share:5.1f} %  "
                      f"BOPs {100 * la.bops_share:5.1f} %")


if __name__ == "__main__":
    main()
