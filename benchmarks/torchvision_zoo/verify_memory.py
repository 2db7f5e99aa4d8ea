"""Peak memory of the ONNX per-op check, whole-graph (before) vs chunked (after), on one model.

The model is prepared, pruned and converted as the zoo gate does it
(``djpq_compiler.testing.backend_zoo``: ``weights=None``, seed 0, the zoo's input size, batch
2), exported once, and saved with ``save_converted``. Then each variant of
``backends/onnx/verify.py`` runs in a fresh child process that loads the converted model, hands
freed heap back to the OS, and runs ``verify`` alone:

* ``before``: the verifier as of ``--before-rev`` (git), which kept every reference tensor and ran
  the whole graph with every integer activation as an output (and, cut, as an input);
* ``after``: the chunked verifier of this tree (``--chunk`` activations per chunk).

Each child reports its resident memory before ``verify`` and the peak during it (VmHWM, reset
after the load), wall and CPU seconds, and a digest of the report: the two must agree exactly.
The variants alternate (before, after, before, ...), ``--repeat`` times each, with ``uptime``
before and after.

Usage: python benchmarks/torchvision_zoo/verify_memory.py [--repeat 2] [--chunk 32]
       [--json OUT.json] [--out OUT.md] MODEL
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: The last commit with the whole-graph verifier (before the chunked one).
BEFORE_REV = "ea38d3e"


def _status(field: str) -> float:
    """``VmRSS``/``VmHWM`` of this process in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _before_verify(rev: str) -> Any:
    """``verify`` of ``backends/onnx/verify.py`` at git revision ``rev``."""
    src = subprocess.run(["git", "show", f"{rev}:backends/onnx/verify.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    src = src.replace("from .export import require_onnx",
                      "from djpq_compiler.backends.onnx.export import require_onnx")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("verify_before", f.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module.verify


def _child(variant: str, work: Path, rev: str, chunk: int) -> dict[str, Any]:
    import torch

    from djpq_compiler.serialize import load_converted

    torch.set_num_threads(1)
    converted = load_converted(work / "converted.djpq")
    x = torch.load(work / "x.pt")
    if variant == "before":
        verify = _before_verify(rev)
        run = lambda: verify(converted, work / "model.onnx", x)  # noqa: E731
    else:
        from djpq_compiler.backends.onnx.verify import verify as chunked

        run = lambda: chunked(converted, work / "model.onnx", x, chunk=chunk)  # noqa: E731
    _trim()
    base = _status("VmRSS")
    _reset_peak()
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:  # VmHWM where clear_refs is not allowed: sample every 50 ms
        while not done.wait(0.05):
            peak[0] = max(peak[0], _status("VmRSS"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start, cpu = time.perf_counter(), time.process_time()
    report = run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    done.set()
    thread.join()
    peak_gb = max(peak[0], _status("VmHWM"))
    digest = hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()[:16]
    return {"variant": variant, "rss_before_gb": round(base, 2), "peak_gb": round(peak_gb, 2),
            "verify_gb": round(peak_gb - base, 2), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "digest": digest,
            "max_lsb_per_op": report["max_lsb_per_op"], "activations": len(report["nodes"])}


def _prepare(name: str, work: Path) -> dict[str, Any]:
    import torch
    import torchvision

    from djpq_compiler.backends.onnx import export
    from djpq_compiler.serialize import save_converted
    from djpq_compiler.testing.backend_zoo import pruned_converted, zoo_input

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = zoo_input(name)
    start = time.perf_counter()
    converted = pruned_converted(torchvision.models.get_model(name, weights=None).eval(), x)[1]
    export(converted, work / "model.onnx", (x,))
    save_converted(converted, work / "converted.djpq")
    torch.save(x, work / "x.pt")
    return {"model": name, "input": list(x.shape),
            "onnx_mb": round((work / "model.onnx").stat().st_size / 2**20, 1),
            "prepare_s": round(time.perf_counter() - start, 1)}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--before-rev", default=BEFORE_REV)
    parser.add_argument("--json", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = _child(args.child[0], Path(args.child[1]), args.before_rev, args.chunk)
        print(json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) \
            as tmp:
        work = Path(tmp)
        info = _prepare(args.model, work)
        print(json.dumps(info), flush=True)
        load = {"before": _uptime()}
        runs = []
        for _ in range(args.repeat):
            for variant in ("before", "after"):
                cmd = [sys.executable, __file__, args.model, "--chunk", str(args.chunk),
                       "--before-rev", args.before_rev, "--child", variant, str(work)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]), flush=True)
        load["after"] = _uptime()
    same = len({r["digest"] for r in runs}) == 1
    record = {**info, "chunk": args.chunk, "before_rev": args.before_rev, "runs": runs,
              "same_report": same, "uptime": load, "command": " ".join(sys.argv)}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if args.out:
        rows = ["| variant | RSS before verify (GiB) | peak (GiB) | verify's own (GiB) | wall s | "
                "CPU s | max LSB per op | report digest |", "|---|---|---|---|---|---|---|---|"]
        rows += [f"| {r['variant']} | {r['rss_before_gb']} | {r['peak_gb']} | {r['verify_gb']} | "
                 f"{r['wall_s']} | {r['cpu_s']} | {r['max_lsb_per_op']} | `{r['digest']}` |"
                 for r in runs]
        Path(args.out).write_text(
            f"Command: `python {' '.join(sys.argv)}`\n\n"
            f"Model {info['model']}, input {info['input']}, ONNX file {info['onnx_mb']} MiB, "
            f"{runs[0]['activations']} integer activations checked; chunk {args.chunk}; "
            f"before = `backends/onnx/verify.py` at {args.before_rev}.\n\n"
            + "\n".join(rows) + f"\n\nSame report in every run: {same}.\n\n"
            f"Load: before `{load['before']}`; after `{load['after']}`.\n")
    print(f"same report: {same}")


if __name__ == "__main__":
    main()
