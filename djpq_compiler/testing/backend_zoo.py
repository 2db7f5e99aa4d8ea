"""The backend gate over a model zoo: every model that converts must build and agree everywhere.

:func:`check_backends` takes one float model through the whole user path — ``prepare`` (default
config), ~40 % of every gate group closed at random, ``convert(integer=True)`` — and then checks
each executor against the integer reference (the converted GraphModule run in PyTorch):

* fake-quant vs integer reference: at most 1 LSB per op
  (:func:`djpq_compiler.verify.integer_agreement`);
* the TVM build for this CPU (``target="x86"``): equal to the reference bit for bit (integer
  outputs; a float output, where a float island ends the net, within float32 rounding); where a
  net with float islands differs, the teacher-forced per-op check
  (``backends.tvm.verify.verify_per_op``, TVM's counterpart of ONNX's per-op check) decides:
  every integer op bit-exact and every island output within 1 LSB on the reference's own
  inputs (TVM's float math is a few ulps from PyTorch's), so the end-to-end difference is only
  those flips propagating (``ok``, the detail says so), else ``mismatch``;
* the ONNX export run in onnxruntime: at most 1 LSB per integer op (``backends.onnx.verify``).

Each stage's outcome is recorded in a :class:`BackendZooResult` instead of raised, so a zoo run
reports every model; an exception that is not a :class:`DjpqError` is recorded as a *crash* (the
worst outcome besides a silent disagreement). Used by ``tests/test_backend_zoo.py`` and
``benchmarks/torchvision_zoo/backends.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from djpq_compiler.errors import DjpqError
from djpq_compiler.records import converted_record

#: A float output (the net ends in a float island, e.g. a float ReLU + pool after the last layer)
#: may differ by float32 rounding (TVM's summation order); integer outputs must be bit-exact.
FLOAT_OUTPUT_RTOL = 1e-5

#: Each stage's start is logged here (INFO), so a run stopped from outside (timeout, memory
#: guard of ``benchmarks/torchvision_zoo/backends.py``) can say which stage it was in.
LOG = logging.getLogger(__name__)

__all__ = ["BackendZooResult", "StageOutcome", "check_backends", "check_tvm", "check_tvm_build",
           "pruned_converted", "zoo_input"]


@dataclass(frozen=True)
class StageOutcome:
    """What one stage did: ``ok``, ``refused`` (a DjpqError), ``crash`` (any other exception) or
    ``mismatch`` (ran, but disagrees with the reference beyond its invariant)."""

    status: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class BackendZooResult:
    """Every stage's outcome for one model (stages that could not run are absent)."""

    name: str
    stages: dict[str, StageOutcome] = field(default_factory=dict)
    float_ops: tuple[str, ...] = ()

    @property
    def crashes(self) -> list[str]:
        return [s for s, o in self.stages.items() if o.status == "crash"]

    def passed(self, *stages: str) -> bool:
        """Whether each of ``stages`` ran and is ``ok``."""
        return all(s in self.stages and self.stages[s].ok for s in stages)


