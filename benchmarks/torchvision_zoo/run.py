"""Channel-group analysis and the pruning oracle over every torchvision classification model.

For each model (``weights=None``, eval mode): analyse, prune a random 30-70 % of every prunable
group, and compare the physically pruned model against the masked one.

Usage: python benchmarks/torchvision_zoo/run.py [--out benchmarks/torchvision_zoo/RESULTS.md]
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
import torchvision

from djpq_compiler.analysis import analyze
from djpq_compiler.verify import pruning_oracle


def input_size(name: str) -> int:
    if name.startswith(("vit", "swin", "maxvit")):
        return 224
    if name.startswith("inception"):
        return 96
    return 64


def one(name: str) -> str:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, input_size(name), input_size(name))
    start = time.perf_counter()
    analyze(model, x)
    t_analyze = time.perf_counter() - start
    report, err, n0, n1 = pruning_oracle(model, x)
    status = "exact" if err < 1e-4 else f"MISMATCH {err:.1e}"
    return (f"| {name} | {x.shape[-1]} | {len(report.groups)} | {len(report.prunable_groups)} | "
            f"{100 * report.prunable_fraction:.0f}% | {len(report.missing)} | {t_analyze:.2f} | "
            f"{err:.1e} | {n0 / 1e6:.2f} → {n1 / 1e6:.2f} | {status} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("models", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    lines = ["| model | input | groups | prunable groups | prunable out-channels | ops w/o rule "
             "| analyze s | oracle rel. err | params M (before → after) | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        try:
            line = one(name)
        except Exception as exc:  # recorded in the table, never hidden
            line = f"| {name} | | | | | | | | | FAIL {type(exc).__name__}: {str(exc)[:120]} |"
        print(line, flush=True)
        lines.append(line)
        gc.collect()
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
