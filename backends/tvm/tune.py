"""Tune a converted model's kernels with TVM ``meta_schedule`` into a JSON database.

``tune()`` lowers the model exactly as :func:`~djpq_compiler.backends.tvm.build` does (written
integer kernels included: they are not tuning tasks, so a tuned build keeps them and can never
end up with a slower conv than the untuned one), splits the rest into tuning tasks (one per
distinct fused kernel), measures candidate schedules on this machine and
commits them to a meta_schedule JSON database in ``work_dir`` (``database_workload.json``,
``database_tuning_record.json``; TVM's own logs go to ``work_dir/logs``).
``build(converted, ..., work_dir=work_dir)`` then compiles with the best schedule of every kernel
found there.

Tuning is incremental: a task that already has a record in the database is not tuned again
(``retune=True`` measures it anyway and adds records; the best one wins), so a second ``tune()``
of the same model runs no trials.

Example:
    >>> from djpq_compiler.backends.tvm import build, tune
    >>> report = tune(converted, "x86", example_inputs=(x,), trials=64, work_dir="tuning")
    >>> fast = build(converted, "x86", example_inputs=(x,), work_dir="tuning")
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from djpq_compiler.errors import BackendError, ConfigError

from . import ms_adapter
from .adapter import make_target
from .emit import lower

__all__ = ["TUNABLE_TARGETS", "TuningReport", "database_exists", "tune"]

LOGGER = logging.getLogger(__name__)

#: Targets whose candidates can be measured here (the runner executes them on this host).
TUNABLE_TARGETS = ("x86",)


@dataclass(frozen=True)
class TuningReport:
    """What one ``tune()`` call did.

    Attributes:
        work_dir: The directory holding the JSON database.
        tasks: Names of every tuning task of the model.
        tuned: Tasks measured by this call.
        reused: Tasks skipped because the database already had a record for them.
        skipped: Tasks without a record left untuned because of ``max_tasks`` (the cheapest
            ones by estimated operations x calls; a later ``tune()`` can take them on).
        new_records: Records (measured candidates) this call added to the database.
        records: Records in the database afterwards.
        seconds: Wall time of the call.
    """

    work_dir: Path
    tasks: tuple[str, ...]
    tuned: tuple[str, ...]
    reused: tuple[str, ...]
    new_records: int
    records: int
    seconds: float
    skipped: tuple[str, ...] = ()


def database_exists(work_dir: str | os.PathLike[str]) -> bool:
    """Whether ``work_dir`` holds both files of a meta_schedule JSON database."""
    return all((Path(work_dir) / name).is_file() for name in ms_adapter.DATABASE_FILES)


def _check_args(converted: object, target: str, trials: int, trials_per_task: int | None,
                batch: int | None, max_tasks: int | None = None) -> None:
    if not isinstance(converted, fx.GraphModule):
        raise BackendError(f"tune() needs the converted GraphModule, got {type(converted)}")
    if target not in TUNABLE_TARGETS:
        raise BackendError(
            f"tune(target={target!r}): only {', '.join(TUNABLE_TARGETS)} can be tuned, because "
            "candidates are measured on this host; tune on the device itself, or build the "
            "cross target untuned"
        )
    for name, value in (("trials", trials), ("trials_per_task", trials_per_task),
                        ("batch", batch), ("max_tasks", max_tasks)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"tune(): {name} must be a positive int, got {value!r}")


def tuning_target(target: str) -> object:
    """The TVM target that tuning and tuned builds use: the build target plus ``num-cores``.

    meta_schedule sizes its parallel loops by ``num-cores`` and refuses CPU targets without it.
    """
    from .build import target_spec

    spec, host = target_spec(target)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return make_target({**spec, "num-cores": max(1, cores or 1)}, host)


def _stderr_log(message: str) -> None:
    print(f"djpq tune: {message}", file=sys.stderr, flush=True)


def tune(converted: fx.GraphModule, target: str = "x86",
         example_inputs: torch.Tensor | Sequence[torch.Tensor] = (), *, trials: int = 64,
         work_dir: str | os.PathLike[str] = "djpq_tvm_tuning", trials_per_task: int | None = None,
         batch: int | None = None, retune: bool = False, in_process: bool = True,
         max_tasks: int | None = None, seed: int = 0, progress: bool = True,
         on_log: Callable[[str], None] | None = None) -> TuningReport:
    """Tune the kernels of a converted model and persist the schedules in ``work_dir``.

    Args:
        converted: The output of ``convert()``.
        target: A target of :data:`TUNABLE_TARGETS` (``"x86"``).
        example_inputs: One float32 tensor per model input, fixing the static shapes (tune and
            build with the same shapes: a kernel's schedule is looked up by its exact shape).
        trials: Total candidate schedules measured, over all tasks.
        work_dir: Where the JSON database (and TVM's tuning logs) live; created if missing.
        trials_per_task: At most this many trials per task (default: ``trials`` split evenly
            over the tasks to tune, so that each gets some).
        batch: Candidates generated and measured per round (default ``min(16, trials)``).
        retune: Tune tasks that already have a record, too.
        in_process: Compile and time candidates in this process (fast to start; no timeout, and a
            crashing candidate crashes the caller). ``False`` uses TVM's worker processes
            (``LocalBuilder(timeout_sec=600)``), isolated but slow to start on a loaded host.
        max_tasks: Tune at most this many tasks, the most expensive first (TVM's estimate of
            a kernel's operations times how often the model calls it); the others keep the
            default schedule and are listed in ``TuningReport.skipped``. Building each task's
            search space costs seconds to minutes, so on a model with many distinct kernels
            this spends the budget where the time is.
        seed: Random seed of the search.
        progress: Print one line per task decision and per measured batch to stderr.
        on_log: Receives each progress line instead of stderr.

    Returns:
        A :class:`TuningReport`.

    Raises:
        BackendError: Not a converted model, unsupported nodes, or a target that cannot be tuned.
        ConfigError: Non-positive trial counts.
        MissingExtraError: TVM is not installed.
    """
    start = time.perf_counter()
    _check_args(converted, target, trials, trials_per_task, batch, max_tasks)
    from .build import _as_inputs

    def log(message: str) -> None:
        LOGGER.info(message)
        if on_log is not None:
            on_log(message)
        elif progress:
            _stderr_log(message)

    from .build import target_spec

    tvm_target = tuning_target(target)
    # the same lowering as build(): conv/linear layers keep their written kernels, which are
    # never tuning tasks (a tuned build can only replace the default-lowered rest)
    ir_module, _ = lower(converted, _as_inputs(example_inputs), target_spec(target)[0])
    fused = ms_adapter.fuse(ir_module, tvm_target)
    tasks = [t for t in ms_adapter.extract_tasks(fused, tvm_target) if not t.prescheduled]
    log(f"lowered and split into tasks in {time.perf_counter() - start:.0f} s")
    out = Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    database = ms_adapter.open_database(out, create=True)
    before = ms_adapter.record_count(database)
    todo: list[ms_adapter.Task] = []
    reused: list[ms_adapter.Task] = []
    for task in tasks:
        done = not retune and ms_adapter.has_record(database, task, tvm_target)
        (reused if done else todo).append(task)
    skipped: list[ms_adapter.Task] = []
    if max_tasks is not None and len(todo) > max_tasks:
        todo = sorted(todo, key=lambda t: t.cost, reverse=True)
        todo, skipped = todo[:max_tasks], todo[max_tasks:]
    log(f"{len(tasks)} task(s), {len(reused)} already in {out}, {len(todo)} to tune "
        f"with {trials} trial(s)"
        + (f", {len(skipped)} cheaper one(s) left untuned (max_tasks={max_tasks})"
           if skipped else ""))
    for task in todo:
        log(f"  to tune: {task.name} (called {task.weight:g}x, ~{task.ops:.3g} ops)")
    if todo:
        per_task = trials_per_task or max(1, math.ceil(trials / len(todo)))
        ms_adapter.tune_tasks(todo, tvm_target, out, database, trials, per_task,
                              batch or min(16, per_task), in_process, seed, log)
    records = ms_adapter.record_count(database)
    seconds = time.perf_counter() - start
    log(f"done in {seconds:.0f} s: {records - before} new record(s), {records} in {out}")
    return TuningReport(out, tuple(t.name for t in tasks), tuple(t.name for t in todo),
                        tuple(t.name for t in reused), records - before, records, seconds,
                        tuple(t.name for t in skipped))
