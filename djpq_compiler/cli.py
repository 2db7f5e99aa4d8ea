"""The ``djpq`` command line (also ``python -m djpq_compiler`` / ``python -m djpq_compiler.cli``).

Subcommands (one function each, registered in :data:`COMMANDS`):

* ``djpq bops --model NAME`` — BOPs table of a zoo model or of a ``module:function`` factory.
* ``djpq analyze --model NAME`` — channel groups (``djpq_compiler.analyze(...).summary()``).
* ``djpq demo`` — the main job, end to end on Fashion-MNIST: FP32 checkpoint accuracy and BOPs,
  prepare + calibrate, DJPQ fine-tune (time budget), ``convert`` to an integer model, integer
  accuracy, TVM build for the host (bit-exact check, latency), ONNX export (verify, onnxruntime
  latency), and ``runs/demo-<model>/report.md`` with plots (:mod:`djpq_compiler.report`).

Bad arguments exit with status 2 and one line on stderr; a :class:`~djpq_compiler.errors.DjpqError`
exits with status 1 and its message.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from djpq_compiler.bops import bops
from djpq_compiler.errors import ConfigError, DjpqError

__all__ = ["main", "build_parser", "COMMANDS"]

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}


def _command(name: str) -> Callable[[Command], Command]:
    def deco(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------------- helpers


def _parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)`` (argparse type: errors become exit code 2)."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}; use comma-separated positive integers, e.g. 1,3,224,224"
        ) from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}; every dimension must be >= 1")
    return shape


def _positive_bits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid bit-width {text!r}") from None
    if not 1 <= value <= 32:
        raise argparse.ArgumentTypeError(f"bit-width must be in [1, 32], got {text}")
    return value


def _model_spec(text: str) -> str:
    """argparse type: a zoo model name or ``module:function`` (else exit code 2)."""
    from djpq_compiler.zoo import MODELS

    if ":" in text or text in MODELS:
        return text
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}; use a zoo model ({', '.join(sorted(MODELS))}) "
        "or 'module:function'")


def _build_model(spec: str) -> nn.Module:
    """A zoo name, or ``package.module:function`` returning an ``nn.Module``."""
    if ":" not in spec:
        from djpq_compiler.zoo import get_model

        return get_model(spec)
    module_name, _, func_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load model factory {spec!r}: {exc}; use 'module:function' "
                          "with the module importable (on PYTHONPATH)") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {spec!r} returned {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


# --------------------------------------------------------------------------------- subcommands


def _add_bops(sub: argparse._SubParsersAction) -> None:
    from djpq_compiler.zoo import MODELS

    p = sub.add_parser("bops", help="print the BOPs table of a model",
                       description="Print per-layer BOPs of a zoo model or a user model factory.")
    p.add_argument("--model", required=True, type=_model_spec,
                   help=f"zoo model ({', '.join(sorted(MODELS))}) or 'module:function'")
    p.add_argument("--input-size", type=int, default=28,
                   help="square input size for zoo models (default 28)")
    p.add_argument("--input-shape", type=_parse_shape, default=None,
                   help="full input shape, e.g. 1,3,224,224 (default 1,1,S,S)")
    p.add_argument("--weight-bits", type=_positive_bits, default=32.0)
    p.add_argument("--act-bits", type=_positive_bits, default=32.0)


@_command("bops")
def cmd_bops(args: argparse.Namespace) -> int:
    """Print the BOPs table of ``--model`` at the requested bit-widths."""
    model = _build_model(args.model).eval()
    shape = args.input_shape or (1, 1, args.input_size, args.input_size)
    report = bops(model, torch.randn(*shape), weight_bits=args.weight_bits,
                  act_bits=args.act_bits)
    print(f"{args.model} on input {tuple(shape)}, W{args.weight_bits:g}A{args.act_bits:g}")
    print(report.table())
    return 0


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    from djpq_compiler.zoo import MODELS

    p = sub.add_parser("analyze", help="print the channel groups of a model",
                       description="Print the channel groups (what must be pruned together), "
                                   "barriers and ops without a rule of a zoo model or a user "
                                   "model factory.")
    p.add_argument("--model", required=True, type=_model_spec,
                   help=f"zoo model ({', '.join(sorted(MODELS))}) or 'module:function'")
    p.add_argument("--input-size", type=int, default=28,
                   help="square input size for zoo models (default 28)")
    p.add_argument("--input-shape", type=_parse_shape, default=None,
                   help="full input shape, e.g. 1,3,224,224 (default 1,1,S,S)")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first op without a channel rule instead of a barrier")


@_command("analyze")
def cmd_analyze(args: argparse.Namespace) -> int:
    """Print ``djpq_compiler.analyze(model, x).summary()`` for ``--model``."""
    from djpq_compiler.analysis import analyze

    model = _build_model(args.model).eval()
    shape = args.input_shape or (1, 1, args.input_size, args.input_size)
    print(f"{args.model} on input {tuple(shape)}")
    print(analyze(model, torch.randn(*shape), strict=args.strict).summary())
    return 0


DEMO_FALLBACKS = ("vgg7", "mobilenetv2", "inception")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _zoo_name(text: str) -> str:
    from djpq_compiler.zoo import MODELS

    if text in MODELS:
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}; use a zoo model with a committed "
                                     f"checkpoint ({', '.join(sorted(MODELS))})")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the main job: DJPQ fine-tune, convert to integer, TVM + ONNX, report",
        description="End to end on Fashion-MNIST: FP32 checkpoint accuracy and BOPs -> prepare "
                    "+ calibrate -> DJPQ fine-tune (time budget) -> convert to an integer model "
                    "-> integer accuracy (PyTorch reference executor) -> TVM build for this "
                    "host (bit-exact check, latency) -> ONNX export (verify, onnxruntime "
                    "latency) -> OUT/report.md, plots, model.onnx and the TVM library.")
    p.add_argument("--model", type=_zoo_name, default=None,
                   help="zoo model with a committed FP32 checkpoint (default: resnet20, or the "
                        f"first of {', '.join(DEMO_FALLBACKS)} with a checkpoint)")
    p.add_argument("--minutes", type=_non_negative_float, default=2.0,
                   help="DJPQ fine-tune wall-clock budget in minutes (default 2)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="stop the fine-tune after this many steps (default: budget only)")
    p.add_argument("--gamma", type=_non_negative_float, default=1.0,
                   help="weight of the DJPQ regulariser, loss = task + gamma * R (default 1)")
    p.add_argument("--train-subset", type=_positive_int, default=None,
                   help="fine-tune on N random training images (default: all 60k)")
    p.add_argument("--test-subset", type=_positive_int, default=None,
                   help="evaluate on N random test images (default: the full 10k test set)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="(default 128)")
    p.add_argument("--latency-runs", type=_positive_int, default=30,
                   help="timed runs per latency measurement, median reported (default 30)")
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<model>)")
    p.add_argument("--no-tvm", action="store_true", help="skip the TVM build and its checks")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and its checks")
    p.add_argument("--seed", type=int, default=0, help="seed of shuffling, subsets and init")
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: $DJPQ_DATA "
                                                "or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _demo_model(requested: str | None) -> tuple[str, list[str]]:
    """The zoo model to run and notes; falls back when the default has no checkpoint yet."""
    from djpq_compiler.zoo import checkpoint_path

    if requested is not None:
        return requested, []
    if checkpoint_path("resnet20").is_file():
        return "resnet20", []
    for name in DEMO_FALLBACKS:
        if checkpoint_path(name).is_file():
            note = (f"no committed resnet20 checkpoint yet ({checkpoint_path('resnet20')}); "
                    f"running the demo on {name} instead (choose with --model)")
            print(f"djpq demo: {note}", file=sys.stderr)
            return name, [note]
    return "resnet20", []  # load_pretrained raises the ArtifactError that says what to do


def _median_ms(fn: Callable[[], object], runs: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup``."""
    import statistics
    import time

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _say(text: str) -> None:
    print(text, flush=True)


