"""Write RESULTS.md from the JSON summaries that train_reference.py wrote (no numbers typed in).

    python benchmarks/reference_models/make_results.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("resnet20", "mobilenetv2", "vgg7", "inception")

HEADER = """# FP32 reference models on Fashion-MNIST

Checkpoints: `djpq_compiler/checkpoints/<model>.pt` (float32 `state_dict`, loaded with
`torch.load(..., weights_only=True)` by `djpq_compiler.zoo.load_pretrained`). Every number below is
copied by `make_results.py` from the JSON summary the training run wrote
(`results/<model>.json`, which also holds the per-epoch log); the test accuracy is measured on the
full 10,000-image test set after reloading the saved checkpoint. MACs are counted by
`djpq_compiler.bops` (conv + linear, per 28x28 image); FP32 GBOPs = MACs x 32 x 32 / 1e9.

Training: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, one-cycle LR (peak
`--lr`), 1 CPU thread (`torch.set_num_threads(1)`), channels-last, seed 0, on a 2-core machine
shared with other jobs (wall-clock times are only indicative: the load average was 4-10).
ResNet-20 uses random crop (2 px of black padding) + horizontal flip; the other three were trained
without augmentation (`--no-augment`) for a short budget.

| model | params | MACs | FP32 GBOPs | epochs | test acc. | train time | date | command |
|---|---:|---:|---:|---:|---:|---:|---|---|
"""


def row(s: dict) -> str:
    gbops = s["macs"] * 32 * 32 / 1e9
    minutes = s["train_seconds"] / 60
    return (f"| {s['model']} | {s['params']:,} | {s['macs']:,} | {gbops:.2f} | {s['epochs']} | "
            f"{100 * s['test_acc']:.2f} % | {minutes:.0f} min | {s['date']} | "
            f"`{s['command']}` |")


def main() -> None:
    summaries = {p.stem: json.loads(p.read_text()) for p in (HERE / "results").glob("*.json")}
    names = [n for n in ORDER if n in summaries] + sorted(set(summaries) - set(ORDER))
    lines = [row(summaries[n]) for n in names]
    epochs = ["", "## Per-epoch test accuracy", ""]
    for n in names:
        accs = ", ".join(f"{100 * e['test_acc']:.2f}" for e in summaries[n]["epoch_log"])
        epochs.append(f"* {n}: {accs}")
    (HERE / "RESULTS.md").write_text(HEADER + "\n".join(lines) + "\n" + "\n".join(epochs) + "\n")


if __name__ == "__main__":
    main()
