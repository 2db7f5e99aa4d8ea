"""The demo's measuring stages: latency timing, the TVM build and the ONNX export of a converted
model, each checked against the integer reference executor (used by
:mod:`djpq_compiler.workflows.demo`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["say", "median_ms", "torch_latencies", "backend_stages"]

def say(text: str) -> None:
    """Print a progress line (flushed, so it interleaves with the progress bars)."""
    print(text, flush=True)


def median_ms(fn: Any, runs: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup``."""
    import statistics

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def torch_latencies(model: nn.Module, converted: nn.Module, xs: Sequence[torch.Tensor],
                     runs: int) -> list[Any]:
    """Latency of the FP32 PyTorch model and the integer reference executor at each batch."""
    import functools

    from djpq_compiler.workflows.report import Latency

    threads = f"{torch.get_num_threads()} threads"
    out = []
    for label, module in (("FP32 PyTorch", model), ("integer reference (PyTorch)", converted)):
        for x in xs:
            out.append(Latency(label, x.shape[0], median_ms(functools.partial(module, x), runs),
                               runs, threads))
    return out


def _tvm_stage(converted: nn.Module, xs: Sequence[torch.Tensor], out: Path,
               runs: int) -> tuple[bool, str, list[Any], dict[str, str], dict[str, Any]]:
    """Build for the host at each batch size, bit-exact check against the reference, latency,
    export the batch-1 library (``.so``, or ``.tar`` without a linker); the kernel each layer
    got, when the build records it."""
    import functools

    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.workflows.report import Latency, kernel_rows

    exact, lat, seconds, built = True, [], 0.0, []
    for x in xs:
        say(f"[tvm] building for x86 (this host), batch {x.shape[0]}")
        compiled_x = tvm_backend.build(converted, target="x86", example_inputs=(x,))
        seconds += compiled_x.compile_seconds + compiled_x.load_seconds
        with torch.no_grad():
            ref = converted(x)
        got = compiled_x(x)
        exact = exact and got.dtype == ref.dtype and torch.equal(got, ref)
        lat.append(Latency("TVM (x86, untuned)", x.shape[0],
                           median_ms(functools.partial(compiled_x, x), runs), runs))
        built.append(compiled_x)
    key = f"TVM library (x86, batch {xs[0].shape[0]})"
    try:
        artifacts = {key: built[0].export(out / "model_tvm.so").name}
    except Exception as exc:  # no linker: fall back to the object archive
        say(f"[tvm] .so export failed ({exc}); writing a .tar")
        artifacts = {key: built[0].export(out / "model_tvm.tar").name}
    note = f"checked at batch {', '.join(str(x.shape[0]) for x in xs)}; build {seconds:.1f} s"
    kernels = kernel_rows(getattr(built[0], "kernels", None) or ())
    return exact, note, lat, artifacts, {"tvm_kernels": kernels}


def _onnx_stage(converted: nn.Module, xs: Sequence[torch.Tensor], out: Path,
                runs: int) -> tuple[int, str, list[Any], dict[str, str], dict[str, Any]]:
    """Export ``model.onnx`` (dynamic batch), verify against the reference (per op, on the
    reference's own input codes), time onnxruntime."""
    import functools

    from djpq_compiler.backends import onnx as onnx_backend
    from djpq_compiler.workflows.report import Latency

    path = onnx_backend.export(converted, out / "model.onnx", (xs[0],))
    say(f"[onnx] exported {path}; verifying in onnxruntime")
    check = onnx_backend.verify(converted, path, (xs[-1],))
    ort = onnx_backend.require_onnx(runtime=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feeds = [{name: x.numpy()} for x in xs]
    lat = [Latency("onnxruntime (CPU)", x.shape[0],
                   median_ms(functools.partial(session.run, None, feed), runs), runs)
           for x, feed in zip(xs, feeds, strict=True)]
    note = (f"batch {xs[-1].shape[0]}; end to end max {check['max_lsb_any']} LSB at some "
            f"activation, {check['mismatch_last']:.2%} of the last activation's codes differ, "
            f"max |output diff| {check['max_abs_diff']:.3g}")
    return (int(check["max_lsb_per_op"]), note, lat, {"ONNX (QDQ, dynamic batch)": path.name},
            {})


def backend_stages(options: Any, converted: nn.Module, xs: Sequence[torch.Tensor],
                    out: Path) -> tuple[dict[str, Any], list[str]]:
    """TVM and ONNX stages (unless disabled); a failing stage is reported, not fatal."""
    from djpq_compiler.errors import DjpqError

    fields: dict[str, Any] = {"latencies": [], "artifacts": {}}
    failures = []
    stages = (  # (name, field prefix, enabled, run, result field, failure check)
        ("TVM", "tvm", options.tvm, _tvm_stage, "tvm_bit_exact",
         lambda exact: None if exact else "TVM output is not bit-exact with the integer "
                                          "reference"),
        ("ONNX", "onnx", options.onnx, _onnx_stage, "onnx_max_lsb",
         lambda lsb: f"onnxruntime differs by {lsb} LSB (> 1) from the reference"
         if lsb > 1 else None),
    )
    for name, prefix, enabled, run, field_name, check in stages:
        if not enabled:
            fields[f"{prefix}_note"] = f"skipped (--no-{prefix})"
            continue
        try:
            value, note, lat, files, extra = run(converted, xs, out, options.latency_runs)
        except DjpqError as exc:
            fields[f"{prefix}_note"] = f"failed: {exc}"
            failures.append(f"{name} stage failed: {exc}")
            continue
        fields.update({field_name: value, f"{prefix}_note": note, **extra})
        fields["latencies"] += lat
        fields["artifacts"].update(files)
        failure = check(value)
        if failure:
            failures.append(failure)
    return fields, failures
