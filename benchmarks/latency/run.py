"""Inference latency of DJPQ-compressed models: PyTorch FP32 vs TVM (untuned, tuned) vs onnxruntime.

For every model and batch size all backends are built first, then timed *interleaved*: after
``--warmup`` calls each, round ``r`` of ``--runs`` calls every backend once (the order rotates
from round to round), so a change in machine load hits all backends alike. Medians are
reported, with the ratio ``PyTorch FP32 ms / backend ms`` (> 1: faster than FP32 eager).

Backends (all with ``--threads`` threads):
  * ``torch_fp32``: PyTorch eager of the ORIGINAL (unpruned, float) model,
    ``torch.set_num_threads(threads)``, ``torch.inference_mode``.
  * ``tvm_untuned``: ``backends.tvm.build(converted, "x86")`` with TVM's default schedules.
  * ``tvm_tuned``: ``backends.tvm.tune(converted, "x86", trials=--trials)`` into a fresh
    meta_schedule database, then ``build(..., work_dir=...)`` (only models in ``--tune-models``).
  * ``onnxruntime``: the QDQ ONNX file of the same converted model
    (``backends.onnx.export``, dynamic batch), ``CPUExecutionProvider``,
    ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, default graph optimizations.
  Thread pools do not spin (``TVM_THREAD_POOL_SPIN_COUNT=0``, ``OMP_WAIT_POLICY=PASSIVE``,
  onnxruntime ``session.intra_op.allow_spinning=0``), so interleaved backends do not steal each
  other's cores. TVM is timed through a persistent Relax VM (input array -> VM -> numpy output,
  like an onnxruntime ``session.run`` on a numpy feed); ``TVM_NUM_THREADS`` is set before TVM loads.
  The integer reference executor (the converted GraphModule run by PyTorch) is a correctness
  oracle, not a deployment backend, and is not timed.

Models (the compressed model is a deterministic stand-in, not a trained DJPQ result):
  * Fashion-MNIST zoo nets (committed FP32 checkpoints, ``zoo.load_pretrained``), 1x28x28:
    ``prepare`` with W4A8 (first and last layer W8A8, ``fix_first_last_8bit``), calibrated on
    random inputs, and ``--close`` (default 45 %) of the channels of every gate group closed
    (seeded ``randperm``; at least one channel kept), then ``convert``.
  * ``resnet18``: torchvision resnet18 (random init: no ImageNet weights offline), 3x224x224;
    a prepared copy with half of every prunable group closed gives a ``CompressionPlan`` that is
    saved, loaded and replayed with ``apply_plan`` on the original model; ``apply_plan`` only
    carries the structure, so the pruned float model is prepared again with ``prune=False`` and
    one fixed-bit ``Override`` per layer taken from the plan's ``layers`` (W4A8, first/last
    W8A8), then converted.

Usage:
  python benchmarks/latency/run.py --models resnet20,vgg7,mobilenetv2,resnet18 --batches 1,32 \
      --runs 20 --threads 2 --trials 64 --out benchmarks/latency
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

FMNIST = ("resnet20", "vgg7", "mobilenetv2", "inception")
BACKENDS = ("torch_fp32", "tvm_untuned", "tvm_tuned", "onnxruntime")
LABELS = {"torch_fp32": "PyTorch FP32 eager (original)", "tvm_untuned": "TVM untuned",
          "tvm_tuned": "TVM tuned", "onnxruntime": "onnxruntime QDQ"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20,vgg7,mobilenetv2,resnet18")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per backend (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per backend first")
    ap.add_argument("--max-seconds", type=float, default=90.0,
                    help="stop the timed rounds of one (model, batch) after this long "
                         "(at least 3 rounds); the runs actually done are recorded")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=64,
                    help="meta_schedule trials per (model, batch); 0 = no tuned TVM")
    ap.add_argument("--tune-models", default="vgg7",
                    help="models to tune (each pruned kernel shape is its own task: ~1 min per "
                         "task on a loaded 2-core host, so resnet20/resnet18 take too long)")
    ap.add_argument("--tune-batches", default="1", help="batch sizes to tune")
    ap.add_argument("--close", type=float, default=0.45,
                    help="fraction of every gate group closed in the zoo stand-ins")
    ap.add_argument("--profile", action="store_true", default=True,
                    help="per-kernel TVM profile and onnxruntime per-op profile at batch 1")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--out", default="benchmarks/latency")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools read these when the libraries load
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
    # No busy-waiting thread pools: interleaved backends (and other tenants of a shared host)
    # would otherwise burn each other's cores between calls.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import djpq_compiler as djpq  # noqa: E402
from djpq_compiler import zoo  # noqa: E402
from djpq_compiler.config import DJPQConfig, Override, QuantSpec  # noqa: E402
from djpq_compiler.convert import convert  # noqa: E402
from djpq_compiler.plan import CompressionPlan, apply_plan, plan_from  # noqa: E402
from djpq_compiler.prepared import gates  # noqa: E402


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


W4A8 = dict(weight=QuantSpec(bits=4), activation=QuantSpec(bits=8), fix_first_last_8bit=True)


def close_gates(prepared: nn.Module, fraction: float, seed: int) -> None:
    """Close ``floor(fraction * size)`` seeded-random channels of every gate group."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in gates(prepared):
            n = gate.mu.numel()
            k = min(int(fraction * n), n - 1)
            gate.mu[torch.randperm(n, generator=gen)[:k]] = 1e-3