def _finetune_stage(args: argparse.Namespace, model: nn.Module, train: object) -> tuple:
    """Prepare + calibrate on 4 training batches, then DJPQ fine-tune; (prepared, steps, s)."""
    import itertools
    import time

    from tqdm import tqdm

    import djpq_compiler as djpq
    from djpq_compiler.finetune import FinetuneConfig, finetune

    calib = [x for x, _ in itertools.islice(train, 4)]  # type: ignore[call-overload]
    _say(f"[prepare] gates + quantizers, calibrating on {len(calib)} training batches")
    prepared = djpq.prepare(model, calib[0], djpq.DJPQConfig(), calibration_data=calib)
    _say(f"[fine-tune] gamma {args.gamma:g}, budget {args.minutes:g} min"
         + (f" / {args.steps} steps" if args.steps else ""))
    cfg = FinetuneConfig(gamma=args.gamma, steps=args.steps, minutes=args.minutes,
                         log_every=10 if args.steps is None else max(1, min(10, args.steps)))
    steps = [0]  # training forwards = optimizer steps (finetune() logs every log_every only)
    hook = prepared.register_forward_pre_hook(
        lambda mod, inp: steps.__setitem__(0, steps[0] + mod.training))
    start = time.perf_counter()
    try:
        finetune(prepared, train, cfg, progress=not args.no_progress,  # type: ignore[arg-type]
                 on_log=lambda log: tqdm.write(
                     f"  step {log.step:5d}  {log.seconds:5.0f} s  task {log.task_loss:.3f}  "
                     f"R {log.regularizer:.4f}  {log.gbops:.4f} GBOPs"))
    finally:
        hook.remove()
    return prepared, steps[0], time.perf_counter() - start


