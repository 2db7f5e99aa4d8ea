"""The TVM side of tuning: ``meta_schedule`` tasks, JSON database, in-process measurement.

Like :mod:`.adapter` (which it builds on), this is a module that touches TVM; the tuning policy
(which tasks to tune, logging, errors) lives in :mod:`.tune`, free of TVM calls. It is a separate
file only to keep both adapters small.

Measurement runs either in TVM's worker processes (``LocalBuilder(timeout_sec=600)`` and
``LocalRunner``: isolated, but each worker spends 20-90 s importing TVM on a loaded host,
REFERENCE.md §3) or in this process (:func:`in_process_measurer`: no start-up cost, no timeout,
and a crashing candidate would take the caller down with it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .adapter import load_tvm

__all__ = [
    "DATABASE_FILES",
    "Task",
    "apply_database",
    "compile_fused",
    "extract_tasks",
    "fuse",
    "has_record",
    "open_database",
    "record_count",
    "tune_tasks",
]

#: The two files of a meta_schedule JSON database, as TVM names them by default.
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


def _ms() -> Any:
    load_tvm()
    from tvm.s_tir import meta_schedule

    return meta_schedule


def _passes(target: Any, stages: Sequence[str]) -> Any:
    """The CPU pipeline's pass lists (``library_dispatch``, ``legalize``, ...) in one Sequential."""
    tvm = load_tvm()
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    passes: list[Any] = []
    for stage in stages:
        passes += getattr(cpu, f"{stage}_passes")(target)
    return tvm.transform.Sequential(passes)


def fuse(mod: Any, target: Any) -> Any:
    """Legalize and fuse a Relax module into the PrimFuncs that are tuned and then compiled."""
    with target:
        return _passes(target, ("library_dispatch", "legalize"))(mod)


