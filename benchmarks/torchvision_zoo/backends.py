"""The backend gate over the torchvision classification zoo: convert, TVM x86, ONNX.

For each model (``weights=None``, eval mode, small input, batch 2): ``prepare`` with the default
config, ~40 % of every gate group closed at random, ``convert(integer=True)``, then
(``djpq_compiler.testing.backend_zoo.check_backends``): fake-quant vs integer <= 1 LSB per op,
the TVM x86 build bit-exact with the integer reference, the ONNX export within 1 LSB per op in
onnxruntime. Each stage is ``ok``, ``refused`` (a DjpqError), ``crash`` (any other exception) or
``mismatch``.

Usage: python benchmarks/torchvision_zoo/backends.py [--out TABLE.md] [--jsonl RESULTS.jsonl]
       [--isolate] [models...]   (default: every model but the HEAVY ones of
       tests/test_zoo_torchvision.py)

``--jsonl`` appends one JSON line per model as soon as it finishes and ``--out`` is rewritten
after every model, so a partial run keeps its results. ``--isolate`` runs each model in its own
child process: a process that dies (e.g. an LLVM abort inside TVM) is recorded as a *crash* of
that model and the run goes on; its peak resident memory is recorded (``peak_rss_gb``), and
``--max-rss-gb G`` stops a child whose resident memory passes G GiB (the machine is shared). A
child stopped by the timeout or the memory guard is recorded with the stage it was in (the
stage log of ``djpq_compiler.testing.backend_zoo``) and its wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
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
        text += f" ({outcome.detail})".replace("|", "/")
    return text


def _row(name: str, size: int, float_ops: int, cells: list[str], seconds: float) -> str:
    return f"| {name} | {size} | {float_ops} | " + " | ".join(cells) + f" | {seconds:.0f} |"


def _run_one(name: str) -> dict:
    """Check one model in this process; the record written to ``--jsonl``."""
    start = time.perf_counter()
    torch.manual_seed(0)  # the random init (the pruning is seeded in check_backends)
    x = zoo_input(name)
    # no reference kept here, so check_backends frees the float model once prepare copied it
    result = check_backends(name, torchvision.models.get_model(name, weights=None).eval(), x)
    return {"model": name, "input": x.shape[-1], "seconds": time.perf_counter() - start,
            "float_ops": list(result.float_ops), "cells": [_cell(result, s) for s in STAGES],
            "passed": {s: result.passed(s) for s in STAGES},
            "stages": {s: vars(o) for s, o in result.stages.items()}}


def _rss_gb(pid: int) -> float:
    """Resident memory of process ``pid`` in GiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


class _Usage(logging.Filter):
    """Adds the process's CPU seconds and resident memory to each log record (the stage log
    then says where a big model spends its time and memory)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.cpu = time.process_time()
        record.rss = _rss_gb(os.getpid())
        return True


def _watch(proc: subprocess.Popen, timeout: float, max_rss_gb: float) -> tuple[str, float]:
    """Wait for ``proc``, polling its memory: ``(why it was stopped or "", peak RSS GiB)``."""
    start, peak = time.perf_counter(), 0.0
    while proc.poll() is None:
        peak = max(peak, _rss_gb(proc.pid))
        elapsed = time.perf_counter() - start
        why = (f"timed out after {timeout:.0f} s" if elapsed > timeout else
               f"stopped at {peak:.1f} GiB resident (limit {max_rss_gb:g}) after {elapsed:.0f} s"
               if peak > max_rss_gb else "")
        if why:
            proc.kill()
            proc.wait()
            return why, peak
        time.sleep(1.0)
    return "", peak


def _run_isolated(name: str, timeout: float, max_rss_gb: float = float("inf")) -> dict:
    """:func:`_run_one` in a child process; a dead, timed-out or too large child is a crash,
    recorded with the last stage it logged."""
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", name]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        stopped, peak = _watch(proc, timeout, max_rss_gb)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    log = [ln for ln in stderr.splitlines() if ln.startswith("[zoo ")]
    if not stopped and proc.returncode == 0 and lines:  # the stage log: where time and memory go
        return {**json.loads(lines[-1]), "peak_rss_gb": round(peak, 2), "log": log}
    if stopped:
        why = f"{stopped}; last step: {log[-1] if log else '?'}"
    else:
        why = f"process died (exit {proc.returncode}): {stderr.strip()[-160:]}"
    why = why.replace("|", "/").replace("\n", " ")
    done = _finished_stages(name, log)
    cells = [done[s] for s in STAGES if s in done]
    if len(cells) < len(STAGES):  # else it was stopped after its last stage
        cells += [f"crash: {why}"] + ["-"] * (len(STAGES) - len(cells) - 1)
    return {"model": name, "input": zoo_input(name).shape[-1],
            "seconds": time.perf_counter() - start, "float_ops": [], "cells": cells,
            "passed": {s: s in done and done[s].startswith("ok") for s in STAGES},
            "stages": {}, "peak_rss_gb": round(peak, 2), "stopped": why, "log": log}


def _finished_stages(name: str, log: list[str]) -> dict[str, str]:
    """``stage -> cell`` of the stages a stopped child finished, in order, from its stage log
    (``"<name>: <stage> <status> <detail>"`` lines of ``check_backends``)."""
    done: dict[str, str] = {}
    for stage in STAGES:
        marker = f"] {name}: {stage} "
        line = next((ln for ln in log if marker in ln), None)
        if line is None:
            break
        status, _, detail = line.split(marker, 1)[1].partition(" ")
        done[stage] = (f"{status} ({detail})" if detail and status == "ok" else
                       f"{status}: {detail}" if detail else status).replace("|", "/")
    return done


def _write_table(path: str, records: list[dict], names: list[str]) -> None:
    lines = ["| model | input | float ops | " + " | ".join(STAGES) + " | s |",
             "|---|---|---|" + "---|" * len(STAGES) + "---|"]
    lines += [_row(r["model"], r["input"], len(r["float_ops"]), r["cells"], r["seconds"])
              for r in records]
    totals = {s: sum(r["passed"][s] for r in records) for s in STAGES}
    summary = ", ".join(f"{s} ok {totals[s]}/{len(records)}" for s in STAGES)
    pending = [n for n in names if n not in {r["model"] for r in records}]
    lines += ["", f"Summary: {summary}.", ""]
    if pending:
        lines += [f"Not finished (run still going or stopped): {', '.join(pending)}.", ""]
    Path(path).write_text(f"Command: `python {' '.join(sys.argv)}`\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--jsonl", default=None, help="append one JSON line per model")
    parser.add_argument("--isolate", action="store_true", help="one child process per model")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per model, --isolate")
    parser.add_argument("--max-rss-gb", type=float, default=float("inf"),
                        help="--isolate: stop a child above this resident memory (GiB)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("models", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_Usage())
        handler.setFormatter(logging.Formatter(
            "[zoo %(relativeCreated).0f ms, cpu %(cpu).0f s, rss %(rss).2f GiB] %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        print(json.dumps(_run_one(args.child)), flush=True)
        return
    names = args.models or [n for n in torchvision.models.list_models(module=torchvision.models)
                            if n not in HEAVY]
    records: list[dict] = []
    for name in names:
        record = (_run_isolated(name, args.timeout, args.max_rss_gb) if args.isolate
                  else _run_one(name))
        records.append(record)
        print(_row(name, record["input"], len(record["float_ops"]), record["cells"],
                   record["seconds"]), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        if args.out:
            _write_table(args.out, records, names)
        gc.collect()


if __name__ == "__main__":
    main()
