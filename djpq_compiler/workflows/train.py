"""A small, generic training loop: seeding, one epoch, evaluation and a full ``fit``.

Used to train the FP32 reference models and reusable for DJPQ fine-tuning: :func:`evaluate` works
on any classifier, and :func:`train_epoch` accepts an extra ``regularizer`` (e.g. ``γ·djpq_loss``)
added to the task loss. :func:`fit` can keep a resume state (model, optimizer, scheduler, RNGs,
per-epoch log) written after every epoch, so a long run survives being stopped: calling it again
with the same settings and state file continues where it stopped and ends in the same weights as
an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from djpq_compiler.errors import ConfigError

__all__ = ["EpochLog", "FitResult", "Regularizer", "seed_everything", "make_optimizer",
           "make_scheduler", "train_epoch", "evaluate", "fit", "load_resume_state"]

Regularizer = Callable[[nn.Module], torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def make_optimizer(params: Iterable[nn.Parameter] | Iterable[dict], name: str = "sgd",
                   lr: float = 0.1, weight_decay: float = 5e-4,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (``"sgd"``) or Adam (``"adam"``, weight decay as AdamW)."""
    if lr <= 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0,
                               weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'")


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int
                   ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step LR schedule: ``"cosine"`` (to 0), ``"onecycle"`` (30 % warm-up) or ``"none"``."""
    if name == "none":
        return None
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    if name == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs,
                                                   total_steps=total_steps, pct_start=0.3)
    raise ConfigError(f"unknown schedule {name!r}; use 'cosine', 'onecycle' or 'none'")


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    regularizer: Regularizer | None = None,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> tuple[float, float]:
    """Train ``model`` for one pass over ``loader``; the scheduler (if any) steps per batch.

    Args:
        regularizer: optional ``f(model) -> scalar`` added to the task loss each step.
        channels_last: feed 4-D inputs in channels-last layout (faster convs on CPU).
        progress: show a tqdm bar.

    Returns:
        ``(mean task loss, training accuracy)`` over the epoch.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for x, y in bar:
        out = model(_prepare(x, channels_last))
        loss = loss_fn(out, y)
        full = loss + regularizer(model) if regularizer is not None else loss
        optimizer.zero_grad(set_to_none=True)
        full.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = y.shape[0]
        total_loss += float(loss.detach()) * n
        correct += int((out.detach().argmax(1) == y).sum())
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    if seen == 0:
        raise ConfigError("the training loader yielded no batches")
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, progress: bool = False,
             channels_last: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``loader``, in ``[0, 1]``."""
    model.eval()
    correct, seen = 0, 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        correct += int((model(_prepare(x, channels_last)).argmax(1) == y).sum())
        seen += y.shape[0]
    if seen == 0:
        raise ConfigError("the evaluation loader yielded no batches")
    return correct / seen


@dataclass(frozen=True)
class EpochLog:
    """What one epoch of :func:`fit` measured."""

    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    seconds: float
    lr: float = float("nan")  # learning rate of the first parameter group at the epoch's end


@dataclass(frozen=True)
class FitResult:
    """All epochs of a :func:`fit` run (with a resume state: also those of earlier calls);
    ``test_acc`` is the last epoch's. ``finished`` is False when ``until`` stopped the run
    before its last planned epoch."""

    epochs: tuple[EpochLog, ...] = field(default_factory=tuple)
    finished: bool = True

    @property
    def test_acc(self) -> float:
        return self.epochs[-1].test_acc if self.epochs else float("nan")


#: Format version of the resume state written by :func:`fit`.
RESUME_FORMAT = 1
#: The settings a resume state must share with the call that resumes it.
_RESUME_KEYS = ("epochs", "lr", "optimizer", "schedule", "weight_decay", "steps_per_epoch")


def _rng_state(loader: DataLoader) -> dict[str, Any]:
    """Every RNG an epoch draws from: Python's, numpy's, torch's and the loader's generator."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    generator = getattr(loader, "generator", None)
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "loader": generator.get_state() if isinstance(generator, torch.Generator) else None,
    }


def _set_rng_state(state: dict[str, Any], loader: DataLoader) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator = getattr(loader, "generator", None)
    if (state["loader"] is None) != (not isinstance(generator, torch.Generator)):
        raise ConfigError("resume state and training loader disagree on whether the loader has "
                          "its own seeded generator; resume with the loader the run started with")
    if isinstance(generator, torch.Generator):
        generator.set_state(state["loader"])