def zoo_input(name: str, batch: int = 2) -> torch.Tensor:
    """A small input for torchvision classification model ``name`` (the smallest its
    architecture accepts without degenerate feature maps)."""
    if name.startswith("swin"):
        size = 56  # 14x14 tokens: shifted 7x7 windows in stage 1, padded windows after it
    elif name.startswith(("vit", "maxvit")):
        size = 224  # fixed image size (ViT) / every stage divisible by the partition (MaxViT)
    elif name.startswith("inception"):
        size = 96
    elif name in {"googlenet", "squeezenet1_0", "squeezenet1_1", "alexnet"}:
        size = 64
    else:
        size = 32
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def tiny_swin() -> tuple[Any, torch.Tensor]:
    """``(converted, x)``: a two-stage Swin V1 (embed 16, window 4, seeded random init) on a
    ``(2, 3, 32, 32)`` input, pruned and converted by :func:`pruned_converted`: the small model
    with float islands that the TVM per-op check is tested on."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                            window_size=[4, 4], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return pruned_converted(model, x)[1], x


def pruned_converted(model: nn.Module, x: torch.Tensor, seed: int = 0,
                     close: float = 0.4) -> tuple[Any, Any]:
    """``(prepared, converted)`` for ``model`` with ~``close`` of every gate group closed at
    random (one channel per group always kept)."""
    import djpq_compiler as djpq
    from djpq_compiler.prepared import gates

    torch.manual_seed(seed)
    LOG.info("prepare")
    prepared = djpq.prepare(model.eval(), x)
    del model  # prepare copied it: a caller that holds no other reference frees it now
    gen = torch.Generator().manual_seed(seed)
    for _, gate in gates(prepared):
        with torch.no_grad():
            gate.mu[torch.rand(gate.mu.shape, generator=gen) < close] = 1e-3
            gate.mu[0] = 1.0
    prepared.eval()
    LOG.info("convert")
    return prepared, djpq.convert(prepared)


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op
    elsewhere): tensors of a few MB freed by one stage otherwise stay in the process's resident
    memory while the next stage (a big model's TVM build) allocates more."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _run(fn: Any) -> tuple[StageOutcome, Any]:
    start = time.perf_counter()
    try:
        value = fn()
    except DjpqError as exc:
        # the first line, and the first node a backend names (an UnsupportedNodesError's)
        first = " | ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        return StageOutcome("refused", f"{type(exc).__name__}: {first[:300]}",
                            time.perf_counter() - start), None
    except Exception as exc:  # recorded, never hidden: a non-DjpqError is a defect
        return StageOutcome("crash", f"{type(exc).__name__}: {str(exc)[:200]}",
                            time.perf_counter() - start), None
    return StageOutcome("ok", "", time.perf_counter() - start), value


def _agreement(prepared: Any, converted: Any, x: torch.Tensor) -> StageOutcome:
    from djpq_compiler.verify import integer_agreement

    outcome, lsb = _run(lambda: integer_agreement(prepared, converted, x))
    if not outcome.ok:
        return outcome
    worst = max(lsb.values(), default=0)
    status = "ok" if worst <= 1 else "mismatch"
    return StageOutcome(status, f"max {worst} LSB per op", outcome.seconds)


def _tvm_inputs(x: torch.Tensor) -> list[torch.Tensor]:
    return [x, torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 2]


def _first(t: Any) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t[0]


def check_tvm(converted: Any, x: torch.Tensor, target: str = "x86") -> StageOutcome:
    """The ``tvm`` stage of the gate: :func:`check_tvm_build`'s outcome."""
    return check_tvm_build(converted, x, target)[0]


def check_tvm_build(converted: Any, x: torch.Tensor,
                    target: str = "x86") -> tuple[StageOutcome, Any]:
    """The ``tvm`` stage of the gate on a converted model: build for ``target`` (an x86 target
    this CPU runs: ``"x86"``, or ``"x86-avx2"`` for the AVX2 kernels), run two inputs; ``ok``
    when bit-exact (a float output within ``FLOAT_OUTPUT_RTOL``), or, for a net with float
    islands, when the teacher-forced per-op check holds (the detail then says the end-to-end
    difference is propagated island flips); else ``mismatch`` (``refused``/``crash`` when the
    build or a run raises). Returns the outcome and the ``CompiledModel`` (``None`` when the
    build did not succeed), whose kernel records callers may read."""
    from djpq_compiler.backends import tvm as tvm_backend

    LOG.info("tvm: build")
    outcome, compiled = _run(lambda: tvm_backend.build(converted, target, example_inputs=x))
    if not outcome.ok:
        return outcome, None
    worst, worst_float = 0.0, 0.0
    LOG.info("tvm: run and compare")
    for inp in _tvm_inputs(x):
        run, pair = _run(lambda inp=inp: (compiled(inp), converted(inp)))
        if not run.ok:
            return StageOutcome(run.status, "call: " + run.detail, outcome.seconds), compiled
        got, want = (_first(t) for t in pair)
        if got.shape != want.shape or got.dtype != want.dtype:
            return StageOutcome("mismatch", f"output {got.dtype}{tuple(got.shape)} vs "
                                f"{want.dtype}{tuple(want.shape)}", outcome.seconds), compiled
        diff = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
        if want.is_floating_point():  # a float island ends the net: float32 rounding only
            scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
            worst_float = max(worst_float, diff / scale)
        else:
            worst = max(worst, diff)
    if worst > 0 or worst_float > FLOAT_OUTPUT_RTOL:
        detail = f"max |diff| {max(worst, worst_float):.3g}"
        if converted_record(converted).float_ops:
            return _per_op(converted, x, detail, outcome.seconds, compiled, target), compiled
        return StageOutcome("mismatch", detail, outcome.seconds), compiled
    detail = "bit-exact" if worst_float == 0 else f"float output within {worst_float:.1e} rel."
    return StageOutcome("ok", detail, outcome.seconds), compiled