def _torch_latencies(model: nn.Module, converted: nn.Module, xs: Sequence[torch.Tensor],
                     runs: int) -> list:
    """Latency of the FP32 PyTorch model and the integer reference executor at each batch."""
    from djpq_compiler.report import Latency

    threads = f"{torch.get_num_threads()} threads"
    out = []
    for label, module in (("FP32 PyTorch", model), ("integer reference (PyTorch)", converted)):
        for x in xs:
            out.append(Latency(label, x.shape[0], _median_ms(functools.partial(module, x), runs),
                               runs, threads))
    return out


def _tvm_stage(converted: nn.Module, xs: Sequence[torch.Tensor], out: Path,
               runs: int) -> tuple[bool, str, list, dict[str, str]]:
    """Build for the host at each batch size, bit-exact check against the reference, latency,
    export the batch-1 library (``.so``, or ``.tar`` without a linker)."""
    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.report import Latency

    exact, lat, seconds, built = True, [], 0.0, []
    for x in xs:
        _say(f"[tvm] building for x86 (this host), batch {x.shape[0]}")
        compiled_x = tvm_backend.build(converted, target="x86", example_inputs=(x,))
        seconds += compiled_x.compile_seconds
        with torch.no_grad():
            ref = converted(x)
        got = compiled_x(x)
        exact = exact and got.dtype == ref.dtype and torch.equal(got, ref)
        lat.append(Latency("TVM (x86, untuned)", x.shape[0],
                           _median_ms(functools.partial(compiled_x, x), runs), runs))
        built.append(compiled_x)
    key = f"TVM library (x86, batch {xs[0].shape[0]})"
    try:
        artifacts = {key: built[0].export(out / "model_tvm.so").name}
    except Exception as exc:  # no linker: fall back to the object archive
        _say(f"[tvm] .so export failed ({exc}); writing a .tar")
        artifacts = {key: built[0].export(out / "model_tvm.tar").name}
    note = f"checked at batch {', '.join(str(x.shape[0]) for x in xs)}; compile {seconds:.1f} s"
    return exact, note, lat, artifacts


