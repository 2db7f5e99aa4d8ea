"""Write RESULTS.md from the JSON files that train_reference.py wrote (no numbers typed in).

    python benchmarks/reference_models/make_results.py

``results/<model>.json``: the summary of the run behind the committed checkpoint.
``results/long/<model>.json``: the per-epoch log of a long (resumable) run, finished or not.
``NOTES.md`` (hand-written: what the runs mean, how to resume them) is appended as it is.
"""

from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("resnet20", "mobilenetv2", "vgg7", "inception")

HEADER = """# FP32 reference models on Fashion-MNIST

Checkpoints: `djpq_compiler/checkpoints/<model>.pt` (float32 `state_dict`, loaded with
`torch.load(..., weights_only=True)` by `djpq_compiler.workflows.zoo.load_pretrained`).
Every number below is
copied by `make_results.py` from the JSON files the training runs wrote (`results/<model>.json`
for the committed checkpoints, `results/long/<model>.json` for the long runs; both hold the
per-epoch log); the test accuracy is measured on the full 10,000-image test set (for the committed
checkpoints: after reloading the saved file). MACs are counted by `djpq_compiler.bops` (conv +
linear, per 28x28 image); FP32 GBOPs = MACs x 32 x 32 / 1e9.

## Committed checkpoints

Training: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, LR schedule and peak
`--lr` as in each command (`train_reference.py` defaults: one-cycle, random crop with 2 px of black
padding + horizontal flip unless `--no-augment`), 1 CPU thread (`torch.set_num_threads(1)`),
channels-last, seed 0, on a 2-core machine shared with other jobs (wall-clock times are only
indicative). A warm start (`--init`, from an earlier checkpoint) shows its epochs as
"earlier + this run"; its summary's `note` says from which file.

| model | params | MACs | FP32 GBOPs | epochs | test acc. | train time | date | command |
|---|---:|---:|---:|---:|---:|---:|---|---|
"""


def row(s: dict) -> str:
    gbops = s["macs"] * 32 * 32 / 1e9
    minutes = s["train_seconds"] / 60
    epochs = (f"{s['init_epochs']} + {s['epochs']}" if s.get("init_epochs") else str(s["epochs"]))
    return (f"| {s['model']} | {s['params']:,} | {s['macs']:,} | {gbops:.2f} | {epochs} | "
            f"{100 * s['test_acc']:.2f} % | {minutes:.0f} min | {s['date']} | "
            f"`{s['command']}` |")


def _ordered(names: set[str]) -> list[str]:
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def long_runs(records: dict[str, dict]) -> list[str]:
    """The long runs: status, convergence, throughput, per-epoch test accuracy, commands."""
    if not records:
        return []
    lines = ["", "## Long runs (resumable; issue 18)", "",
             "Cosine LR to 0 over the planned epochs, random crop (2 px) + horizontal flip, "
             "SGD-Nesterov 0.9, weight decay 5e-4, batch 128, 1 thread, `nice -n 19` "
             "(mobilenetv2's run: `nice -n 10`) on the shared 2-core machine. *Converged* means "
             "the last 3 epochs raised the best test accuracy by at most 0.1 point "
             "(`train_reference.converged`). s/epoch is the median wall time of an epoch "
             "including the test-set evaluation, under whatever load the machine had.",
             "",
             "| model | init | epochs done / planned | finished | converged | last-epoch acc. | "
             "best acc. | s/epoch |",
             "|---|---|---:|---|---|---:|---:|---:|"]
    for n in _ordered(set(records)):
        r = records[n]
        log = r["epoch_log"]
        last = f"{100 * log[-1]['test_acc']:.2f} %" if log else "—"
        best = f"{100 * r['best_test_acc']:.2f} %" if r.get("best_test_acc") else "—"
        sec = f"{statistics.median(e['seconds'] for e in log):.0f}" if log else "—"
        lines.append(f"| {n} | {r.get('init') or 'scratch'} | {r['epochs_done']} / "
                     f"{r['epochs_planned']} | {'yes' if r['finished'] else 'no'} | "
                     f"{'yes' if r['converged'] else 'no'} | {last} | {best} | {sec} |")
    lines += ["", "Per-epoch test accuracy (%) and learning rate at the epoch's end:", ""]
    for n in _ordered(set(records)):
        accs = ", ".join(f"{100 * e['test_acc']:.2f}" for e in records[n]["epoch_log"])
        lrs = ", ".join(f"{e.get('lr', float('nan')):.3g}" for e in records[n]["epoch_log"])
        lines += [f"* {n}: {accs}", f"  (lr: {lrs})"]
    lines += ["", "Commands (the same command resumes from its `--state`, which is git-ignored "
              "under `runs/`; `--deadline` only decides when an invocation stops):", ""]
    for n in _ordered(set(records)):
        argv = shlex.split(records[n]["command"])
        lines.append(f"* {n}: `nice -n 19 {shlex.join(argv)}`")
    return lines


def main() -> None:
    summaries = {p.stem: json.loads(p.read_text()) for p in (HERE / "results").glob("*.json")}
    long = {p.stem: json.loads(p.read_text()) for p in (HERE / "results" / "long").glob("*.json")}
    names = _ordered(set(summaries))
    lines = [row(summaries[n]) for n in names]
    epochs = ["", "Per-epoch test accuracy of the committed checkpoints' runs:", ""]
    for n in names:
        accs = ", ".join(f"{100 * e['test_acc']:.2f}" for e in summaries[n]["epoch_log"])
        note = f" ({summaries[n]['note']})" if summaries[n].get("note") else ""
        epochs.append(f"* {n}: {accs}{note}")
    notes = HERE / "NOTES.md"
    tail = ["", notes.read_text().rstrip()] if notes.exists() else []
    text = HEADER + "\n".join(lines + epochs + long_runs(long) + tail) + "\n"
    (HERE / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