def kept_summary(converted: nn.Module, original: nn.Module) -> dict[str, int]:
    def chans(m: nn.Module) -> int:
        return sum(int(mod.weight.shape[0]) for mod in m.modules()
                   if isinstance(getattr(mod, "weight", None), torch.Tensor)
                   and mod.weight.dim() == 4)
    return {"conv_out_channels_kept": chans(converted),
            "conv_out_channels_original": chans(original)}


def zoo_model(name: str, close: float, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = zoo.load_pretrained(name).eval()
    calib = [torch.randn(32, 1, 28, 28) for _ in range(2)]
    prepared = djpq.prepare(model, calib[0], DJPQConfig(**W4A8), calibration_data=calib)
    close_gates(prepared, close, seed)
    converted = convert(prepared.eval())
    return {"model": model, "converted": converted, "shape": (1, 28, 28),
            "gbops_fp32": djpq.bops(model, calib[0][:1]).gbops,
            "gbops_compressed": djpq.bops(converted).gbops,
            "how": f"zoo FP32 checkpoint; prepare W4A8 (first/last W8A8); {close:.0%} of every "
                   "gate group closed (seeded); convert",
            **kept_summary(converted, model)}


def resnet18_from_plan(work: Path, seed: int) -> dict[str, Any]:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 224, 224)
    prepared = djpq.prepare(model, x, DJPQConfig(**W4A8))
    close_gates(prepared, 0.5, seed)
    plan_path = plan_from(prepared.eval()).save(work / "resnet18_plan.json")
    plan = CompressionPlan.load(plan_path)
    pruned = apply_plan(model, x, plan)
    overrides = tuple(
        Override(name, weight=QuantSpec(bits=int(b["w_bits"]), learn_bits=False),
                 activation=QuantSpec(bits=int(b["a_bits"]), learn_bits=False))
        for name, b in plan.layers.items())
    cfg = DJPQConfig(**W4A8, prune=False, overrides=overrides)
    converted = convert(djpq.prepare(pruned, x, cfg).eval())
    bits = sorted({(int(b["w_bits"]), int(b["a_bits"])) for b in plan.layers.values()})
    kept = sum(len(v) for v in plan.keep.values()) / sum(plan.groups.values())
    return {"model": model, "converted": converted, "shape": (3, 224, 224),
            "gbops_fp32": djpq.bops(model, x[:1]).gbops,
            "gbops_compressed": djpq.bops(converted).gbops,
            "plan_hash": plan.hash, "plan_bits_wa": bits, "plan_kept_fraction": kept,
            "how": "torchvision resnet18 (random init); CompressionPlan with 50 % of every group "
                   "closed -> save/load -> apply_plan -> prepare(prune=False, per-layer fixed "
                   "bits from plan.layers: W4A8, first/last W8A8) -> convert",
            **kept_summary(converted, model)}


# ------------------------------------------------------------------------------------ backends

def tvm_runner(compiled: Any, x: torch.Tensor) -> Callable[[], Any]:
    import tvm

    dev = tvm.cpu()
    vm = tvm.relax.VirtualMachine(compiled.executable, dev)
    arr = x.numpy()
    fn = vm["main"]

    def run() -> Any:
        out = fn(tvm.runtime.tensor(arr, dev))
        return out.numpy() if hasattr(out, "numpy") else [o.numpy() for o in out]
    return run


