"""End-to-end latency of DJPQ-trained models: PyTorch FP32 (original) vs TVM vs onnxruntime.

For every model, the TVM library is built for each batch size and the ONNX file exported once;
then for every thread count and batch size the three backends are timed *interleaved*: after
``--warmup`` calls each, round ``r`` of ``--runs`` calls every backend once (the order rotates
from round to round), so a change in machine load hits all backends alike. Medians are
reported, with the ratio ``PyTorch FP32 ms / backend ms`` (> 1: faster than FP32 eager).

Backends (all at the same thread count):
  * ``torch_fp32``: PyTorch eager of the ORIGINAL (unpruned, float) model,
    ``torch.set_num_threads``, ``torch.inference_mode``.
  * ``tvm``: ``backends.tvm.build(converted, "x86")`` (the written integer kernels where the
    build selects them, TVM's default schedules elsewhere; the kernel each layer got is printed
    and recorded when the build exposes ``CompiledModel.kernels``), timed through its persistent
    Relax VM on a numpy input; TVM's thread pool is reconfigured per thread count
    (``runtime.config_threadpool``).
  * ``onnxruntime``: the QDQ ONNX file of the same converted model (``backends.onnx.export``,
    dynamic batch), ``CPUExecutionProvider``, one session per thread count,
    ``inter_op_num_threads=1``, default graph optimizations.
  Thread pools do not spin (``TVM_THREAD_POOL_SPIN_COUNT=0``, ``OMP_WAIT_POLICY=PASSIVE``,
  onnxruntime ``session.intra_op.allow_spinning=0``), so interleaved backends do not steal each
  other's cores. TVM output is checked bit-exact against the integer reference executor (the
  converted GraphModule in PyTorch), onnxruntime's max |difference| from it is recorded.

Models:
  * ``vgg7``, ``resnet20``, ``mobilenetv2`` (Fashion-MNIST, 1x28x28): DJPQ-trained prepared
    states committed in ``benchmarks/latency/models/`` (``train_models.py`` made them; their
    JSON says how), ``convert``-ed here; FP32 is the committed zoo checkpoint they started from.
  * ``resnet18`` (3x224x224): torchvision resnet18, random init (no ImageNet weights offline;
    latency does not depend on weight values), ``prepare`` at W4A8 (first conv and fc W8A8), half
    of every gate group closed (seeded), ``convert``.
  * ``resnet18_w8a8`` (3x224x224): the same at W8A8 everywhere (a user who quantizes to 8 bits
    and prunes; its 3x3 stride-1 convs take the Winograd kernel on AVX2).

``--isa avx2`` builds every TVM variant for an AVX2-only CPU (the target dict of ``"x86"`` is
replaced by ``{"kind": "llvm", "mcpu": "haswell"}``: AVX2, no AVX-512, no VNNI), so the written
kernels are the AVX2 ones (``avx2_u8s8_p{P}``, ``avx2_s16``, ``avx2_dw8``, 8-lane ``NCHW8c``
layouts) and run on this CPU. (``mcpu=znver3``, the issue's AMD EPYC, emits instructions an
Intel CPU lacks: the process died with SIGILL here.) PyTorch and onnxruntime are not affected
(they use what this CPU has, AVX-512 included).

Usage:
  python benchmarks/latency/run.py --models vgg7,resnet20,mobilenetv2,resnet18 --batches 1,32 \
      --threads 1,2 --runs 10 --out benchmarks/latency
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRAINED = ("vgg7", "resnet20", "mobilenetv2")
#: torchvision resnet18 at 224, pruned at random (:func:`resnet18_pruned`): W4A8 and W8A8.
SYNTHETIC = ("resnet18", "resnet18_w8a8")
BACKENDS = ("torch_fp32", "tvm", "onnxruntime")
LABELS = {"torch_fp32": "PyTorch FP32 (original)", "tvm": "TVM", "onnxruntime": "onnxruntime QDQ",
          "tvm_unfused": "TVM unfused", "tvm_nchw": "TVM NCHW between layers",
          "tvm_prev_kernels": "TVM previous conv kernels", "tvm_no_amx": "TVM without AMX",
          "tvm_no_narrow": "TVM without the pixels-in-lanes kernel"}
#: Optional A/B builds of the same model, timed interleaved with the others.
VARIANTS = ("tvm_unfused", "tvm_nchw", "tvm_prev_kernels", "tvm_no_amx", "tvm_no_narrow")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vgg7,resnet20,mobilenetv2,resnet18")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", default="1,2", help="thread counts, each timed separately")
    ap.add_argument("--runs", type=int, default=10, help="timed rounds per cell (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per backend first")
    ap.add_argument("--max-seconds", type=float, default=40.0,
                    help="stop the timed rounds of one cell after this long (at least 3 rounds)")
    ap.add_argument("--models-dir", default=str(HERE / "models"),
                    help="where the trained states (NAME.pt + NAME.json) are")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-unfused", action="store_true",
                    help="also time a TVM build without the elementwise fusion and CPU schedule "
                         "before tvm.compile (backend tvm_unfused: the build before issue #15's "
                         "fusion change), interleaved with the others")
    ap.add_argument("--compare-nchw", action="store_true",
                    help="also time a TVM build with layout planning off (backend tvm_nchw: "
                         "every written kernel reads and writes NCHW, the build before issue "
                         "#15 item 3's packed layouts), interleaved with the others")
    ap.add_argument("--compare-prev-kernels", action="store_true",
                    help="also time a TVM build with the 2026-12-04 conv kernel changes off "
                         "(backend tvm_prev_kernels: int64 requantization shift with the bias "
                         "added before it, batch 32 packed in one pass, per-tap channel padding "
                         "for stems, P from the bound alone), interleaved with the others")
    ap.add_argument("--compare-no-amx", action="store_true",
                    help="also time a TVM build for this CPU without its AMX features (backend "
                         "tvm_no_amx: the AVX512-VNNI kernels where the default build picks "
                         "AMX), interleaved with the others")
    ap.add_argument("--compare-no-narrow", action="store_true",
                    help="also time a TVM build without the pixels-in-lanes kernel for narrow "
                         "layers (backend tvm_no_narrow: every such layer keeps its channel-lane "
                         "avx2_u8s8 kernel), interleaved with the others")
    ap.add_argument("--isa", choices=tuple(ISA_TARGETS), default="native",
                    help="the ISA the TVM builds target: native (this CPU) or avx2 (an "
                         "AVX2-only haswell target, run on this CPU)")
    return ap.parse_args(argv)


#: ``--isa`` -> the TVM target dict that replaces ``"x86"``'s (``None``: this CPU's).
ISA_TARGETS: dict[str, dict[str, Any] | None] = {
    "native": None, "avx2": {"kind": "llvm", "mcpu": "haswell"}}


def force_isa(isa: str) -> None:
    """Make every ``build(..., "x86")`` of this process target ``ISA_TARGETS[isa]``."""
    spec = ISA_TARGETS[isa]
    if spec is None:
        return
    from unittest import mock

    # the submodule (the package's ``build`` attribute is the function of the same name)
    build_module = importlib.import_module("djpq_compiler.backends.tvm.build")
    real = build_module.target_spec
    mock.patch.object(build_module, "target_spec", lambda target: (
        (dict(spec), None) if target == "x86" else real(target))).start()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools read these when the libraries load
    _most = str(max(int(t) for t in ARGS.threads.split(",")))
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = _most
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import djpq_compiler as djpq  # noqa: E402
from djpq_compiler.config import DJPQConfig, QuantSpec  # noqa: E402
from djpq_compiler.convert import convert  # noqa: E402
from djpq_compiler.prepared import gates  # noqa: E402
from djpq_compiler.records import converted_record  # noqa: E402
from djpq_compiler.workflows import zoo  # noqa: E402


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _train_models_module() -> Any:
    """``train_models.py`` of this folder (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location("latency_train_models",
                                                  HERE / "train_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -------------------------------------------------------------------------------------- models

def kept_summary(converted: nn.Module, original: nn.Module) -> dict[str, int]:
    def chans(m: nn.Module) -> int:
        return sum(int(mod.weight.shape[0]) for mod in m.modules()
                   if isinstance(getattr(mod, "weight", None), torch.Tensor)
                   and mod.weight.dim() == 4)
    return {"conv_out_channels_kept": chans(converted),
            "conv_out_channels_original": chans(original)}


def bits_summary(converted: nn.Module) -> dict[str, int]:
    """How many conv/linear layers have each ``W{b_w}A{b_a}``."""
    rows = djpq.bops(converted).rows
    return dict(sorted(Counter(f"W{r.b_w}A{r.b_a}" for r in rows).items()))


def trained_model(name: str, models_dir: Path) -> dict[str, Any]:
    meta = json.loads((models_dir / f"{name}.json").read_text())
    prepared = _train_models_module().load_prepared(name, models_dir)
    converted = convert(prepared)
    model = zoo.load_pretrained(name).eval()
    x = torch.zeros(1, 1, 28, 28)
    return {"model": model, "converted": converted, "shape": (1, 28, 28),
            "gbops_fp32": djpq.bops(model, x).gbops, "gbops_compressed": djpq.bops(converted).gbops,
            "integer_acc": meta.get("integer_acc"), "fp32_acc": meta.get("fp32_acc"),
            "how": f"committed DJPQ-trained state models/{name}.pt ({meta['recipe']})",
            "bits": bits_summary(converted), **kept_summary(converted, model)}


def resnet18_pruned(seed: int, w_bits: int = 4) -> dict[str, Any]:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 224, 224)
    config = DJPQConfig(weight=QuantSpec(bits=w_bits), activation=QuantSpec(bits=8),
                        fix_first_last_8bit=True)
    prepared = djpq.prepare(model, x, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in gates(prepared):
            n = gate.mu.numel()
            gate.mu[torch.randperm(n, generator=gen)[:min(n // 2, n - 1)]] = 1e-3
    converted = convert(prepared.eval())
    return {"model": model, "converted": converted, "shape": (3, 224, 224),
            "gbops_fp32": djpq.bops(model, x[:1]).gbops,
            "gbops_compressed": djpq.bops(converted).gbops,
            "how": f"torchvision resnet18 (random init), prepare W{w_bits}A8 (first conv/fc W8A8), "
                   "50 % of every gate group closed (seeded), convert",
            "bits": bits_summary(converted), **kept_summary(converted, model)}


# ------------------------------------------------------------------------------------ backends

def set_tvm_threads(n: int) -> int:
    """Reconfigure TVM's CPU thread pool to ``n`` threads; returns what TVM reports."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, n)
    return int(tvm.get_global_func("runtime.NumThreads")())


def tvm_runner(compiled: Any, x: torch.Tensor) -> Callable[[], Any]:
    """The call a user makes: ``compiled(x)`` (torch tensor in, torch tensor out; since
    2026-12-04 18:10 UTC by DLPack, no copies). Runs before then timed the VM's ``main`` on a
    fresh TVM tensor copied from numpy, returning numpy."""
    return lambda: compiled(x)


def kernel_records(compiled: Any) -> list[Any]:
    """The per-layer kernel records of a build, when it exposes them (``compiled.kernels``)."""
    out = []
    for k in getattr(compiled, "kernels", None) or ():
        out.append(dataclasses.asdict(k) if dataclasses.is_dataclass(k)
                   and not isinstance(k, type) else str(k))
    return out


def print_kernels(name: str, compiled: Any, records: list[Any]) -> None:
    if not records:
        say(f"   {name}: the build exposes no per-layer kernel records (TVM default lowering)")
        return
    report = getattr(compiled, "kernel_report", None)
    say(f"   {name}: kernel per layer")
    if callable(report):
        print(report(), flush=True)
    else:
        for r in records:
            print(f"     {r}", flush=True)


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def timed_rounds(fns: dict[str, Callable[[], Any]], runs: int, warmup: int,
                 max_seconds: float,
                 cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall ms per call of each backend over interleaved rounds; ``cpu`` (if given) receives
    the calling thread's CPU ms per call (``time.thread_time``: at one thread every backend
    computes on the calling thread, so this is its work without the time other processes held
    the core)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    if cpu is not None:
        cpu.update({k: [] for k in fns})
    order = list(fns)
    with torch.inference_mode():
        for _ in range(warmup):
            for k in order:
                fns[k]()
        start = time.perf_counter()
        for r in range(runs):
            if r >= 3 and time.perf_counter() - start > max_seconds:
                break
            rot = order[r % len(order):] + order[: r % len(order)]
            for k in rot:
                c0, t0 = time.thread_time(), time.perf_counter()
                fns[k]()
                times[k].append(1e3 * (time.perf_counter() - t0))
                if cpu is not None:
                    cpu[k].append(1e3 * (time.thread_time() - c0))
    return times


def build_unfused(converted: nn.Module, x: torch.Tensor) -> Any:
    """``build(converted, "x86")`` with ``tvm.compile`` on the module as lowered (no fusion)."""
    import functools
    from unittest import mock

    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.backends.tvm import adapter

    unfused = functools.partial(adapter.compile_module, fuse=False)
    with mock.patch.object(adapter, "compile_module", unfused):
        return tvm_backend.build(converted, "x86", example_inputs=(x,))


def build_nchw(converted: nn.Module, x: torch.Tensor) -> Any:
    """``build(converted, "x86")`` with layout planning off: NCHW between all layers."""
    from unittest import mock

    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.backends.tvm import emit

    with mock.patch.object(emit, "layout_lanes", lambda features: 0):
        return tvm_backend.build(converted, "x86", example_inputs=(x,))


def build_no_amx(converted: nn.Module, x: torch.Tensor) -> Any:
    """``build(converted, "x86")`` for this CPU with its AMX features left out of the target."""
    from unittest import mock

    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.backends.tvm.kernels import amx

    with mock.patch.object(amx, "request_amx", lambda: False):
        return tvm_backend.build(converted, "x86", example_inputs=(x,))


def build_prev_kernels(converted: nn.Module, x: torch.Tensor) -> Any:
    """``build(converted, "x86")`` with the conv kernels as before 2026-12-04 03:30 UTC (commit
    ``3d2bcf9``): no split shift or bias in the rounding term (``SPLIT_SHIFT_KINDS`` empty), no
    batch-outer schedule, no im2col stems, P chosen from the bound alone."""
    from unittest import mock

    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.backends.tvm.kernels import conv2d, select
    from djpq_compiler.backends.tvm.kernels import emit as kernel_emit

    kernel_emit._kernel.cache_clear()  # memoized per spec; batch_outer is decided inside
    try:
        with mock.patch.object(kernel_emit, "SPLIT_SHIFT_KINDS", frozenset()), \
                mock.patch.object(conv2d, "BATCH_OUTER_MIN", 10**9), \
                mock.patch.object(kernel_emit, "im2col_pays", lambda spec: False), \
                mock.patch.object(select, "_fewest_padded", lambda shape, p: (p, "")):
            return tvm_backend.build(converted, "x86", example_inputs=(x,))
    finally:
        kernel_emit._kernel.cache_clear()


def build_no_narrow(converted: nn.Module, x: torch.Tensor) -> Any:
    """``build(converted, "x86")`` without the pixels-in-lanes kernels (``avx2_px16``,
    ``avx512_px16``: ``select.narrow_pixels`` never pays): the build before them."""
    from unittest import mock

    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.backends.tvm.kernels import select

    with mock.patch.object(select, "NARROW_MIN_GAIN", float("inf")):
        return tvm_backend.build(converted, "x86", example_inputs=(x,))


def build_tvm(name: str, converted: nn.Module, x: torch.Tensor, ref: torch.Tensor,
              rec: dict[str, Any], variant: str | None = None) -> Callable[[], Any] | None:
    """Build, check bit-exactness, record build times and kernels; None when TVM fails.
    ``variant``: one of :data:`VARIANTS` (an A/B build) instead of the default build."""
    from djpq_compiler.backends import tvm as tvm_backend

    b = str(x.shape[0])
    if variant is not None:
        compiled = {"tvm_unfused": build_unfused, "tvm_nchw": build_nchw,
                    "tvm_prev_kernels": build_prev_kernels,
                    "tvm_no_amx": build_no_amx,
                    "tvm_no_narrow": build_no_narrow}[variant](converted, x)
        rec.setdefault(f"{variant}_bit_exact", {})[b] = bool(torch.equal(compiled(x), ref))
        return tvm_runner(compiled, x)
    try:
        t0 = time.perf_counter()
        compiled = tvm_backend.build(converted, "x86", example_inputs=(x,))
        rec["build_s"][b] = round(time.perf_counter() - t0, 1)
        rec["load_s"][b] = round(getattr(compiled, "load_seconds", 0.0), 1)
        rec["tvm_bit_exact"][b] = bool(torch.equal(compiled(x), ref))
        records = kernel_records(compiled)
        if b == "1":
            rec["kernels"] = records
            print_kernels(name, compiled, records)
        rec["kernel_variants"][b] = dict(Counter(
            r.get("variant", "?") if isinstance(r, dict) else "?" for r in records))
        return tvm_runner(compiled, x)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        rec["errors"][f"tvm_b{b}"] = msg
        say(f"   TVM failed for {name} batch {b}: {msg}")
        if not isinstance(exc, djpq.DjpqError):
            traceback.print_exc()
        return None


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from djpq_compiler.backends import onnx as onnx_backend

    say(f"== {name}: loading / converting")
    info = (resnet18_pruned(args.seed, 8 if name == "resnet18_w8a8" else 4)
            if name in SYNTHETIC else trained_model(name, Path(args.models_dir)))
    model, converted, shape = info.pop("model"), info.pop("converted"), info.pop("shape")
    rec: dict[str, Any] = {"model": name, "input": list(shape), **info,
                           "float_islands": list(converted_record(converted).float_ops),
                           "build_s": {}, "load_s": {}, "tvm_bit_exact": {},
                           "kernel_variants": {}, "ort_max_abs_diff": {}, "errors": {},
                           "cells": []}
    batches = [int(b) for b in args.batches.split(",")]
    xs = {b: torch.randn(b, *shape, generator=torch.Generator().manual_seed(args.seed + b))
          for b in batches}
    with torch.no_grad():
        refs = {b: converted(x) for b, x in xs.items()}
    tvm_fns = {b: build_tvm(name, converted, x, refs[b], rec) for b, x in xs.items()}
    wanted = [v for v, on in zip(VARIANTS, (args.compare_unfused, args.compare_nchw,
                                            args.compare_prev_kernels, args.compare_no_amx,
                                            args.compare_no_narrow), strict=True) if on]
    variant_fns = {v: {b: build_tvm(name, converted, x, refs[b], rec, variant=v)
                       for b, x in xs.items()} for v in wanted}
    onnx_path = onnx_backend.export(converted, work / f"{name}.onnx", (xs[batches[0]],))
    rec["onnx_bytes"] = onnx_path.stat().st_size
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        tvm_threads = set_tvm_threads(threads)
        session = ort_session(onnx_path, threads)
        in_name = session.get_inputs()[0].name
        for b, x in xs.items():
            feed = {in_name: x.numpy()}
            diff = np.abs(session.run(None, feed)[0] - refs[b].numpy()).max()
            rec["ort_max_abs_diff"][str(b)] = float(diff)
            fns: dict[str, Callable[[], Any]] = {"torch_fp32": lambda m=model, x=x: m(x)}
            if tvm_fns[b] is not None:
                fns["tvm"] = tvm_fns[b]  # type: ignore[assignment]
            fns["onnxruntime"] = lambda s=session, f=feed: s.run(None, f)
            for v, by_batch in variant_fns.items():
                if by_batch.get(b) is not None:
                    fns[v] = by_batch[b]  # type: ignore[assignment]
            load0 = os.getloadavg()[0]
            cpu: dict[str, list[float]] = {}
            times = timed_rounds(fns, args.runs, args.warmup, args.max_seconds,
                                 cpu if threads == 1 else None)
            med = {k: statistics.median(v) for k, v in times.items() if v}
            cpu_med = {k: statistics.median(v) for k, v in cpu.items() if v}
            cell = {"threads": threads, "tvm_threads": tvm_threads, "batch": b,
                    "runs": {k: len(v) for k, v in times.items()}, "median_ms": med,
                    "min_ms": {k: min(v) for k, v in times.items() if v},
                    "iqr_ms": {k: float(np.percentile(v, 75) - np.percentile(v, 25))
                               for k, v in times.items() if v},
                    "speedup_vs_torch_fp32": {k: med["torch_fp32"] / v for k, v in med.items()},
                    "loadavg_before": load0, "loadavg_after": os.getloadavg()[0]}
            if cpu_med:  # one thread: the calling thread's CPU time per call
                cell["cpu_median_ms"] = cpu_med
                cell["cpu_speedup_vs_torch_fp32"] = {
                    k: cpu_med["torch_fp32"] / v for k, v in cpu_med.items() if v > 0}
            rec["cells"].append(cell)
            say(f"   {name} b{b} t{threads}: "
                + "  ".join(f"{k} {v:.2f} ms" for k, v in med.items())
                + f"  (load {load0:.1f})")
    return rec


# ------------------------------------------------------------------------------------- output

def machine() -> dict[str, Any]:
    cpu = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import onnxruntime
    import tvm
    from tvm.target import codegen
    return {"cpu": cpu, "llvm_mcpu": str(codegen.llvm_get_system_cpu()), "cores": os.cpu_count(),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags,
            "python": platform.python_version(), "torch": torch.__version__,
            "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__}


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if v < 10 else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    backends = BACKENDS + tuple(v for v in VARIANTS if any(
        v in c["median_ms"] for r in results for c in r["cells"]))
    extra = [b for b in backends if b in VARIANTS]
    head = ("| model | batch | threads | " + " | ".join(f"{LABELS[b]} ms" for b in backends)
            + " | TVM ×FP32 | onnxruntime ×FP32 | "
            + "".join(f"{LABELS[b]} ×FP32 | " for b in extra) + "TVM ×onnxruntime | "
            + "TVM ×FP32 thread CPU | runs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rec in results:
        for cell in sorted(rec["cells"], key=lambda c: (c["batch"], c["threads"])):
            med, sp = cell["median_ms"], cell["speedup_vs_torch_fp32"]
            ratios = [f"{sp[k]:.2f}×" if k in sp else "—"
                      for k in ["tvm", "onnxruntime", *extra]]
            vs_ort = (f"{med['onnxruntime'] / med['tvm']:.2f}×"
                      if "tvm" in med and "onnxruntime" in med else "—")
            cpu_sp = cell.get("cpu_speedup_vs_torch_fp32", {})
            cpu_ratio = f"{cpu_sp['tvm']:.2f}×" if "tvm" in cpu_sp else "—"
            lines.append(f"| {rec['model']} | {cell['batch']} | {cell['threads']} | "
                         + " | ".join([fmt(med.get(k)) for k in backends] + ratios
                                      + [vs_ort, cpu_ratio])
                         + f" | {min(cell['runs'].values())} |")
    return "\n".join(lines)


def main() -> int:
    args = ARGS or parse_args()
    torch.set_num_interop_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    for name in models:
        if name not in TRAINED + SYNTHETIC:
            raise SystemExit(f"unknown model {name!r}: one of {TRAINED + SYNTHETIC}")
    force_isa(args.isa)
    started = datetime.datetime.now().astimezone()
    say(f"models {models}, batches {args.batches}, threads {args.threads}, runs {args.runs}; "
        f"TVM target {ISA_TARGETS[args.isa] or 'this CPU'}; load {os.getloadavg()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="djpq_latency_") as tmp:
        for name in models:
            results.append(bench_model(name, args, Path(tmp)))
            (out / "results.json").write_text(json.dumps(
                {"partial": True, "results": results}, indent=1, default=str))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False, cwd=HERE).stdout.strip()
    doc = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
           "started": started.isoformat(timespec="seconds"),
           "wall_s": round((datetime.datetime.now().astimezone() - started).total_seconds()),
           "git_commit": commit, "machine": machine(), "settings": vars(args),
           "tvm_target_forced": ISA_TARGETS[args.isa],
           "env": {k: os.environ.get(k) for k in ("TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT",
                                                  "TVM_BIND_THREADS", "OMP_NUM_THREADS",
                                                  "OMP_WAIT_POLICY")},
           "results": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    print(table(results))
    say(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
