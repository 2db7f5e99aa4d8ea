"""DJPQ fine-tuning: task loss + gamma * djpq_loss, with gates and quantizers in their own
optimizer group, under a step or wall-clock budget; and evaluation of the deployed form.

The same loop serves every method of the claims benchmark: DJPQ (gates + learned bits),
VIB-only (``quantize=False``), DQ-only (``prune=False``) and fixed-bit fake-quant (bits not
learned) differ only in the :class:`~djpq_compiler.config.DJPQConfig` given to ``prepare``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from djpq_compiler.bops import bops
from djpq_compiler.errors import ConfigError
from djpq_compiler.loss import djpq_loss
from djpq_compiler.modules.fused import fused_kernels
from djpq_compiler.prepared import check_finite, freeze_for_deployment, param_groups, unwrap
from djpq_compiler.workflows.train import (
    RESUME_FORMAT,
    _rng_state,
    _save_resume_state,
    _set_rng_state,
    load_resume_state,
)

__all__ = ["FinetuneConfig", "FinetuneLog", "finetune", "accuracy", "distillation_loss"]

#: Learning-rate schedules of :class:`FinetuneConfig`.
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class FinetuneConfig:
    """Budget and optimizer of a DJPQ fine-tune.

    Attributes:
        gamma: Weight of the DJPQ regulariser (``loss = task + gamma * R``).
        steps: Maximum optimizer steps (``None``: until ``minutes`` run out).
        minutes: Wall-clock budget (``None``: until ``steps``).
        weight_lr: Adam learning rate of the model weights.
        djpq_lr: Adam learning rate of gate and quantizer parameters.
        log_every: Steps between :class:`FinetuneLog` records (hard-gate BOPs are counted then).
        loss_kind: ``"vib_bops"`` / ``"soft_bops"``; ``None`` uses the prepared config's.
        finalize: Fraction of the budget (of the steps or of the minutes, whichever is reached
            first) spent at the end with every gate and quantizer frozen at what ``convert`` deploys
            (:func:`~djpq_compiler.prepared.freeze_for_deployment`: read-out bits, hard gates),
            training only the weights, so they adapt to the rounded-up bit-widths; ``0`` skips
            the phase. [choice] 0.1: on resnet20 without it the integer model was 2.7 points below
            the continuous-bit fake-quant model.
        schedule: ``"constant"`` learning rates, or ``"cosine"``: every group's rate follows
            ``0.5 * (1 + cos(pi * progress))`` from its initial value to 0, ``progress`` being the
            fraction of the budget used (steps or minutes, whichever is further along).
        distill: Weight ``a`` of knowledge distillation from a float teacher (``finetune``'s
            ``teacher``): the task loss becomes ``(1 - a) * CE + a * T^2 * KL(teacher || model)``
            on softmax at temperature ``T`` (:func:`distillation_loss`); ``0`` (default): plain
            cross-entropy, no teacher. Not part of the paper's method [choice, issue 18 lever].
        distill_temperature: ``T`` of the distillation term, ``> 0``.
        state_file: Where the loop saves its training state (weights, gate and quantizer
            parameters, optimizer moments, step, whether it is finalizing, the RNGs) every
            ``save_every`` steps and at the end, written atomically; a run started with that
            file present resumes from it and computes what the uninterrupted run would have
            (the batches are replayed to the saved step, so the loader must give the same
            sequence: a seeded shuffle, as :func:`~djpq_compiler.workflows.data.make_loader`'s).
            Step budgets only (``minutes=None``); ``None`` (default): nothing saved.
        save_every: Steps between saves of ``state_file``, ``>= 1``.
    """

    gamma: float = 1.0
    steps: int | None = None
    minutes: float | None = 10.0
    weight_lr: float = 2e-4
    djpq_lr: float = 1e-2
    log_every: int = 100
    loss_kind: str | None = None
    finalize: float = 0.1
    schedule: str = "constant"
    distill: float = 0.0
    distill_temperature: float = 2.0
    state_file: str | None = None
    save_every: int = 200

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ConfigError("FinetuneConfig: set steps or minutes (or both)")
        if self.gamma < 0 or self.weight_lr <= 0 or self.djpq_lr <= 0:
            raise ConfigError("FinetuneConfig: gamma >= 0 and learning rates > 0 required")
        if not 0.0 <= self.finalize < 1.0:
            raise ConfigError(f"FinetuneConfig: finalize must be in [0, 1), got {self.finalize!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"FinetuneConfig: schedule must be one of {SCHEDULES}, "
                              f"got {self.schedule!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"FinetuneConfig: distill must be in [0, 1], got {self.distill!r}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise ConfigError("FinetuneConfig: distill_temperature must be finite and > 0, got "
                              f"{self.distill_temperature!r}")
        if self.state_file is not None and (self.steps is None or self.minutes is not None):
            raise ConfigError("FinetuneConfig: state_file needs a step budget (steps=N, "
                              "minutes=None): a wall-clock budget cannot resume at the same step")
        if self.save_every < 1:
            raise ConfigError(f"FinetuneConfig: save_every must be >= 1, got {self.save_every!r}")

    def resume_fields(self) -> dict[str, object]:
        """The fields a saved state must agree on to be resumed (all but where and how often
        it is saved, and how often the loop logs)."""
        skip = {"state_file", "save_every", "log_every"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


@dataclass(frozen=True)
class FinetuneLog:
    step: int
    seconds: float
    task_loss: float
    regularizer: float
    gbops: float
    finalizing: bool = False


def _set_lr(opt: torch.optim.Optimizer, base: list[float], schedule: str,
            progress: float) -> None:
    if schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        for group, lr in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr * factor


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      weight: float, temperature: float) -> torch.Tensor:
    """``(1 - weight) * CE(logits, target) + weight * T^2 * KL(p_teacher || p_model)``, both
    softmaxes at temperature ``T`` (the ``T^2`` keeps the soft term's gradient scale independent
    of ``T``); ``weight == 0`` is plain cross-entropy."""
    task = F.cross_entropy(logits, target)
    if weight == 0:
        return task
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                    F.log_softmax(teacher_logits.detach() / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1.0 - weight) * task + weight * temperature**2 * soft


def _batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


@dataclass(frozen=True)
class _Resumed:
    step: int
    seconds: float
    finalizing: bool
    rng: dict[str, Any]


#: The entries of a fine-tune's state (a resume state of :func:`~.train.fit` has others).
_STATE_KEYS = frozenset({"format", "config", "step", "seconds", "finalizing", "rng", "model",
                         "optimizer"})


def _save_state(path: Path, config: FinetuneConfig, prepared: nn.Module,
                opt: torch.optim.Optimizer, loader: DataLoader, step: int, seconds: float,
                finalizing: bool) -> None:
    """Write the loop's state to ``path`` atomically, as :func:`~.train.fit` writes its own
    (the same writer, format and RNG record)."""
    _save_resume_state(path, {
        "format": RESUME_FORMAT, "config": config.resume_fields(), "step": step,
        "seconds": seconds, "finalizing": finalizing, "rng": _rng_state(loader),
        "model": prepared.state_dict(), "optimizer": opt.state_dict()})


def _load_state(path: Path, config: FinetuneConfig, prepared: nn.Module,
                opt: torch.optim.Optimizer) -> _Resumed:
    """Load a state :func:`_save_state` wrote into ``prepared`` and ``opt``.

    Raises:
        ConfigError: the file is not such a state, was saved under another budget or recipe,
            or for another model.
    """
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"finetune: cannot resume from {path}: {why}; delete the file to "
                           "start over, or pass another state_file")

    try:
        state = load_resume_state(path)
    except ConfigError as e:  # unreadable, or not a resume state of this format
        raise refuse(f"not a saved training state ({e})") from e
    if state.keys() != _STATE_KEYS:
        raise refuse("not a saved training state (a resume state of another loop)")
    mine = config.resume_fields()
    differ = sorted(k for k in mine.keys() | state["config"].keys()
                    if mine.get(k) != state["config"].get(k))
    if differ:
        raise refuse("it was saved under another config (" + ", ".join(
            f"{k}={state['config'].get(k)!r}, now {mine.get(k)!r}" for k in differ) + ")")
    own, saved = prepared.state_dict(), state["model"]
    differ = sorted(own.keys() ^ saved.keys()) or [
        k for k in own if tuple(own[k].shape) != tuple(saved[k].shape)]
    if differ:  # checked before anything is loaded: a refused model stays as it was
        raise refuse(f"it was saved for another model (first differing entry: {differ[0]!r})")
    if state["finalizing"]:  # the flags and requires_grad the saved values were trained under
        freeze_for_deployment(prepared)
    prepared.load_state_dict(saved)
    opt.load_state_dict(state["optimizer"])
    return _Resumed(int(state["step"]), float(state["seconds"]), bool(state["finalizing"]),
                    state["rng"])  # set once the loader has replayed its batches


def finetune(prepared: nn.Module, train_loader: DataLoader, config: FinetuneConfig,
             progress: bool = True,
             on_log: Callable[[FinetuneLog], None] | None = None,
             teacher: nn.Module | None = None) -> list[FinetuneLog]:
    """Train ``prepared`` in place; returns the periodic logs (BOPs at hard gates, read-out bits).

    The last ``config.finalize`` of the budget trains the weights only, with gates and
    quantizers frozen at their deployed values; afterwards ``prepared`` in eval mode computes what
    ``convert(prepared)`` runs (to <= 1 LSB per quantizer). Batches are moved to the device of
    the model's parameters. Under DistributedDataParallel set ``finalize=0``: freezing
    parameters mid-run needs the wrapper rebuilt (``examples/ddp_finetune.py`` does that).

    With ``config.distill > 0`` the task loss distils ``teacher`` (a float model, run in eval
    mode without gradients on the same batches); the logged ``task_loss`` is then that mixed loss.

    With ``config.state_file`` set the loop saves its state as it goes and, when the file is
    there at the start, resumes from it (``prepared`` freshly prepared as before, the same
    loader and teacher): a long run survives being stopped. The logs returned are those of this
    call only; a finished state resumes to no further steps.

    Raises:
        ConfigError: ``config.distill > 0`` without a ``teacher``; a ``state_file`` that is not
            a saved state of this config and model.
        QuantizationError: a gate or quantizer parameter became NaN/Inf (checked at every log).
    """
    if config.distill and teacher is None:
        raise ConfigError("finetune: config.distill > 0 needs a teacher model (e.g. the FP32 "
                          "checkpoint); pass teacher=... or set distill=0")
    if teacher is not None:
        teacher.eval()
    opt = torch.optim.Adam(param_groups(prepared, weight_lr=config.weight_lr,
                                        djpq_lr=config.djpq_lr))
    device = next(prepared.parameters()).device
    if device.type == "cpu":  # the fused kernels are CPU-only; built before the clock starts
        fused_kernels()
    start, logs, step = time.perf_counter(), [], 0
    limit = config.steps if config.steps is not None else 10**12
    seconds = 60 * config.minutes if config.minutes is not None else math.inf
    final_step = math.ceil(limit * (1.0 - config.finalize)) if config.steps is not None else None
    final_second = seconds * (1.0 - config.finalize)
    finalizing = False
    base_lrs = [group["lr"] for group in opt.param_groups]
    batches = _batches(train_loader)
    state_file = Path(config.state_file) if config.state_file is not None else None
    if state_file is not None and state_file.exists():
        resumed = _load_state(state_file, config, prepared, opt)
        step, finalizing = resumed.step, resumed.finalizing
        start -= resumed.seconds
        for _ in range(step):  # the loader's batches of the steps already taken
            next(batches)
        _set_rng_state(resumed.rng, train_loader)
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="djpq fine-tune",
               leave=False)
    prepared.train()
    for x, y in batches:
        elapsed = time.perf_counter() - start
        if step >= limit or elapsed > seconds:
            break
        if config.finalize and not finalizing and (
                (final_step is not None and step >= final_step) or elapsed > final_second):
            freeze_for_deployment(prepared)
            finalizing = True
            bar.set_description("djpq fine-tune (finalizing: deployed bits and gates)")
        _set_lr(opt, base_lrs, config.schedule,
                max(step / limit, elapsed / seconds if math.isfinite(seconds) else 0.0))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = prepared(x)
        if config.distill and teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x)
            task = distillation_loss(logits, teacher_logits, y, config.distill,
                                     config.distill_temperature)
        else:
            task = F.cross_entropy(logits, y)
        reg = (djpq_loss(prepared, config.loss_kind) if config.gamma and not finalizing
               else torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        (task + config.gamma * reg).backward()
        opt.step()
        step += 1
        bar.update(1)
        if state_file is not None and (step % config.save_every == 0 or step == limit):
            _save_state(state_file, config, prepared, opt, train_loader, step,
                        time.perf_counter() - start, finalizing)
        if step % config.log_every == 0:
            check_finite(prepared)
            log = FinetuneLog(step, elapsed, task.item(), reg.item(), bops(unwrap(prepared)).gbops,
                              finalizing)
            logs.append(log)
            bar.set_postfix(loss=f"{log.task_loss:.3f}", gbops=f"{log.gbops:.4f}")
            if on_log is not None:
                on_log(log)
    bar.close()
    prepared.eval()
    return logs


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, progress: bool = False) -> float:
    """Top-1 accuracy in ``[0, 1]`` of any classifier (prepared, converted or float), eval mode."""
    model.eval()
    correct = seen = 0
    for x, y in tqdm(loader, disable=not progress, desc="eval", leave=False):
        correct += int((model(x).argmax(1) == y).sum())
        seen += int(y.shape[0])
    if not seen:
        raise ConfigError("accuracy(): the loader yielded no batches")
    return correct / seen