def tvm_profile(compiled: Any, x: torch.Tensor, top: int = 8) -> dict[str, Any]:
    """Per-kernel times of one VM run (``profile=True``): conv/matmul kernels vs the rest."""
    import csv
    import io

    import tvm

    dev = tvm.cpu()
    vm = tvm.relax.VirtualMachine(compiled.executable, dev, profile=True)
    inp = tvm.runtime.tensor(x.numpy(), dev)
    vm["main"](inp)
    report = vm.profile("main", inp)
    rows = list(csv.DictReader(io.StringIO(report.csv())))
    kernels: dict[str, float] = {}
    for row in rows:
        name = row.get("Name", "")
        dur = row.get("Duration (us)", "0").replace(",", "")
        try:
            kernels[name] = kernels.get(name, 0.0) + float(dur)
        except ValueError:
            continue
    total = sum(kernels.values())

    def kind(name: str) -> str:
        n = name.lower()
        if "conv" in n or "matmul" in n or "dense" in n:
            return "conv/matmul (incl. fused requantize)"
        if "vm." in n or "builtin" in n or "alloc" in n:
            return "VM/alloc"
        return "other (requantize/add/pool/cast islands)"
    shares: dict[str, float] = {}
    for name, us in kernels.items():
        shares[kind(name)] = shares.get(kind(name), 0.0) + us
    return {"total_us": total, "share": {k: v / total for k, v in shares.items()} if total else {},
            "top": sorted(([k, v] for k, v in kernels.items()), key=lambda r: -r[1])[:top]}


