"""The ``djpq`` command line (also ``python -m djpq_compiler`` / ``python -m djpq_compiler.cli``).

Subcommands (one function each, registered in :data:`COMMANDS`):

* ``djpq bops --model NAME`` — BOPs table of a zoo model or of a ``module:function`` factory.
* ``djpq analyze --model NAME`` — channel groups (``djpq_compiler.analyze(...).summary()``).
* ``djpq demo`` — the main job, end to end on Fashion-MNIST: FP32 checkpoint accuracy and BOPs,
  prepare + calibrate, DJPQ fine-tune (time budget), ``convert`` to an integer model, integer
  accuracy, TVM build for the host (bit-exact check, latency), ONNX export (verify, onnxruntime
  latency), and ``runs/demo-<model>/report.md`` with plots; the pipeline itself is
  :func:`djpq_compiler.workflows.demo.run_demo` (callable from Python with a ``DemoOptions``).
* ``djpq compress --model module:function --data DIR`` — the same pipeline for a user model and
  an ``ImageFolder`` dataset (:func:`djpq_compiler.workflows.compress.run_compress`).

Bad arguments exit with status 2 and one line on stderr; a :class:`~djpq_compiler.errors.DjpqError`
exits with status 1 and its message.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from djpq_compiler.bops import bops
from djpq_compiler.errors import DjpqError

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
    from djpq_compiler.workflows.zoo import MODELS

    if ":" in text or text in MODELS:
        return text
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}; use a zoo model ({', '.join(sorted(MODELS))}) "
        "or 'module:function'")


def _cwd_on_path() -> None:
    """Import user modules from the current directory, as ``python -m`` does (the ``djpq``
    console script does not put it on ``sys.path``)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _build_model(spec: str) -> nn.Module:
    """A zoo name, or ``module:function`` / ``file.py:function`` returning an ``nn.Module``."""
    if ":" not in spec:
        from djpq_compiler.workflows.zoo import get_model

        return get_model(spec)
    from djpq_compiler.workflows.compress import load_factory

    _cwd_on_path()
    return load_factory(spec)


# --------------------------------------------------------------------------------- subcommands


def _add_bops(sub: argparse._SubParsersAction) -> None:
    from djpq_compiler.workflows.zoo import MODELS

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
    from djpq_compiler.workflows.zoo import MODELS

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


def _floats(text: str) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"`` -> ``(0.5, 0.5, 0.5)`` (argparse type)."""
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value list {text!r}; use comma-separated numbers, e.g. 0.5,0.5,0.5"
        ) from None


def _zoo_name(text: str) -> str:
    from djpq_compiler.workflows.zoo import MODELS

    if text in MODELS:
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}; use a zoo model with a committed "
                                     f"checkpoint ({', '.join(sorted(MODELS))})")


def _factory_spec(text: str) -> str:
    if ":" in text:
        return text
    raise argparse.ArgumentTypeError(f"invalid model {text!r}; use 'module:function' or "
                                     "'path/to/file.py:function'")


def _add_run_options(p: argparse.ArgumentParser, batch_size: int,
                     subsets: tuple[str, str]) -> None:
    """Budget, subset and stage options shared by ``demo`` and ``compress``."""
    p.add_argument("--minutes", type=_non_negative_float, default=2.0,
                   help="DJPQ fine-tune wall-clock budget in minutes (default 2)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="stop the fine-tune after this many steps (default: budget only)")
    p.add_argument("--gamma", type=_non_negative_float, default=1.0,
                   help="weight of the DJPQ regulariser, loss = task + gamma * R (default 1)")
    p.add_argument("--train-subset", type=_positive_int, default=None,
                   help=f"fine-tune on N random training images (default: {subsets[0]})")
    p.add_argument("--test-subset", type=_positive_int, default=None,
                   help=f"evaluate on N random test images (default: {subsets[1]})")
    p.add_argument("--batch-size", type=_positive_int, default=batch_size,
                   help=f"(default {batch_size})")
    p.add_argument("--latency-runs", type=_positive_int, default=30,
                   help="timed runs per latency measurement, median reported (default 30)")
    p.add_argument("--no-tvm", action="store_true", help="skip the TVM build and its checks")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and its checks")
    p.add_argument("--seed", type=int, default=0, help="seed of shuffling, subsets and init")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"minutes": args.minutes, "steps": args.steps, "gamma": args.gamma,
            "train_subset": args.train_subset, "test_subset": args.test_subset,
            "batch_size": args.batch_size, "latency_runs": args.latency_runs,
            "tvm": not args.no_tvm, "onnx": not args.no_onnx, "seed": args.seed,
            "progress": not args.no_progress, "out": args.out}


