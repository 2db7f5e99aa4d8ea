"""Train one zoo model in FP32 on the full Fashion-MNIST and save its checkpoint.

Example (what produced the committed checkpoints; see RESULTS.md for each model's command)::

    python benchmarks/reference_models/train_reference.py --model resnet20 --epochs 6 \
        --out djpq_compiler/checkpoints/resnet20.pt

The checkpoint is a float32 ``state_dict`` (contiguous tensors), reloaded with
``torch.load(..., weights_only=True)`` through :func:`djpq_compiler.zoo.load_pretrained` and
re-evaluated on the full test set before the summary is written. A JSON summary (params, MACs,
epochs, accuracy, command, date) goes next to ``--out`` unless ``--summary`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import torch

from djpq_compiler import bops
from djpq_compiler.data import fashion_mnist_loaders
from djpq_compiler.train import evaluate, fit, seed_everything
from djpq_compiler.zoo import MODELS, get_model, load_pretrained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    p.add_argument("--summary", type=Path, default=None, help="JSON summary (default: <out>.json)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--schedule", choices=("onecycle", "cosine", "none"), default="onecycle")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-augment", action="store_true", help="disable random crop (pad 2) + flip")
    p.add_argument("--train-subset", type=int, default=None, help="smoke runs only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true", help="tqdm bars (off for log files)")
    return p.parse_args(argv)


def save_state(model: torch.nn.Module, path: Path) -> None:
    """Save a float32, contiguous state_dict (channels-last strides are not kept)."""
    state = {k: (v.float() if v.is_floating_point() else v).contiguous().clone()
             for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    train_loader, test_loader = fashion_mnist_loaders(
        batch_size=args.batch_size, seed=args.seed, train_subset=args.train_subset,
        augment=not args.no_augment)
    model = get_model(args.model)
    params = sum(p.numel() for p in model.parameters())
    macs = int(bops(model, torch.randn(1, 1, 28, 28)).macs)
    print(f"{args.model}: {params} params, {macs} MACs, {len(train_loader.dataset)} train images",
          flush=True)
    result = fit(model, train_loader, test_loader, args.epochs, lr=args.lr,
                 optimizer=args.optimizer, schedule=args.schedule,
                 weight_decay=args.weight_decay, channels_last=True, progress=args.progress,
                 log=lambda line: print(line, flush=True))
    save_state(model, args.out)
    reloaded = load_pretrained(args.model, args.out)
    acc = evaluate(reloaded, test_loader)
    print(f"reloaded {args.out}: test accuracy {acc:.4f} on {len(test_loader.dataset)} images",
          flush=True)
    summary = {
        "model": args.model, "params": params, "macs": macs, "epochs": args.epochs,
        "test_acc": acc, "epoch_log": [e.__dict__ for e in result.epochs],
        "train_seconds": sum(e.seconds for e in result.epochs),
        "command": "python " + shlex.join(sys.argv),
        "date": dt.date.today().isoformat(), "torch": torch.__version__,
        "threads": args.threads,
    }
    out = args.summary or args.out.with_suffix(".json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