def ort_session(path: Path, threads: int, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_profile(path: Path, x: torch.Tensor, threads: int, work: Path,
                runs: int = 5) -> dict[str, Any]:
    """onnxruntime per-op-type time share over a few runs, and which kernels ran."""
    sess = ort_session(path, threads, str(work / "ort_profile"))
    feed = {sess.get_inputs()[0].name: x.numpy()}
    for _ in range(runs + 1):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_type: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            by_type[op] = by_type.get(op, 0.0) + float(ev.get("dur", 0))
    total = sum(by_type.values())
    return {"total_us": total / max(1, runs + 1),
            "share": {k: v / total for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}
            if total else {}}


def timed_rounds(fns: dict[str, Callable[[], Any]], runs: int, warmup: int,
                 max_seconds: float) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
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
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(1e3 * (time.perf_counter() - t0))
    return times


def bench_model(name: str, args: argparse.Namespace, work: Path,
                batches: list[int]) -> dict[str, Any]:
    from djpq_compiler.backends import onnx as onnx_backend
    from djpq_compiler.backends import tvm as tvm_backend

    say(f"== {name}: building the compressed model")
    t0 = time.perf_counter()
    info = (resnet18_from_plan(work, args.seed) if name == "resnet18"
            else zoo_model(name, args.close, args.seed))
    model, converted, shape = info.pop("model"), info.pop("converted"), info.pop("shape")
    rec: dict[str, Any] = {"model": name, "input": list(shape), **info,
                           "float_islands": list(converted.meta.get("djpq.float_ops", ())),
                           "prepare_convert_s": round(time.perf_counter() - t0, 1),
                           "batches": {}, "notes": []}
    onnx_path = onnx_backend.export(converted, work / f"{name}.onnx",
                                    (torch.randn(1, *shape),))
    rec["onnx_bytes"] = onnx_path.stat().st_size
    session = ort_session(onnx_path, args.threads)
    in_name = session.get_inputs()[0].name
    tune_model = args.trials > 0 and name in args.tune_models.split(",")
    for b in batches:
        gen = torch.Generator().manual_seed(args.seed + b)
        x = torch.randn(b, *shape, generator=gen)
        fns: dict[str, Callable[[], Any]] = {"torch_fp32": lambda m=model, x=x: m(x)}
        brec: dict[str, Any] = {"build_s": {}, "errors": {}}
        try:
            compiled = tvm_backend.build(converted, "x86", example_inputs=(x,))
            brec["build_s"]["tvm_untuned"] = round(compiled.compile_seconds, 1)
            with torch.no_grad():
                ref = converted(x)
            brec["tvm_bit_exact"] = bool(torch.equal(compiled(x), ref))
            fns["tvm_untuned"] = tvm_runner(compiled, x)
            if tune_model and str(b) in args.tune_batches.split(","):
                tdir = work / f"tuning_{name}_b{b}"
                say(f"   tuning {name} batch {b}: {args.trials} trials")
                rep = tvm_backend.tune(converted, "x86", (x,), trials=args.trials,
                                       work_dir=tdir, seed=args.seed,
                                       on_log=lambda line: say("     " + line))
                tuned = tvm_backend.build(converted, "x86", example_inputs=(x,), work_dir=tdir)
                brec["tune"] = {"trials": args.trials, "tasks": len(rep.tasks),
                                "records": rep.records, "seconds": round(rep.seconds, 1),
                                "tuned_kernels": list(tuned.tuned_kernels or ())}
                brec["tvm_tuned_bit_exact"] = bool(torch.equal(tuned(x), ref))
                fns["tvm_tuned"] = tvm_runner(tuned, x)
            if args.profile and b == batches[0]:
                try:
                    brec["tvm_profile_untuned"] = tvm_profile(compiled, x)
                except Exception as exc:  # profiling is a bonus
                    brec["tvm_profile_untuned"] = {"error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            brec["errors"]["tvm"] = msg
            say(f"   TVM failed for {name}: {msg}")
            if not isinstance(exc, djpq.DjpqError):
                traceback.print_exc()
        feed = {in_name: x.numpy()}
        fns["onnxruntime"] = lambda s=session, f=feed: s.run(None, f)
        if args.profile and b == batches[0]:
            try:
                brec["ort_profile"] = ort_profile(onnx_path, x, args.threads, work)
            except Exception as exc:  # profiling is a bonus
                brec["ort_profile"] = {"error": f"{type(exc).__name__}: {exc}"}
        load0 = os.getloadavg()
        say(f"   timing {name} batch {b}: {', '.join(fns)} (load {load0[0]:.2f})")
        times = timed_rounds(fns, args.runs, args.warmup, args.max_seconds)
        med = {k: statistics.median(v) for k, v in times.items() if v}
        brec.update({
            "runs": {k: len(v) for k, v in times.items()},
            "median_ms": med,
            "min_ms": {k: min(v) for k, v in times.items() if v},
            "iqr_ms": {k: (float(np.percentile(v, 75)) - float(np.percentile(v, 25)))
                       for k, v in times.items() if v},
            "speedup_vs_torch_fp32": {k: med["torch_fp32"] / v for k, v in med.items()},
            "loadavg_before": load0[0], "loadavg_after": os.getloadavg()[0]})
        rec["batches"][str(b)] = brec
        say("   " + "  ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
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
    try:
        from tvm.target import codegen
        mcpu = str(codegen.llvm_get_system_cpu())
    except Exception:
        mcpu = "?"
    return {"cpu": cpu, "llvm_mcpu": mcpu, "cores": os.cpu_count(),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags,
            "python": platform.python_version(), "torch": torch.__version__,
            "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__}


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if v < 10 else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    head = ("| model | batch | " + " | ".join(f"{LABELS[b]} ms" for b in BACKENDS)
            + " | TVM untuned ×FP32 | TVM tuned ×FP32 | onnxruntime ×FP32 | runs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rec in results:
        for b, br in rec["batches"].items():
            med, sp = br.get("median_ms", {}), br.get("speedup_vs_torch_fp32", {})
            cells = [fmt(med.get(k)) for k in BACKENDS]
            ratios = [f"{sp[k]:.2f}×" if k in sp else "—"
                      for k in ("tvm_untuned", "tvm_tuned", "onnxruntime")]
            runs = min(br.get("runs", {}).values() or [0])
            lines.append(f"| {rec['model']} | {b} | " + " | ".join(cells + ratios)
                         + f" | {runs} |")
    return "\n".join(lines)


def main() -> int:
    args = ARGS or parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",")]
    started = datetime.datetime.now().astimezone()
    say(f"models {models}, batches {batches}, runs {args.runs}, threads {args.threads}, "
        f"trials {args.trials} ({args.tune_models}); load {os.getloadavg()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="djpq_latency_") as tmp:
        for name in models:
            if name not in FMNIST and name != "resnet18":
                raise SystemExit(f"unknown model {name!r}: one of {FMNIST + ('resnet18',)}")
            results.append(bench_model(name, args, Path(tmp), batches))
            (out / "results.json").write_text(json.dumps(
                {"partial": True, "results": results}, indent=1, default=str))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = "?"
    doc = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
           "started": started.isoformat(timespec="seconds"),
           "wall_s": round((datetime.datetime.now().astimezone() - started).total_seconds()),
           "git_commit": commit, "machine": machine(),
           "settings": {k: v for k, v in vars(args).items()},
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