def _save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (a kill during the write leaves the previous state intact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_resume_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a resume state written by :func:`fit` (``weights_only``: no code is unpickled).

    Returns:
        A dict with ``format``, ``settings``, ``epoch`` (epochs done), ``log`` (one dict per
        epoch, as :class:`EpochLog`), ``model``, ``optimizer``, ``scheduler`` and ``rng``.

    Raises:
        ConfigError: the file is not a resume state of this format.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated, or not a torch file
        raise ConfigError(f"cannot read resume state {path}: {exc}; delete it to start over"
                          ) from exc
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ConfigError(f"{path} is not a resume state of format {RESUME_FORMAT}; "
                          "delete it to start over, or point `resume` elsewhere")
    return state


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader | None,
    epochs: int,
    lr: float = 0.1,
    optimizer: str = "sgd",
    schedule: str = "onecycle",
    weight_decay: float = 5e-4,
    channels_last: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    resume: str | os.PathLike[str] | None = None,
    until: Callable[[EpochLog], bool] | None = None,
) -> FitResult:
    """Train for ``epochs`` epochs with a per-step LR schedule; evaluate after each epoch.

    Args:
        test_loader: evaluated after every epoch (None: skip, ``test_acc`` is NaN).
        optimizer: ``"sgd"`` (Nesterov momentum 0.9) or ``"adam"``.
        schedule: ``"onecycle"``, ``"cosine"`` or ``"none"``.
        log: called with one line per epoch (None: silent).
        resume: a resume-state file. If it exists, the model, optimizer, scheduler, RNG states
            and the per-epoch log are restored from it and training continues after its last
            epoch (the settings must match the ones it was written with); after every epoch
            the state is rewritten (atomically), after the evaluation. Resuming after epoch k
            ends in the same weights as an uninterrupted run (same data order, augmentation and
            schedule), given the same loaders, threads and library versions.
        until: called after every epoch (once its state is saved) with its log; returning True
            stops the run there (``FitResult.finished`` is then False unless it was the last).

    Raises:
        ConfigError: bad settings, or a resume state written with other settings.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    sched = make_scheduler(opt, schedule, epochs * len(train_loader))
    settings = {"epochs": epochs, "lr": lr, "optimizer": optimizer, "schedule": schedule,
                "weight_decay": weight_decay, "steps_per_epoch": len(train_loader)}
    logs: list[EpochLog] = []
    path = Path(resume) if resume is not None else None
    if path is not None and path.exists():
        logs = _restore(path, settings, model, opt, sched, train_loader)
        if log is not None:
            log(f"resumed from {path} after epoch {len(logs)}/{epochs}")
    for epoch in range(len(logs) + 1, epochs + 1):
        start = time.perf_counter()
        loss, acc = train_epoch(model, train_loader, opt, sched, channels_last=channels_last,
                                progress=progress, desc=f"epoch {epoch}/{epochs}")
        test_acc = (evaluate(model, test_loader, progress=progress, channels_last=channels_last)
                    if test_loader is not None else float("nan"))
        entry = EpochLog(epoch, loss, acc, test_acc, time.perf_counter() - start,
                         float(opt.param_groups[0]["lr"]))
        logs.append(entry)
        if path is not None:
            _save_resume_state(path, {
                "format": RESUME_FORMAT, "settings": settings, "epoch": epoch,
                "log": [asdict(e) for e in logs], "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "rng": _rng_state(train_loader)})
        if log is not None:
            log(f"epoch {epoch}/{epochs}: train loss {loss:.4f} acc {acc:.4f} | "
                f"test acc {test_acc:.4f} | lr {entry.lr:.3g} | {entry.seconds:.0f}s")
        if until is not None and epoch < epochs and until(entry):
            return FitResult(tuple(logs), finished=False)
    return FitResult(tuple(logs))


def _restore(path: Path, settings: dict[str, Any], model: nn.Module,
             opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler | None,
             train_loader: DataLoader) -> list[EpochLog]:
    """Load a resume state into the training objects; returns its per-epoch log."""
    state = load_resume_state(path)
    differ = {k: (state["settings"].get(k), settings[k]) for k in _RESUME_KEYS
              if state["settings"].get(k) != settings[k]}
    if differ:
        text = ", ".join(f"{k}: state {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(f"resume state {path} was written with other settings ({text}); "
                          "resume with the original settings or use another state file")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"], train_loader)
    return [EpochLog(**e) for e in state["log"]]
