"""What each stage hands the next: typed, frozen records, one ``gm.meta`` key each.

A ``GraphModule`` made by this compiler carries at most one record per stage, stored under one
key and read through one accessor that says what to do when it is missing:

=====================  ====================  ==========================================
record                 key                   accessor
=====================  ====================  ==========================================
:class:`CaptureRecord`   ``djpq.capture``    :func:`capture_record` (a captured graph)
:class:`PreparedRecord`  ``djpq.prepared``   :func:`prepared_record` (``prepare()``)
:class:`ConvertedRecord` ``djpq.converted``  :func:`converted_record` (``convert()``)
:class:`PlanRecord`      ``djpq.plan``       :func:`applied_plan` (``apply_plan()``)
=====================  ====================  ==========================================

:func:`stage` says which of ``"prepared"`` / ``"converted"`` a model is (``None``: neither).
Values one pass computes for the next (kept atoms, gate factors, weight grids) are that pass's
return value, never a meta entry. Node-level facts stay in ``node.meta`` (:data:`NODE_VALUE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from djpq_compiler.errors import ConfigError

if TYPE_CHECKING:
    from djpq_compiler.config import DJPQConfig
    from djpq_compiler.passes.dependency.groups import ChannelGroup
    from djpq_compiler.prepared import PreparedLayer

__all__ = [
    "NODE_VALUE",
    "CaptureRecord",
    "AnalysisRecord",
    "QuantizerPaths",
    "PreparedRecord",
    "ConvertedRecord",
    "PlanRecord",
    "stage",
    "store",
    "capture_record",
    "prepared_record",
    "converted_record",
    "applied_plan",
]

#: ``node.meta`` key of the Python value a non-tensor node had at capture (sizes, shapes).
NODE_VALUE = "djpq.value"

_CAPTURE, _PREPARED, _CONVERTED, _PLAN = ("djpq.capture", "djpq.prepared", "djpq.converted",
                                          "djpq.plan")


@dataclass(frozen=True)
class CaptureRecord:
    """What ``capture`` learned about the source model.

    Attributes:
        how: ``"torch.fx.symbolic_trace"``, with ``", shapes specialized"`` when a shape
            condition was decided by the example inputs.
        specialized: The decided shape conditions (empty for a plain symbolic trace).
        signature: SHA-256 of the captured graph (ops, targets, shapes): a plan's identity.
        source_class: ``module.QualName`` of the source model.
        source_params: Parameter count of the source model (the FP32 size reference).
    """

    how: str
    specialized: tuple[str, ...]
    signature: str
    source_class: str
    source_params: int


@dataclass(frozen=True)
class AnalysisRecord:
    """The channel groups of a captured graph (``dependency_analysis``).

    Attributes:
        groups: Every channel group (prunable or not), ids are positions.
        barriers: ``{node name: reasons}`` for nodes that stop pruning.
        missing: Nodes whose op has no channel rule (treated as barriers).
    """

    groups: tuple[ChannelGroup, ...]
    barriers: dict[str, tuple[str, ...]]
    missing: tuple[str, ...]


@dataclass(frozen=True)
class QuantizerPaths:
    """Where ``insert_quantizers`` put the quantizers (submodule paths).

    Attributes:
        weight: ``{layer node name: weight quantizer path}``.
        input: ``{layer node name: path of the quantizer of the tensor it reads}``.
        act: ``{producer node name: activation quantizer path}``.
        auto_signed: Activation quantizers whose sign calibration decides.
    """

    weight: dict[str, str] = field(default_factory=dict)
    input: dict[str, str] = field(default_factory=dict)
    act: dict[str, str] = field(default_factory=dict)
    auto_signed: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedRecord:
    """Everything ``prepare`` knows, read by the loss, BOPs, plans and ``convert``.

    Attributes:
        config: The configuration the model was prepared with.
        capture: What capture learned about the source model.
        analysis: The channel groups, barriers and ops without a rule.
        gates: ``{group id: gate module path}`` (empty when not pruning).
        quantizers: Where the quantizers are.
        layers: One :class:`~djpq_compiler.prepared.PreparedLayer` per conv/linear layer.
    """

    config: DJPQConfig
    capture: CaptureRecord
    analysis: AnalysisRecord
    gates: dict[int, str]
    quantizers: QuantizerPaths
    layers: tuple[PreparedLayer, ...]

    @property
    def groups(self) -> tuple[ChannelGroup, ...]:
        return self.analysis.groups


@dataclass(frozen=True)
class ConvertedRecord:
    """What ``convert`` produced, read by the backends, BOPs, size and verification.

    Attributes:
        integer: ``True``: integer modules; ``False``: the pruned float model.
        layers: The prepared model's layer records (original channel counts).
        keep: ``{group id: kept atoms}`` of every gated group.
        float_ops: Nodes that run in float between integer layers (float islands).
        lut_ops: Nodes lowered to exact integer lookup tables.
        lowered_layers: ``{layer node name: {"w_bits", "a_bits", "in", "out"}}``.
        agreement_bounds: ``{layer: LSB}`` for layers whose integer bias cannot agree with
            fake-quant within 1 LSB (``convert`` warned about each).
        quant_map: ``{prepared quantizer node: converted node holding its codes}``.
        source_class: ``module.QualName`` of the source model.
        source_params: Parameter count of the source model.
    """

    integer: bool
    layers: tuple[PreparedLayer, ...] = ()
    keep: dict[int, list[int]] = field(default_factory=dict)
    float_ops: tuple[str, ...] = ()
    lut_ops: tuple[str, ...] = ()
    lowered_layers: dict[str, dict[str, int]] = field(default_factory=dict)
    agreement_bounds: dict[str, int] = field(default_factory=dict)
    quant_map: dict[str, str] = field(default_factory=dict)
    source_class: str = ""
    source_params: int = 0


@dataclass(frozen=True)
class PlanRecord:
    """The :class:`~djpq_compiler.plan.CompressionPlan` a pruned float model was made from."""

    hash: str


_KEYS: dict[type, str] = {CaptureRecord: _CAPTURE, PreparedRecord: _PREPARED,
                          ConvertedRecord: _CONVERTED, PlanRecord: _PLAN}
_R = TypeVar("_R")


def _meta(model: object) -> dict[str, Any]:
    meta = getattr(model, "meta", None)
    return meta if isinstance(meta, dict) else {}


def store(gm: Any, record: CaptureRecord | PreparedRecord | ConvertedRecord | PlanRecord) -> None:
    """Put ``record`` under its key in ``gm.meta``. A capture, prepared or converted record
    replaces every record of the stages before (a model carries its latest stage only)."""
    if not isinstance(record, PlanRecord):
        for key in _KEYS.values():
            gm.meta.pop(key, None)
    gm.meta[_KEYS[type(record)]] = record


def stage(model: object) -> str | None:
    """``"converted"``, ``"prepared"`` or ``None`` (any other module, or a bare graph)."""
    meta = _meta(model)
    if isinstance(meta.get(_CONVERTED), ConvertedRecord):
        return "converted"
    if isinstance(meta.get(_PREPARED), PreparedRecord):
        return "prepared"
    return None


def _read(model: object, cls: type[_R], what: str) -> _R:
    record = _meta(model).get(_KEYS[cls])
    if not isinstance(record, cls):
        raise ConfigError(f"this {type(model).__name__} is not {what} (it carries no "
                          f"{cls.__name__}; found stage {stage(model)!r})")
    return record


def capture_record(model: object) -> CaptureRecord:
    """The capture record of a captured graph.

    Raises:
        ConfigError: ``model`` was not made by ``passes.capture``: capture it first.
    """
    return _read(model, CaptureRecord, "a captured graph: call djpq_compiler.passes.capture."
                 "capture(model, example_inputs) or djpq.analyze first")


def prepared_record(model: object) -> PreparedRecord:
    """The record of a prepared model (unwrap DDP first).

    Raises:
        ConfigError: ``model`` is not a prepared model: call ``djpq.prepare`` first.
    """
    return _read(model, PreparedRecord, "a prepared model: call djpq.prepare(model, "
                 "example_inputs) first")


def converted_record(model: object) -> ConvertedRecord:
    """The record of a converted model.

    Raises:
        ConfigError: ``model`` is not a converted model: call ``djpq.convert(prepared)`` first.
    """
    return _read(model, ConvertedRecord, "a converted model: call djpq.convert(prepared) first")


def applied_plan(model: object) -> PlanRecord | None:
    """The plan a pruned float model was made from (``apply_plan``), or ``None``."""
    record = _meta(model).get(_PLAN)
    return record if isinstance(record, PlanRecord) else None