def _onnx_stage(converted: nn.Module, xs: Sequence[torch.Tensor], out: Path,
                runs: int) -> tuple[int, str, list, dict[str, str]]:
    """Export ``model.onnx`` (dynamic batch), verify against the reference, time onnxruntime."""
    from djpq_compiler.backends import onnx as onnx_backend
    from djpq_compiler.report import Latency

    path = onnx_backend.export(converted, out / "model.onnx", (xs[0],))
    _say(f"[onnx] exported {path}; verifying in onnxruntime")
    check = onnx_backend.verify(converted, path, (xs[-1],))
    ort = onnx_backend.require_onnx(runtime=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feeds = [{name: x.numpy()} for x in xs]
    lat = [Latency("onnxruntime (CPU)", x.shape[0],
                   _median_ms(functools.partial(session.run, None, feed), runs), runs)
           for x, feed in zip(xs, feeds, strict=True)]
    note = (f"batch {xs[-1].shape[0]}; end to end max {check['max_lsb_any']} LSB at some "
            f"activation, {check['mismatch_last']:.2%} of the last activation's codes differ, "
            f"max |output diff| {check['max_abs_diff']:.3g}")
    return int(check["max_lsb_per_op"]), note, lat, {"ONNX (QDQ, dynamic batch)": path.name}


def _backend_stages(args: argparse.Namespace, converted: nn.Module, xs: Sequence[torch.Tensor],
                    out: Path) -> tuple[dict[str, Any], list[str]]:
    """TVM and ONNX stages (unless disabled); a failing stage is reported, not fatal."""
    fields: dict[str, Any] = {"latencies": [], "artifacts": {}}
    failures = []
    if args.no_tvm:
        fields["tvm_note"] = "skipped (--no-tvm)"
    else:
        try:
            exact, note, lat, files = _tvm_stage(converted, xs, out, args.latency_runs)
            fields.update(tvm_bit_exact=exact, tvm_note=note)
            fields["latencies"] += lat
            fields["artifacts"].update(files)
            if not exact:
                failures.append("TVM output is not bit-exact with the integer reference")
        except DjpqError as exc:
            fields["tvm_note"] = f"failed: {exc}"
            failures.append(f"TVM stage failed: {exc}")
    if args.no_onnx:
        fields["onnx_note"] = "skipped (--no-onnx)"
    else:
        try:
            lsb, note, lat, files = _onnx_stage(converted, xs, out, args.latency_runs)
            fields.update(onnx_max_lsb=lsb, onnx_note=note)
            fields["latencies"] += lat
            fields["artifacts"].update(files)
            if lsb > 1:
                failures.append(f"onnxruntime differs by {lsb} LSB (> 1) from the reference")
        except DjpqError as exc:
            fields["onnx_note"] = f"failed: {exc}"
            failures.append(f"ONNX stage failed: {exc}")
    return fields, failures


def _demo_settings(args: argparse.Namespace, name: str, train: Any, test: Any) -> dict[str, Any]:
    import platform

    from djpq_compiler.zoo import checkpoint_path

    return {"model": name, "checkpoint": str(checkpoint_path(name)), "seed": args.seed,
            "gamma": args.gamma, "fine-tune budget": f"{args.minutes:g} min"
            + (f", at most {args.steps} steps" if args.steps else ""),
            "training images": len(train.dataset), "test images": _n_images(test),
            "batch size": args.batch_size, "DJPQ config": "DJPQConfig() defaults",
            "host": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} torch threads"}


@_command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: FP32 -> DJPQ fine-tune -> integer model -> TVM / ONNX -> report."""
    import djpq_compiler as djpq
    from djpq_compiler.convert import convert
    from djpq_compiler.data import fashion_mnist_loaders
    from djpq_compiler.finetune import accuracy
    from djpq_compiler.report import DemoResult, layer_rows, summary, write_report
    from djpq_compiler.verify import integer_agreement
    from djpq_compiler.zoo import load_pretrained

    name, notes = _demo_model(args.model)
    out = Path(args.out or f"runs/demo-{name}")
    torch.manual_seed(args.seed)
    train, test = fashion_mnist_loaders(args.batch_size, args.data, args.seed,
                                        args.train_subset, args.test_subset)
    model = load_pretrained(name)
    x32 = next(iter(test))[0][:32]
    xs = [x32[:1], x32] if x32.shape[0] > 1 else [x32]
    progress = not args.no_progress
    fp32 = bops(model, xs[0])
    fp32_acc = accuracy(model, test, progress=progress)
    _say(f"[fp32] {name}: test accuracy {100 * fp32_acc:.2f} % on {_n_images(test)} images, "
         f"{fp32.gbops:.4f} GBOPs")
    _say(fp32.table())
    prepared, steps, seconds = _finetune_stage(args, model, train)
    fq_acc = accuracy(prepared, test, progress=progress)
    fq_gbops = bops(prepared).gbops
    _say(f"[fake-quant] test accuracy {100 * fq_acc:.2f} %, {fq_gbops:.4f} GBOPs")
    _say(djpq.layer_summary(prepared).table())
    converted = convert(prepared)
    int_report = bops(converted)
    int_acc = accuracy(converted, test, progress=progress)
    _say(f"[integer] test accuracy {100 * int_acc:.2f} % (reference executor), "
         f"{int_report.gbops:.4f} GBOPs ({fp32.total / int_report.total:.1f}x fewer)")
    agreement = integer_agreement(prepared, converted, x32)
    latencies = _torch_latencies(model, converted, xs, args.latency_runs)
    fields, failures = _backend_stages(args, converted, xs, out)
    fields["latencies"] = latencies + fields["latencies"]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    result = DemoResult(
        model=name, command="djpq " + shlex.join(args.argv), notes=notes,
        settings=_demo_settings(args, name, train, test), fp32_acc=fp32_acc,
        fake_quant_acc=fq_acc, integer_acc=int_acc, test_images=_n_images(test),
        fp32_gbops=fp32.gbops, fake_quant_gbops=fq_gbops, integer_gbops=int_report.gbops,
        layers=layer_rows(int_report.rows), train_steps=steps, train_seconds=seconds,
        float_islands=tuple(converted.meta.get("djpq.float_ops", ())),
        integer_agreement=agreement, **fields)
    result.settings["load average (1/5/15 min) after the latency runs"] = load
    paths = write_report(result, out)
    _say("")
    _say(summary(result))
    _say(f"report: {paths['report']}")
    for failure in failures:
        print(f"djpq demo: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The ``djpq`` argument parser with every subcommand."""
    from djpq_compiler import __version__

    parser = argparse.ArgumentParser(prog="djpq", description="Differentiable Joint Pruning and "
                                                              "Quantization compiler.")
    parser.add_argument("--version", action="version", version=f"djpq-compiler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_bops(sub)
    _add_analyze(sub)
    _add_demo(sub)
    return parser


def _n_images(loader: torch.utils.data.DataLoader) -> int:
    return len(loader.dataset)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2: bad arguments, 1: a DjpqError)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except DjpqError as exc:
        print(f"djpq {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