def _per_op(converted: Any, x: torch.Tensor, final: str, seconds: float,
            compiled: Any, target: str = "x86") -> StageOutcome:
    """Where a net with float islands disagrees end to end: the teacher-forced per-op check
    (``backends.tvm.verify.verify_per_op``). ``ok`` when every integer op is bit-exact and every
    island output within 1 LSB on the reference's own inputs, so the end-to-end difference is
    propagation of island flips only; else ``mismatch``."""
    from djpq_compiler.backends.tvm.verify import verify_per_op

    LOG.info("tvm: per-op probe")
    checked, report = _run(lambda: verify_per_op(converted, _tvm_inputs(x), target))
    if not checked.ok:
        return StageOutcome("mismatch", f"{final}; per-op probe: {checked.detail}", seconds)
    status = "ok" if report.ok else "mismatch"
    built = {k.layer: k.variant for k in compiled.kernels}
    other = sorted(n for n, v in built.items() if report.kernels.get(n) != v)
    kernels = (f"; {len(other)} layer(s) got other kernels in the probe: {other[:3]}" if other
               else "; same kernels as the build")
    return StageOutcome(status, f"{final} end to end (island flips propagated); "
                        f"{report.summary()}{kernels}", seconds)


def _onnx(converted: Any, x: torch.Tensor) -> StageOutcome:
    from djpq_compiler.backends.onnx import export
    from djpq_compiler.backends.onnx.verify import verify

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        LOG.info("onnx: export")
        outcome, _ = _run(lambda: export(converted, path, example_inputs=(x,)))
        if not outcome.ok:
            return outcome
        _release_memory()  # the exporter's model proto and its checker's copies
        LOG.info("onnx: verify")
        checked, report = _run(lambda: verify(converted, path, x))
    if not checked.ok:
        return StageOutcome(checked.status, "verify: " + checked.detail, outcome.seconds)
    worst = int(report["max_lsb_per_op"])
    status = "ok" if worst <= 1 else "mismatch"
    return StageOutcome(status, f"max {worst} LSB per op", outcome.seconds)


def check_backends(name: str, model: nn.Module, x: torch.Tensor,
                   stages: tuple[str, ...] = ("agreement", "tvm", "onnx")) -> BackendZooResult:
    """Convert ``model`` (pruned at random) and check it in each of ``stages``.

    Memory (a big model, e.g. vit_h_14, holds three copies of its weights at once otherwise):
    the float ``model`` is released once ``prepare`` has copied it, when the caller keeps no
    reference of its own, and the prepared model once the agreement stage is done.
    """
    LOG.info("%s: stage convert", name)
    held = [model]
    del model
    outcome, pair = _run(lambda: pruned_converted(held.pop(), x))
    result: dict[str, StageOutcome] = {"convert": outcome}
    if not outcome.ok:
        return BackendZooResult(name, result)
    prepared, converted = pair
    del pair
    float_ops = converted_record(converted).float_ops
    checks = {"agreement": lambda: _agreement(prepared, converted, x),
              "tvm": lambda: check_tvm(converted, x), "onnx": lambda: _onnx(converted, x)}
    LOG.info("%s: convert %s", name, outcome.status)
    for stage in stages:
        LOG.info("%s: stage %s", name, stage)
        result[stage] = checks[stage]()
        LOG.info("%s: %s %s %s", name, stage, result[stage].status, result[stage].detail)
        if stage == "agreement":
            prepared = None  # the backends read only the converted model
            _release_memory()
    LOG.info("%s: done", name)
    return BackendZooResult(name, result, float_ops)
