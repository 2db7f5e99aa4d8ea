"""``CompressionPlan``: what DJPQ decided, as JSON — kept channels per group and per-layer bits.

A plan is taken from a trained prepared model (:func:`plan_from`), saved atomically as JSON
(:meth:`CompressionPlan.save`), loaded with validation (:meth:`CompressionPlan.load`) and replayed
on the original model definition (:func:`apply_plan`): the same channels are physically removed,
giving the pruned float model to fine-tune, export or compare. The plan records a signature of
the source graph (ops, targets and shapes), so it is never applied to a different model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.fx as fx
from torch import nn

from djpq_compiler.analysis import analyze
from djpq_compiler.artifacts import atomic_write
from djpq_compiler.errors import PlanError
from djpq_compiler.passes.capture import as_input_tuple, graph_signature, propagate_shapes
from djpq_compiler.passes.prune import prune_graph
from djpq_compiler.prepared import gate_of, prepared_layers, quantizer_at, unwrap
from djpq_compiler.records import PlanRecord, prepared_record, stage, store

__all__ = ["CompressionPlan", "plan_from", "apply_plan", "graph_signature", "PLAN_VERSION"]

PLAN_VERSION = 1


@dataclass(frozen=True)
class CompressionPlan:
    """Kept atoms per channel group, group sizes, per-layer bit-widths, and the source graph.

    Attributes:
        signature: :func:`graph_signature` of the captured source model.
        source_class: ``module.Class`` of the source model.
        groups: ``{group id: size}`` of every group in ``keep``.
        keep: ``{group id: sorted kept atom indices}``.
        layers: ``{layer name: {"w_bits", "a_bits", "w_step", "out_kept", "in_kept"}}``.
    """

    signature: str
    source_class: str
    groups: Mapping[int, int]
    keep: Mapping[int, tuple[int, ...]]
    layers: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["groups"] = {str(k): v for k, v in self.groups.items()}
        data["keep"] = {str(k): list(v) for k, v in self.keep.items()}
        return json.dumps(data, indent=1, sort_keys=True)

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON (what artifacts record to name their plan)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        """Parse and validate; raises :class:`PlanError` on malformed or tampered content."""
        try:
            data = json.loads(text)
            plan = cls(signature=str(data["signature"]), source_class=str(data["source_class"]),
                       groups={int(k): int(v) for k, v in data["groups"].items()},
                       keep={int(k): tuple(int(i) for i in v) for k, v in data["keep"].items()},
                       layers=dict(data.get("layers", {})), version=int(data["version"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"not a valid compression plan ({type(exc).__name__}: {exc}); "
                            "re-create it with djpq_compiler.plan.plan_from(prepared)") from exc
        plan._validate()
        return plan

    def _validate(self) -> None:
        if self.version != PLAN_VERSION:
            raise PlanError(f"plan version {self.version} is not supported (expected "
                            f"{PLAN_VERSION}); re-create it with "
                            "djpq_compiler.plan.plan_from(prepared)")
        for gid, atoms in self.keep.items():
            size = self.groups.get(gid)
            if size is None or not atoms or len(set(atoms)) != len(atoms) \
                    or min(atoms) < 0 or max(atoms) >= size:
                raise PlanError(f"plan entry for group {gid} is invalid: kept {list(atoms)[:8]} "
                                f"of a group of size {size}; the file was edited or damaged: "
                                "re-create it with djpq_compiler.plan.plan_from(prepared)")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON atomically (temp file + rename): never a half-written plan."""
        return atomic_write(path, self.to_json().encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompressionPlan:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        return cls.from_json(text)


def plan_from(prepared: nn.Module) -> CompressionPlan:
    """The plan a trained prepared model encodes (hard gates, read-out bits)."""
    gm = unwrap(prepared)
    if stage(gm) != "prepared":
        raise PlanError("plan_from() needs a model returned by djpq_compiler.prepare()")
    record = prepared_record(gm)
    groups, keep = {}, {}
    for group in record.groups:
        gate = gate_of(gm, group.id)
        if gate is not None:
            groups[group.id] = group.size
            mask = gate.deploy_mask(record.config.round_to)
            keep[group.id] = tuple(int(i) for i in mask.nonzero().flatten())
    layers = {}
    for rec in prepared_layers(gm):
        wq, aq = quantizer_at(gm, rec.weight_quantizer), quantizer_at(gm, rec.input_quantizer)
        layers[rec.name] = {"w_bits": wq.readout_bits() if wq else 32,
                            "a_bits": aq.readout_bits() if aq else 32,
                            "w_step": float(wq.snapped().d) if wq else 0.0}
    return CompressionPlan(record.capture.signature, record.capture.source_class, groups, keep,
                           layers)


def apply_plan(model: nn.Module, example_inputs: Any, plan: CompressionPlan) -> fx.GraphModule:
    """Replay the plan's structure on the original model: a pruned float ``GraphModule``.

    Raises:
        PlanError: the model's graph differs from the one the plan was made for.
    """
    report = analyze(model, example_inputs)
    gm = report.graph_module
    signature = graph_signature(gm)
    if signature != plan.signature:
        raise PlanError(f"this plan was made for another model ({plan.source_class}, signature "
                        f"{plan.signature[:12]}…), not this {type(model).__name__} (signature "
                        f"{signature[:12]}…); use the same model definition and input shape")
    for gid, size in plan.groups.items():
        if gid >= len(report.groups) or report.groups[gid].size != size:
            raise PlanError(f"plan group {gid} (size {size}) does not match this model's groups; "
                            "the plan was made for another version of this model: re-create it "
                            "with djpq_compiler.plan.plan_from(prepared)")
    prune_graph(gm, report.groups, {gid: list(atoms) for gid, atoms in plan.keep.items()})
    propagate_shapes(gm, as_input_tuple(example_inputs))
    store(gm, PlanRecord(plan.hash))
    return gm
