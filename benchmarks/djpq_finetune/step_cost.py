"""Training-step time and peak memory of a DJPQ-prepared model against its FP32 model.

Time: one process builds both models and alternates them step by step (batch ``--batch-size``,
Adam, cross-entropy; the prepared model also adds ``gamma * djpq_loss``), so machine load
affects both alike; the medians and their ratio are reported. Memory: each model trains in a
fresh subprocess; the peak RSS during the steps (``VmHWM``, reset before the first step) minus
the RSS before the first step is the training peak (activations, gradients, optimizer state),
also reported as a ratio. That peak is set by the first step and varies from process to process
with the allocator's state (measured: FP32 217-311 MiB), so ``--mem-repeats`` fresh processes
per model are run and the median is reported (with all runs). For what autograd keeps (exact,
deterministic) see ``step_breakdown.py``.

Usage:
  python benchmarks/djpq_finetune/step_cost.py --model resnet20 --steps 30 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import djpq_compiler as djpq
from djpq_compiler.prepared import param_groups
from djpq_compiler.workflows import zoo


def _build(name: str, kind: str, batch: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = zoo.load_pretrained(name)
    if kind == "fp32":
        model.train()
        return model, torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, 28, 28)
    prepared = djpq.prepare(model.eval(), x[:8], calibration_data=[x[:32]])
    prepared.train()
    return prepared, torch.optim.Adam(param_groups(prepared, weight_lr=1e-4, djpq_lr=1e-2))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, kind: str, x: torch.Tensor,
          y: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    if kind == "djpq":
        loss = loss + djpq.djpq_loss(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def _batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,),
                                                                        generator=gen)


def time_steps(name: str, steps: int, batch: int) -> dict[str, float]:
    """Median step seconds of both models, alternating, after 3 warm-up steps each."""
    x, y = _batch(batch)
    models = {k: _build(name, k, batch) for k in ("fp32", "djpq")}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 3):
        for kind, (model, opt) in models.items():
            t = _step(model, opt, kind, x, y)
            if i >= 3:
                times[kind].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(name: str, kind: str, steps: int, batch: int) -> dict[str, float]:
    """Run in a subprocess: RSS before the first step, and the peak RSS during ``steps`` steps
    (MiB); the peak (VmHWM) is reset first through ``/proc/self/clear_refs`` (Linux), so model
    building and calibration do not count."""
    x, y = _batch(batch)
    model, opt = _build(name, kind, batch)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mib("VmRSS")
    for _ in range(steps):
        _step(model, opt, kind, x, y)
    peak = _status_mib("VmHWM")
    return {"rss_before_mib": before, "peak_mib": peak, "train_peak_mib": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", choices=sorted(zoo.MODELS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-repeats", type=int, default=3,
                        help="fresh subprocesses per model for memory; the median is reported")
    parser.add_argument("--out", default=None, help="append the JSON result to this file")
    parser.add_argument("--child", choices=("fp32", "djpq"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(args.model, args.child, args.steps, args.batch_size)))
        return
    result: dict[str, object] = {"model": args.model, "batch": args.batch_size,
                                 "steps": args.steps, "threads": args.threads,
                                 "date": time.strftime("%Y-%m-%d")}
    step = time_steps(args.model, args.steps, args.batch_size)
    result.update(step_ms_fp32=1e3 * step["fp32"], step_ms_djpq=1e3 * step["djpq"],
                  time_ratio=step["djpq"] / step["fp32"])
    runs: dict[str, list[dict[str, float]]] = {"fp32": [], "djpq": []}
    for _ in range(args.mem_repeats):  # alternating: machine load affects both alike
        for kind in ("fp32", "djpq"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps",
                                  str(min(args.steps, 10)), "--batch-size", str(args.batch_size),
                                  "--threads", str(args.threads), "--child", kind],
                                 check=True, capture_output=True, text=True)
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for kind, rows in runs.items():
        # the run with the median training peak (the first step's allocator state varies)
        rows.sort(key=lambda r: r["train_peak_mib"])
        result[f"memory_{kind}"] = dict(rows[len(rows) // 2],
                                        train_peak_runs_mib=[r["train_peak_mib"] for r in rows])
    mem_f, mem_d = result["memory_fp32"], result["memory_djpq"]
    assert isinstance(mem_f, dict) and isinstance(mem_d, dict)
    result["memory_ratio"] = mem_d["train_peak_mib"] / max(mem_f["train_peak_mib"], 1e-9)
    print(json.dumps(result, indent=1))
    if args.out:
        with Path(args.out).open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
