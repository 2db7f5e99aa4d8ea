"""The ``djpq`` command line (also ``python -m djpq_compiler`` / ``python -m djpq_compiler.cli``).

Subcommands (one function each, registered in :data:`COMMANDS`):

* ``djpq bops --model NAME`` — BOPs table of a zoo model or of a ``module:function`` factory.
* ``djpq demo`` — the end-to-end path that exists today: Fashion-MNIST test accuracy and BOPs of
  the committed FP32 ResNet-20 checkpoint.

Bad arguments exit with status 2 and one line on stderr; a :class:`~djpq_compiler.errors.DjpqError`
exits with status 1 and its message.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="evaluate the committed FP32 ResNet-20 on Fashion-MNIST",
                       description="Load the Fashion-MNIST test set and the committed FP32 "
                                   "ResNet-20, print its accuracy and BOPs (FP32 and W8A8).")
    p.add_argument("--model", default="resnet20", help="zoo model with a committed checkpoint")
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: $DJPQ_DATA "
                                                "or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--subset", type=int, default=None, help="evaluate on N random test images")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@_command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    """Accuracy and BOPs of a committed FP32 checkpoint: today's end-to-end path."""
    from djpq_compiler.data import load_fashion_mnist, make_loader
    from djpq_compiler.train import evaluate
    from djpq_compiler.zoo import load_pretrained

    test = load_fashion_mnist("test", args.data)
    loader = make_loader(test, batch_size=500, subset=args.subset)
    model = load_pretrained(args.model)
    acc = evaluate(model, loader, progress=not args.no_progress, desc="Fashion-MNIST test")
    print(f"{args.model} (FP32 checkpoint): Fashion-MNIST test accuracy {100 * acc:.2f} % "
          f"on {len(loader.dataset)} images")  # type: ignore[arg-type]
    example = test.images[:1]
    for w, a in ((32, 32), (8, 8)):
        print()
        print(bops(model, example, weight_bits=w, act_bits=a).table().replace(
            "BOPs report (float)", f"BOPs report (W{w}A{a})"))
    print()
    print("Not yet in the demo: DJPQ fine-tuning (gates + learned bit-widths), convert() to an "
          "integer model, and the TVM/ONNX backends.")
    return 0


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The ``djpq`` argument parser with every subcommand."""
    from djpq_compiler import __version__

    parser = argparse.ArgumentParser(prog="djpq", description="Differentiable Joint Pruning and "
                                                              "Quantization compiler.")
    parser.add_argument("--version", action="version", version=f"djpq-compiler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_bops(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2: bad arguments, 1: a DjpqError)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DjpqError as exc:
        print(f"djpq {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