def _finish(command: str, outcome: Any) -> int:
    """Print each failed backend check; exit status 1 when there is one."""
    for failure in outcome.failures:
        print(f"djpq {command}: error: {failure}", file=sys.stderr)
    return 0 if outcome.ok else 1


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from djpq_compiler.workflows.demo import DEMO_FALLBACKS

    p = sub.add_parser(
        "demo", help="the main job: DJPQ fine-tune, convert to integer, TVM + ONNX, report",
        description="End to end on Fashion-MNIST: FP32 checkpoint accuracy and BOPs -> prepare "
                    "+ calibrate -> DJPQ fine-tune (time budget) -> convert to an integer model "
                    "-> integer accuracy (PyTorch reference executor) -> TVM build for this "
                    "host (bit-exact check, latency) -> ONNX export (verify, onnxruntime "
                    "latency) -> OUT/report.md, plots, model.onnx, the TVM library, plan.json "
                    "and prepared.pt.")
    p.add_argument("--model", type=_zoo_name, default=None,
                   help="zoo model with a committed FP32 checkpoint (default: resnet20, or the "
                        f"first of {', '.join(DEMO_FALLBACKS)} with a checkpoint)")
    _add_run_options(p, 128, ("all 60k", "the full 10k test set"))
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<model>)")
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: $DJPQ_DATA "
                                                "or /usr/share/datasets/fashion-mnist)")


@_command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: FP32 -> DJPQ fine-tune -> integer model -> TVM / ONNX -> report."""
    from djpq_compiler.workflows.demo import DemoOptions, run_demo

    options = DemoOptions(model=args.model, data=args.data, **_run_options(args))
    return _finish("demo", run_demo(options, command="djpq " + shlex.join(args.argv)))


def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress", help="the demo pipeline for your model and image folder",
        description="DJPQ for your own classifier: MODEL is 'module:function' (imported from "
                    "the current directory or PYTHONPATH) or 'path/to/file.py:function', "
                    "returning an nn.Module that loads its own weights (or pass --weights). "
                    "DATA is a torchvision ImageFolder tree: DATA/train/<class>/<image> for "
                    "fine-tuning and DATA/val/<class>/<image> (or DATA/test/...) for "
                    "evaluation; class indices are the sorted class folder names. Images are "
                    "resized to the input shape's HxW, made grayscale when C = 1 (RGB "
                    "otherwise) and normalized (statistics of up to 512 training images unless "
                    "--mean/--std). Then the same pipeline and report as 'djpq demo': FP32 "
                    "accuracy and BOPs, DJPQ fine-tune, convert to integers, integer accuracy, "
                    "TVM build and ONNX export with their checks, OUT/report.md with plots.")
    p.add_argument("--model", required=True, type=_factory_spec,
                   help="'module:function' or 'path/to/file.py:function' returning an nn.Module")
    p.add_argument("--data", required=True,
                   help="image folder with train/ and val/ (or test/) class subfolders")
    p.add_argument("--input-shape", type=_parse_shape, default=None,
                   help="N,C,H,W with C = 1 or 3, e.g. 1,3,32,32 (default: the first training "
                        "image's size; 1 channel if it is grayscale, else 3)")
    p.add_argument("--weights", default=None,
                   help="state_dict file to load into the model (default: the factory's weights)")
    p.add_argument("--mean", type=_floats, default=None,
                   help="per-channel normalization mean, e.g. 0.485,0.456,0.406 (with --std; "
                        "default: computed from the training images)")
    p.add_argument("--std", type=_floats, default=None,
                   help="per-channel normalization std, e.g. 0.229,0.224,0.225")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes decoding images (default 0)")
    _add_run_options(p, 32, ("all", "all"))
    p.add_argument("--out", default=None, help="run folder (default runs/compress-<function>)")


@_command("compress")
def cmd_compress(args: argparse.Namespace) -> int:
    """The demo pipeline for a user model factory and an ImageFolder dataset."""
    from djpq_compiler.workflows.compress import CompressOptions, run_compress

    _cwd_on_path()
    options = CompressOptions(model=args.model, data=args.data, input_shape=args.input_shape,
                              weights=args.weights, mean=args.mean, std=args.std,
                              workers=args.workers, **_run_options(args))
    return _finish("compress", run_compress(options, command="djpq " + shlex.join(args.argv)))


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
    _add_compress(sub)
    return parser


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