def apply_database(fused: Any, target: Any, database: Any) -> tuple[Any, int, int]:
    """Replace every PrimFunc that has a record by its best schedule.

    Returns:
        ``(module, scheduled, total)``: the module, how many of its PrimFuncs got a tuned
        schedule and how many could have (the written kernels, scheduled already, not counted).
    """
    tvm = load_tvm()

    def count(module: Any) -> tuple[int, int]:
        funcs = [f for _, f in module.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
        done = sum(bool(f.attrs and f.attrs.get("tirx.is_scheduled", False)) for f in funcs)
        return done, len(funcs)

    written, total = count(fused)  # the written kernels come scheduled already
    with target, database:
        mod = tvm.relax.transform.MetaScheduleApplyDatabase()(fused)
    return mod, count(mod)[0] - written, total - written


def compile_fused(mod: Any, target: Any) -> Any:
    """``tvm.compile`` a fused module: the CPU pipeline's lowering stages, default TIR pipeline."""
    tvm = load_tvm()
    pipeline = _passes(target, ("dataflow_lower", "finalize"))
    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


@dataclass(frozen=True)
class Task:
    """One tuning task: a fused PrimFunc module, its name and how often the model calls it."""

    name: str
    weight: float
    mod: Any
    extracted: Any
    ops: float = 0.0

    @property
    def prescheduled(self) -> bool:
        """A written kernel (``tirx.is_scheduled``): kept as it is, never tuned."""
        attrs = self.mod["main"].attrs
        return attrs is not None and bool(attrs.get("tirx.is_scheduled", False))

    @property
    def cost(self) -> float:
        """Estimated arithmetic operations of the model spent in this kernel (ops x calls)."""
        return self.ops * self.weight


def _estimated_ops(mod: Any) -> float:
    """TVM's operation count estimate of a PrimFunc module (0 when it cannot estimate it)."""
    load_tvm()
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - an estimate only orders tasks; unknown counts as cheap
        return 0.0


def extract_tasks(fused: Any, target: Any) -> list[Task]:
    """The tuning tasks of a fused module (structurally equal PrimFuncs are one task)."""
    ms = _ms()
    return [Task(str(t.task_name), float(t.weight), t.dispatched[0], t,
                 _estimated_ops(t.dispatched[0]))
            for t in ms.relax_integration.extract_tasks(fused, target)]


def open_database(work_dir: Path, create: bool) -> Any:
    """The JSON database in ``work_dir`` (created empty if ``create``)."""
    ms = _ms()
    workload, records = (str(work_dir / name) for name in DATABASE_FILES)
    return ms.database.JSONDatabase(path_workload=workload, path_tuning_record=records,
                                    allow_missing=create)


def has_record(database: Any, task: Task, target: Any) -> bool:
    """Whether the database holds a measured schedule for ``task``."""
    return database.query_tuning_record(task.mod, target, task.name) is not None


def record_count(database: Any) -> int:
    """Number of tuning records (measured candidates) in the database."""
    return len(database)


def _random_args(args_info: Sequence[Any], device: Any) -> list[Any]:
    """Random tensors matching a PrimFunc's ``ArgInfo`` list (values do not affect timing)."""
    tvm = load_tvm()
    rng = np.random.default_rng(0)
    args = []
    for info in args_info:
        kind, dtype, shape = info.as_json()
        if kind != "TENSOR":
            raise TypeError(f"cannot allocate a measurement argument of kind {kind!r}")
        data = rng.integers(-8, 8, size=tuple(shape)).astype(str(dtype))
        args.append(tvm.runtime.tensor(data, device))
    return args


def in_process_measurer(min_repeat_ms: int = 20) -> tuple[Any, Any]:
    """A (builder, runner) pair that compiles and times candidates in this process.

    The builder keeps each built module in memory under a fresh temporary path (the artifact path
    TVM passes on to the runner and later deletes); the runner times it with ``time_evaluator``.
    """
    ms = _ms()
    tvm = load_tvm()
    built: dict[str, Any] = {}

    py_builder: Any = ms.builder.PyBuilder
    py_runner: Any = ms.runner.PyRunner

    @tvm.ir.utils.derived_object
    class InProcessBuilder(py_builder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

            results = []
            for item in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                    path = os.path.join(tempfile.mkdtemp(prefix="djpq_ms_"), "candidate")
                    built[path] = tvm.compile(mod, target=item.target).mod
                    results.append(ms.builder.BuilderResult(path, None))
                except Exception as exc:  # noqa: BLE001 - a failed candidate is data
                    results.append(ms.builder.BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    @tvm.ir.utils.derived_object
    class InProcessRunner(py_runner):
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            futures = []
            device = tvm.cpu()
            for item in runner_inputs:
                try:
                    rt_mod = built.pop(str(item.artifact_path))
                    timer = rt_mod.time_evaluator(rt_mod.entry_name, device, number=3, repeat=1,
                                                  min_repeat_ms=min_repeat_ms)
                    secs = [float(s) for s in timer(*_random_args(item.args_info, device)).results]
                    result = ms.runner.RunnerResult(secs, None)
                except Exception as exc:  # noqa: BLE001 - a failed candidate is data
                    result = ms.runner.RunnerResult(None, f"{type(exc).__name__}: {exc}")
                futures.append(ms.runner.RunnerFuture(lambda: True, lambda r=result: r))
            return futures

    return InProcessBuilder(), InProcessRunner()


def _progress_callback(log: Callable[[str], None], names: list[str], budget: int) -> Any:
    """A measure callback logging one line per measured batch (task, trials, best latency)."""
    ms = _ms()
    tvm = load_tvm()
    best: dict[int, float] = {}
    counts = {"trials": 0}

    base: Any = ms.measure_callback.PyMeasureCallback

    @tvm.ir.utils.derived_object
    class Progress(base):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: list[Any],
                  builder_results: list[Any], runner_results: list[Any]) -> None:
            ok = [min(r.run_secs) for r in runner_results
                  if r.error_msg is None and r.run_secs is not None and len(r.run_secs)]
            if not measure_candidates:  # the task's search space is exhausted
                return
            counts["trials"] += len(measure_candidates)
            if ok:
                best[task_id] = min(best.get(task_id, float("inf")), float(min(ok)))
            best_text = f"{best[task_id] * 1e6:.1f} us" if task_id in best else "none yet"
            errors = [r.error_msg for r in list(builder_results) + list(runner_results)
                      if r.error_msg]
            if errors:
                best_text += f"; first error: {str(errors[0]).strip().splitlines()[-1][:200]}"
            log(f"task {task_id + 1}/{len(names)} {names[task_id]}: measured "
                f"{len(measure_candidates)} candidate(s), {len(ok)} ok; best {best_text}; "
                f"{counts['trials']}/{budget} trials")

    return Progress()


_MS_LOGGER = "tvm.s_tir.meta_schedule"


def _detach_foreign_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """Remove (and return) the handlers of ``logger`` that meta_schedule did not create.

    meta_schedule rebuilds its logging with ``dictConfig``, listing the names of the handlers
    already on its logger as handlers of the new configuration; a handler the host application
    or a test harness attached (unnamed, or named outside that configuration) made it fail
    (``'NoneType' object has no attribute 'format'`` / ``KeyError``). They are re-attached after
    tuning.
    """
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith(_MS_LOGGER)]
    for handler in foreign:
        logger.removeHandler(handler)
    return foreign


def tune_tasks(tasks: Sequence[Task], target: Any, work_dir: Path, database: Any, trials: int,
               trials_per_task: int, batch: int, in_process: bool, seed: int,
               log: Callable[[str], None]) -> None:
    """Tune ``tasks`` with meta_schedule's evolutionary search, committing to ``database``."""
    ms = _ms()
    start = time.perf_counter()
    log(f"building the search spaces of {len(tasks)} task(s)")
    logger = logging.getLogger(_MS_LOGGER)
    foreign = _detach_foreign_handlers(logger)
    try:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [t.extracted for t in tasks], str(work_dir), seed=seed, num_threads=1)
    finally:
        for handler in foreign:
            logger.addHandler(handler)
    log(f"search spaces ready in {time.perf_counter() - start:.0f} s; measuring candidates")
    if in_process:
        builder, runner = in_process_measurer()
    else:
        builder = ms.builder.LocalBuilder(timeout_sec=600)
        runner = ms.runner.LocalRunner(timeout_sec=120)
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    callbacks.append(_progress_callback(log, [t.name for t in tasks], trials))
    logger.setLevel(logging.WARNING)
    ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                  max_trials_global=trials, max_trials_per_task=trials_per_task,
                  num_trials_per_iter=batch, builder=builder, runner=runner, database=database,
                  measure_callbacks=callbacks)
