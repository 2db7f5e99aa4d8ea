"""The main job as a Python API: FP32 -> DJPQ fine-tune -> integer model -> TVM / ONNX -> report.

:func:`run_demo` is what ``djpq demo`` runs (a zoo model with its committed FP32 checkpoint on
Fashion-MNIST); :func:`run_pipeline` is the same pipeline for any classifier and pair of loaders
(``djpq compress`` uses it, see :mod:`djpq_compiler.workflows.compress`)::

    from djpq_compiler.workflows.demo import DemoOptions, run_demo

    outcome = run_demo(DemoOptions(model="vgg7", steps=20, train_subset=2000, tvm=False))
    print(outcome.result.integer_acc, outcome.report)   # runs/demo-vgg7/report.md

The stages, in order: FP32 accuracy and BOPs; ``prepare`` + calibration on 4 training batches;
DJPQ fine-tune (:func:`~djpq_compiler.workflows.finetune.finetune`, step and/or time budget);
fake-quant
accuracy and BOPs; ``convert`` to the integer model, its accuracy (PyTorch reference executor) and
agreement with the fake-quant model; PyTorch latencies; the TVM build for this host (bit-exact
check, latency, exported library) and the ONNX export (onnxruntime per-op check, latency), each
optional and reported rather than fatal when it fails; then ``report.md``, the plots, the
compression plan (``plan.json``) and the trained prepared ``state_dict`` (``prepared.pt``) in
the run folder. Progress goes to stdout.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from djpq_compiler.errors import ConfigError
from djpq_compiler.records import converted_record
from djpq_compiler.workflows.demo_stages import backend_stages, say, torch_latencies
from djpq_compiler.workflows.report import DemoResult

__all__ = ["RunOptions", "DemoOptions", "RunOutcome", "run_demo", "run_pipeline", "demo_model",
           "DEMO_FALLBACKS"]

#: Zoo models tried, in order, when the default (resnet20) has no committed checkpoint.
DEMO_FALLBACKS = ("vgg7", "mobilenetv2", "inception")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Budget, data subsets and stages of one pipeline run (shared by demo and compress).

    Attributes:
        minutes: DJPQ fine-tune wall-clock budget in minutes.
        steps: Stop the fine-tune after this many optimizer steps (``None``: budget only).
        gamma: Weight of the DJPQ regulariser, ``loss = task + gamma * R``.
        batch_size: Training batch size.
        train_subset: Fine-tune on this many random training images (``None``: all).
        test_subset: Evaluate on this many random test images (``None``: all).
        latency_runs: Timed runs per latency measurement (median reported).
        tvm: Build with TVM for this host and check it bit-exact against the reference.
        onnx: Export ONNX and check it in onnxruntime.
        seed: Seed of shuffling, subsets and initialisation.
        progress: Show progress bars.
        out: Run folder (``None``: ``runs/<kind>-<model>``).
    """

    minutes: float = 2.0
    steps: int | None = None
    gamma: float = 1.0
    batch_size: int = 128
    train_subset: int | None = None
    test_subset: int | None = None
    latency_runs: int = 30
    tvm: bool = True
    onnx: bool = True
    seed: int = 0
    progress: bool = True
    out: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.minutes < float("inf"):
            raise ConfigError(f"minutes must be a finite number >= 0, got {self.minutes}")
        if not self.gamma >= 0:
            raise ConfigError(f"gamma must be >= 0, got {self.gamma}")
        for name in ("steps", "train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or None), got {value}")
        for name in ("batch_size", "latency_runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class DemoOptions(RunOptions):
    """Options of :func:`run_demo` (see :class:`RunOptions` for the shared ones).

    Attributes:
        model: Zoo model with a committed FP32 checkpoint (``None``: resnet20, or the first of
            :data:`DEMO_FALLBACKS` that has one).
        data: Fashion-MNIST directory (``None``: ``$DJPQ_DATA`` or the Debian package's).
    """

    model: str | None = None
    data: str | os.PathLike[str] | None = None


@dataclass(frozen=True)
class RunOutcome:
    """What a pipeline run produced.

    Attributes:
        result: Every measured number (the report's input).
        paths: ``{"report", "bits", "bops", "accuracy"}`` -> written file.
        failures: Backend checks that failed (each a sentence); empty when all passed.
    """

    result: DemoResult
    paths: Mapping[str, Path]
    failures: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every stage that ran passed its check."""
        return not self.failures

    @property
    def report(self) -> Path:
        """The ``report.md`` path."""
        return self.paths["report"]


def demo_model(requested: str | None) -> tuple[str, list[str]]:
    """The zoo model to run and notes; falls back when the default has no checkpoint yet."""
    from djpq_compiler.workflows.zoo import checkpoint_path

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


def run_demo(options: DemoOptions, command: str | None = None) -> RunOutcome:
    """Run the demo: a zoo FP32 checkpoint on Fashion-MNIST through the whole pipeline.

    Args:
        options: What to run and how long.
        command: The command line recorded in the report (default: this call, spelled out).

    Raises:
        ConfigError: unknown zoo model.
        DataError: Fashion-MNIST is missing (the message says how to get it).
        ArtifactError: the model's checkpoint is missing or broken.
    """
    from djpq_compiler.workflows.data import fashion_mnist_loaders
    from djpq_compiler.workflows.zoo import checkpoint_path, load_pretrained

    name, notes = demo_model(options.model)
    torch.manual_seed(options.seed)
    train, test = fashion_mnist_loaders(options.batch_size, options.data, options.seed,
                                        options.train_subset, options.test_subset)
    model = load_pretrained(name)
    return run_pipeline(model, train, test, options, name=name,
                        out=Path(options.out or f"runs/demo-{name}"),
                        command=command or f"run_demo({options!r})",
                        settings={"model": name, "checkpoint": str(checkpoint_path(name))},
                        notes=notes)


def run_pipeline(model: nn.Module, train: DataLoader, test: DataLoader, options: RunOptions, *,
                 name: str, out: Path, command: str, settings: Mapping[str, Any],
                 notes: Sequence[str] = (), dataset: str = "Fashion-MNIST",
                 title: str = "DJPQ demo") -> RunOutcome:
    """FP32 -> DJPQ fine-tune -> integer model -> TVM / ONNX -> report, for any classifier.

    Args:
        model: The FP32 classifier (eval mode; not modified).
        train: Shuffled training loader of ``(images, labels)``.
        test: Evaluation loader.
        options: Budget and stages.
        name: Model name shown in the report.
        out: Run folder (created).
        command: The command recorded in the report.
        settings: Leading "what was run" entries (model, checkpoint/data, ...); the pipeline's
            own (seed, gamma, budget, image counts, host) follow.
        notes: Extra lines for the report.
        dataset: Name of the evaluation data in the report.
        title: The report's title.

    Returns:
        The measured :class:`DemoResult`, the written files and the failed checks.
    """
    x32 = next(iter(test))[0][:32]
    xs = [x32[:1], x32] if x32.shape[0] > 1 else [x32]
    fp32_acc, fp32 = _fp32_stage(name, model, test, xs[0], options.progress)
    prepared, steps, seconds = _finetune_stage(options, model, train)
    measured = _integer_stage(model, prepared, test, xs, options, fp32.total)
    fields, failures = backend_stages(options, measured.converted, xs, out)
    fields["latencies"] = measured.latencies + fields["latencies"]
    fields["artifacts"].update(_save_training(prepared, out))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    result = DemoResult(
        model=name, command=command, notes=tuple(notes), dataset=dataset, title=title,
        settings={**settings, **_settings(options, train, test)}, fp32_acc=fp32_acc,
        fake_quant_acc=measured.fq_acc, integer_acc=measured.int_acc,
        test_images=_n_images(test), fp32_gbops=fp32.gbops,
        fake_quant_gbops=measured.fq_gbops, integer_gbops=measured.int_report.gbops,
        layers=measured.layers, train_steps=steps, train_seconds=seconds,
        float_islands=measured.float_islands, integer_agreement=measured.agreement,
        lookup_tables=converted_record(measured.converted).lut_ops,
        **fields)
    result.settings["load average (1/5/15 min) after the latency runs"] = load
    from djpq_compiler.workflows.report import summary, write_report

    paths = write_report(result, out)
    say("")
    say(summary(result))
    say(f"report: {paths['report']}")
    return RunOutcome(result, paths, tuple(failures))


def _fp32_stage(name: str, model: nn.Module, test: DataLoader, x: torch.Tensor,
                progress: bool) -> tuple[float, Any]:
    """FP32 accuracy and BOPs report of the input model (printed)."""
    from djpq_compiler.bops import bops
    from djpq_compiler.workflows.finetune import accuracy

    fp32 = bops(model, x)
    fp32_acc = accuracy(model, test, progress=progress)
    say(f"[fp32] {name}: test accuracy {100 * fp32_acc:.2f} % on {_n_images(test)} images, "
        f"{fp32.gbops:.4f} GBOPs")
    say(fp32.table())
    return fp32_acc, fp32


def _settings(options: RunOptions, train: DataLoader, test: DataLoader) -> dict[str, Any]:
    return {"seed": options.seed, "gamma": options.gamma,
            "fine-tune budget": f"{options.minutes:g} min"
            + (f", at most {options.steps} steps" if options.steps else ""),
            "training images": _n_images(train), "test images": _n_images(test),
            "batch size": options.batch_size, "DJPQ config": "DJPQConfig() defaults",
            "host": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} torch threads"}


def _n_images(loader: DataLoader) -> int:
    return len(loader.dataset)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- stages


def _finetune_stage(options: RunOptions, model: nn.Module,
                    train: DataLoader) -> tuple[nn.Module, int, float]:
    """Prepare + calibrate on 4 training batches, then DJPQ fine-tune; (prepared, steps, s)."""
    import itertools

    from tqdm import tqdm

    import djpq_compiler as djpq
    from djpq_compiler.workflows.finetune import FinetuneConfig, finetune

    calib = [x for x, _ in itertools.islice(train, 4)]
    say(f"[prepare] gates + quantizers, calibrating on {len(calib)} training batches")
    prepared = djpq.prepare(model, calib[0], djpq.DJPQConfig(), calibration_data=calib)
    say(f"[fine-tune] gamma {options.gamma:g}, budget {options.minutes:g} min"
        + (f" / {options.steps} steps" if options.steps else ""))
    cfg = FinetuneConfig(gamma=options.gamma, steps=options.steps, minutes=options.minutes,
                         log_every=10 if options.steps is None else max(1, min(10, options.steps)))
    steps = [0]  # training forwards = optimizer steps (finetune() logs every log_every only)
    hook = prepared.register_forward_pre_hook(
        lambda mod, inp: steps.__setitem__(0, steps[0] + mod.training))
    start = time.perf_counter()
    try:
        finetune(prepared, train, cfg, progress=options.progress,
                 on_log=lambda log: tqdm.write(
                     f"  step {log.step:5d}  {log.seconds:5.0f} s  task {log.task_loss:.3f}  "
                     f"R {log.regularizer:.4f}  {log.gbops:.4f} GBOPs"))
    finally:
        hook.remove()
    return prepared, steps[0], time.perf_counter() - start


@dataclass(frozen=True)
class _IntegerStage:
    """Fake-quant and integer measurements of a trained prepared model."""

    converted: nn.Module
    fq_acc: float
    fq_gbops: float
    int_acc: float
    int_report: Any
    layers: Sequence[Any]
    float_islands: tuple[str, ...]
    agreement: dict[str, int]
    latencies: list[Any]


def _integer_stage(model: nn.Module, prepared: nn.Module, test: DataLoader,
                   xs: Sequence[torch.Tensor], options: RunOptions,
                   fp32_total: float) -> _IntegerStage:
    """Fake-quant accuracy/BOPs, ``convert``, integer accuracy/BOPs, agreement, latencies."""
    import djpq_compiler as djpq
    from djpq_compiler.bops import bops
    from djpq_compiler.convert import convert
    from djpq_compiler.verify import integer_agreement
    from djpq_compiler.workflows.finetune import accuracy
    from djpq_compiler.workflows.report import layer_rows

    fq_acc = accuracy(prepared, test, progress=options.progress)
    fq_gbops = bops(prepared).gbops
    say(f"[fake-quant] test accuracy {100 * fq_acc:.2f} %, {fq_gbops:.4f} GBOPs")
    say(djpq.layer_summary(prepared).table())
    converted = convert(prepared)
    int_report = bops(converted)
    int_acc = accuracy(converted, test, progress=options.progress)
    say(f"[integer] test accuracy {100 * int_acc:.2f} % (reference executor), "
        f"{int_report.gbops:.4f} GBOPs ({fp32_total / int_report.total:.1f}x fewer)")
    agreement = integer_agreement(prepared, converted, xs[-1])  # type: ignore[arg-type]
    return _IntegerStage(
        converted, fq_acc, fq_gbops, int_acc, int_report, layer_rows(int_report.rows),
        converted_record(converted).float_ops, agreement,
        torch_latencies(model, converted, xs, options.latency_runs))


def _save_training(prepared: nn.Module, out: Path) -> dict[str, str]:
    """``plan.json`` (kept channels and bits) and ``prepared.pt`` (the trained state_dict)."""
    from djpq_compiler.plan import plan_from

    out.mkdir(parents=True, exist_ok=True)
    plan = plan_from(prepared).save(out / "plan.json")
    torch.save(prepared.state_dict(), out / "prepared.pt")
    return {"compression plan (JSON)": plan.name,
            "trained prepared model (state_dict; load into a fresh prepare())": "prepared.pt"}
