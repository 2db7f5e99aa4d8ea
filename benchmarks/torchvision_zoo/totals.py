"""Totals of the backend gate over every committed run: each torchvision classification model's
latest record (``backends_*.jsonl`` of this folder, in the order the runs were made), counted by
outcome.

Usage: python benchmarks/torchvision_zoo/totals.py   (prints a markdown summary)
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import torchvision

HERE = Path(__file__).parent
#: Runs in the order they were made (a later record of a model replaces an earlier one); files
#: not listed here come after these, by name.
RUNS = ("backends_2026-12-03.jsonl", "backends_2026-12-03_swin_t_regate.jsonl",
        "backends_2026-12-03_rest.jsonl", "backends_2026-12-03_perop.jsonl",
        "backends_2026-12-03_batch2.jsonl", "backends_2026-12-03_batch3.jsonl",
        "backends_2026-12-04_batch4.jsonl", "backends_2026-12-04_batch5.jsonl",
        "backends_2026-12-04_batch6.jsonl", "backends_2026-12-04_sample7.jsonl",
        "backends_2026-12-04_vit_h_14.jsonl")


def latest_records() -> dict[str, tuple[str, dict]]:
    """``model -> (file, record)`` of each model's latest record."""
    files = [HERE / f for f in RUNS if (HERE / f).exists()]
    files += sorted(p for p in HERE.glob("backends_*.jsonl") if p.name not in RUNS)
    latest: dict[str, tuple[str, dict]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            latest[record["model"]] = (path.name, record)
    return latest


def tvm_kind(record: dict) -> str:
    """How a passing model passed the tvm stage."""
    cell = record["cells"][2]
    if "bit-exact" in cell:
        return "bit-exact"
    if "float output" in cell:
        return "float output within float32 rounding"
    return "teacher-forced per-op check"


def main() -> None:
    latest = latest_records()
    models = torchvision.models.list_models(module=torchvision.models)
    passing = [m for m in models if m in latest and all(latest[m][1]["passed"].values())]
    kinds = collections.Counter(tvm_kind(latest[m][1]) for m in passing)
    print(f"{len(passing)} of {len(models)} torchvision classification models pass every stage "
          f"(convert, agreement, tvm, onnx). TVM: " +
          ", ".join(f"{n} {k}" for k, n in kinds.most_common()) + ".")
    for m in models:
        if m not in passing:
            where = latest[m][0] if m in latest else "no record"
            cells = latest[m][1]["cells"] if m in latest else []
            print(f"* {m} ({where}): {' | '.join(cells)}")
    for kind in ("teacher-forced per-op check", "float output within float32 rounding"):
        names = [m for m in passing if tvm_kind(latest[m][1]) == kind]
        print(f"* tvm by {kind}: {', '.join(names)}")


if __name__ == "__main__":
    main()
