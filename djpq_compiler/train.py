"""A small, generic training loop: seeding, one epoch, evaluation and a full ``fit``.

Used to train the FP32 reference models and reusable for DJPQ fine-tuning: :func:`evaluate` works
on any classifier, and :func:`train_epoch` accepts an extra ``regularizer`` (e.g. ``γ·djpq_loss``)
added to the task loss.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from djpq_compiler.errors import ConfigError

__all__ = ["EpochLog", "FitResult", "Regularizer", "seed_everything", "make_optimizer",
           "make_scheduler", "train_epoch", "evaluate", "fit"]

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


@dataclass(frozen=True)
class FitResult:
    """All epochs of a :func:`fit` run; ``test_acc`` is the last epoch's."""

    epochs: tuple[EpochLog, ...] = field(default_factory=tuple)

    @property
    def test_acc(self) -> float:
        return self.epochs[-1].test_acc if self.epochs else float("nan")


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
) -> FitResult:
    """Train for ``epochs`` epochs with a per-step LR schedule; evaluate after each epoch.

    Args:
        test_loader: evaluated after every epoch (None: skip, ``test_acc`` is NaN).
        optimizer: ``"sgd"`` (Nesterov momentum 0.9) or ``"adam"``.
        schedule: ``"onecycle"``, ``"cosine"`` or ``"none"``.
        log: called with one line per epoch (None: silent).
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    sched = make_scheduler(opt, schedule, epochs * len(train_loader))
    logs: list[EpochLog] = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        loss, acc = train_epoch(model, train_loader, opt, sched, channels_last=channels_last,
                                progress=progress, desc=f"epoch {epoch}/{epochs}")
        test_acc = (evaluate(model, test_loader, progress=progress, channels_last=channels_last)
                    if test_loader is not None else float("nan"))
        entry = EpochLog(epoch, loss, acc, test_acc, time.perf_counter() - start)
        logs.append(entry)
        if log is not None:
            log(f"epoch {epoch}/{epochs}: train loss {loss:.4f} acc {acc:.4f} | "
                f"test acc {test_acc:.4f} | {entry.seconds:.0f}s")
    return FitResult(tuple(logs))
