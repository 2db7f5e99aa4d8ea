"""The backend gate over the torchvision classification zoo: convert, TVM x86, ONNX.

For each model (``weights=None``, eval mode, small input, batch 2): ``prepare`` with the default
config, ~40 % of every gate group closed at random, ``convert(integer=True)``, then
(``djpq_compiler.testing.backend_zoo.check_backends``): fake-quant vs integer <= 1 LSB per op,
the TVM x86 build bit-exact with the integer reference, the ONNX export within 1 LSB per op in
onnxruntime. Each stage is ``ok``, ``refused`` (a DjpqError), ``crash`` (any other exception) or
``mismatch``.

Usage: python benchmarks/torchvision_zoo/backends.py [--out benchmarks/torchvision_zoo/BACKENDS.md]
       [models...]   (default: every model but the HEAVY ones of tests/test_zoo_torchvision.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

from djpq_compiler.testing.backend_zoo import check_backends, zoo_input

HEAVY = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf",
         "regnet_x_32gf", "vit_b_16", "vit_b_32"}
STAGES = ("convert", "agreement", "tvm", "onnx")


def _cell(result, stage: str) -> str:
    outcome = result.stages.get(stage)
    if outcome is None:
        return "-"
    text = outcome.status if outcome.status != "ok" else "ok"
    if outcome.detail and outcome.status != "ok":
        text += f": {outcome.detail[:90]}".replace("|", "/").replace("\n", " ")
    elif outcome.detail:
        text += f" ({outcome.detail})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--jsonl", default=None, help="append one JSON line per model")
    parser.add_argument("models", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.models or [n for n in torchvision.models.list_models(module=torchvision.models)
                            if n not in HEAVY]
    lines = ["| model | input | float ops | " + " | ".join(STAGES) + " | s |",
             "|---|---|---|" + "---|" * len(STAGES) + "---|"]
    totals = {s: 0 for s in STAGES}
    for name in names:
        start = time.perf_counter()
        model = torchvision.models.get_model(name, weights=None).eval()
        x = zoo_input(name)
        result = check_backends(name, model, x)
        seconds = time.perf_counter() - start
        for s in STAGES:
            totals[s] += result.passed(s)
        line = (f"| {name} | {x.shape[-1]} | {len(result.float_ops)} | "
                + " | ".join(_cell(result, s) for s in STAGES) + f" | {seconds:.0f} |")
        print(line, flush=True)
        lines.append(line)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"model": name, "input": x.shape[-1], "seconds": seconds,
                                    "float_ops": list(result.float_ops),
                                    "stages": {s: vars(o) for s, o in result.stages.items()}})
                        + "\n")
        del model, result
        gc.collect()
    summary = ", ".join(f"{s} ok {totals[s]}/{len(names)}" for s in STAGES)
    lines += ["", f"Summary: {summary}.", ""]
    print(summary)
    if args.out:
        Path(args.out).write_text(f"Command: `python {' '.join(sys.argv)}`\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
