"""Train one zoo model in FP32 on the full Fashion-MNIST and save its checkpoint.

Example (what produced the committed checkpoints; see RESULTS.md for each model's command)::

    python benchmarks/reference_models/train_reference.py --model resnet20 --epochs 6 \\
        --out djpq_compiler/checkpoints/resnet20.pt

Long runs keep a resume state (``--state``: model, optimizer, scheduler, epoch, RNG states and the
per-epoch log, rewritten after every epoch) and continue from it when started again with the same
command, ending in the same weights as an uninterrupted run; ``--deadline HH:MM`` (UTC) stops
cleanly after the last epoch that fits before that time. ``--init`` warm-starts from an existing
checkpoint (the schedule then starts afresh from ``--lr``). After every epoch the per-epoch log
(test accuracy, loss, lr, seconds) is written to ``--log-json`` (small, meant to be committed).

The checkpoint is a float32 ``state_dict`` (contiguous tensors), reloaded with
``torch.load(..., weights_only=True)`` through
:func:`djpq_compiler.workflows.zoo.load_pretrained` and
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
from typing import Any

import torch

from djpq_compiler import bops
from djpq_compiler.errors import ConfigError
from djpq_compiler.workflows.data import fashion_mnist_loaders
from djpq_compiler.workflows.train import (
    EpochLog,
    evaluate,
    fit,
    load_resume_state,
    seed_everything,
)
from djpq_compiler.workflows.zoo import MODELS, get_model, load_pretrained

#: A run counts as converged when the best test accuracy of its last CONVERGED_EPOCHS epochs is
#: at most CONVERGED_GAIN above the best before them (the issue's "last epochs gain < 0.1 pt").
CONVERGED_EPOCHS = 3
CONVERGED_GAIN = 0.001


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
    p.add_argument("--init", type=Path, default=None,
                   help="warm start: load this checkpoint before training")
    p.add_argument("--state", type=Path, default=None,
                   help="resume state (written every epoch; resumed from when it exists)")
    p.add_argument("--log-json", type=Path, default=None,
                   help="per-epoch log written every epoch (default: <state>.json with --state)")
    p.add_argument("--deadline", default=None,
                   help="HH:MM UTC: stop after the last epoch expected to end before it")
    p.add_argument("--stop-at-epoch", type=int, default=None,
                   help="stop after this epoch (the state allows resuming; for tests)")
    p.add_argument("--train-subset", type=int, default=None, help="smoke runs only")
    p.add_argument("--test-subset", type=int, default=None, help="smoke runs only")
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


def converged(test_accs: list[float], window: int = CONVERGED_EPOCHS,
              gain: float = CONVERGED_GAIN) -> bool:
    """True when the last ``window`` epochs raised the best test accuracy by at most ``gain``
    (accuracies in [0, 1]); False while there are not more than ``window`` epochs."""
    if len(test_accs) <= window:
        return False
    return max(test_accs[-window:]) - max(test_accs[:-window]) <= gain


def _deadline(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        hh, mm = (int(v) for v in text.split(":"))
        now = dt.datetime.now(dt.UTC)
        when = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    except ValueError as exc:
        raise ConfigError(f"--deadline must be HH:MM (UTC), got {text!r}") from exc
    return when if when > now else when + dt.timedelta(days=1)


def _write_log(path: Path | None, args: argparse.Namespace, logs: list[dict[str, Any]],
               finished: bool, extra: dict[str, Any] | None = None) -> None:
    if path is None:
        return
    accs = [e["test_acc"] for e in logs]
    record = {"model": args.model, "epochs_planned": args.epochs, "epochs_done": len(logs),
              "finished": finished, "converged": converged(accs),
              "best_test_acc": max(accs) if accs else None,
              "train_seconds": sum(e["seconds"] for e in logs),
              "command": "python " + shlex.join(sys.argv), "torch": torch.__version__,
              "threads": args.threads, "init": str(args.init) if args.init else None,
              "epoch_log": logs, **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    train_loader, test_loader = fashion_mnist_loaders(
        batch_size=args.batch_size, seed=args.seed, train_subset=args.train_subset,
        test_subset=args.test_subset, augment=not args.no_augment)
    model = get_model(args.model)
    if args.init is not None:
        model.load_state_dict(load_pretrained(args.model, args.init).state_dict())
    params = sum(p.numel() for p in model.parameters())
    macs = int(bops(model, torch.randn(1, 1, 28, 28)).macs)
    print(f"{args.model}: {params} params, {macs} MACs, {len(train_loader.dataset)} train images",  # type: ignore[arg-type]
          flush=True)
    log_json = args.log_json or (args.state.with_suffix(".json") if args.state else None)
    logs: list[dict[str, Any]] = []
    if args.state is not None and args.state.exists():
        logs = list(load_resume_state(args.state)["log"])
    deadline = _deadline(args.deadline)

    def until(entry: EpochLog) -> bool:
        logs.append(dict(entry.__dict__))
        _write_log(log_json, args, logs, finished=False)
        if args.stop_at_epoch is not None and entry.epoch >= args.stop_at_epoch:
            return True
        return deadline is not None and (
            dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.1 * entry.seconds) > deadline)

    result = fit(model, train_loader, test_loader, args.epochs, lr=args.lr,
                 optimizer=args.optimizer, schedule=args.schedule,
                 weight_decay=args.weight_decay, channels_last=True, progress=args.progress,
                 log=lambda line: print(line, flush=True), resume=args.state, until=until)
    logs = [dict(e.__dict__) for e in result.epochs]
    if not result.finished:
        _write_log(log_json, args, logs, finished=False)
        print(f"stopped after epoch {len(logs)}/{args.epochs}; run the same command again to "
              f"resume from {args.state}", flush=True)
        return 0
    save_state(model, args.out)
    reloaded = load_pretrained(args.model, args.out)
    acc = evaluate(reloaded, test_loader)
    print(f"reloaded {args.out}: test accuracy {acc:.4f} on {len(test_loader.dataset)} images",  # type: ignore[arg-type]
          flush=True)
    _write_log(log_json, args, logs, finished=True, extra={"reloaded_test_acc": acc})
    summary = {
        "model": args.model, "params": params, "macs": macs, "epochs": args.epochs,
        "test_acc": acc, "epoch_log": logs,
        "train_seconds": sum(e["seconds"] for e in logs),
        "command": "python " + shlex.join(sys.argv),
        "date": dt.date.today().isoformat(), "torch": torch.__version__,
        "threads": args.threads, "init": str(args.init) if args.init else None,
        "converged": converged([e["test_acc"] for e in logs]),
    }
    out = args.summary or args.out.with_suffix(".json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
