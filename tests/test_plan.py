"""CompressionPlan: taken from a prepared model, saved atomically, validated, replayed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models as T
import torch

import djpq_compiler as djpq
from djpq_compiler import PlanError
from djpq_compiler.convert import convert
from djpq_compiler.plan import CompressionPlan, apply_plan, plan_from
from djpq_compiler.prepared import gates
from djpq_compiler.records import applied_plan


def _trained_like(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.fx.GraphModule]:
    torch.manual_seed(seed)
    model, x = T.InvertedResidual().eval(), torch.randn(2, 3, 8, 8)
    prepared = djpq.prepare(model, x)
    for _, gate in gates(prepared):
        with torch.no_grad():
            gate.mu[1::2] = 1e-3  # prune every other atom
    return model, x, prepared.eval()


def test_plan_round_trips_and_replays_the_structure(tmp_path: Path) -> None:
    model, x, prepared = _trained_like()
    plan = plan_from(prepared)
    path = plan.save(tmp_path / "plan.json")
    loaded = CompressionPlan.load(path)
    assert loaded == plan and loaded.hash == plan.hash
    pruned = apply_plan(model, x, loaded)
    float_converted = convert(prepared, integer=False)
    assert pruned.expand.out_channels == float_converted.expand.out_channels == 8
    assert pruned.stem.out_channels == float_converted.stem.out_channels == 4
    assert applied_plan(pruned).hash == plan.hash
    assert set(plan.layers) == {"stem", "expand", "dw", "project", "head"}


def test_plan_refuses_another_model() -> None:
    _, _, prepared = _trained_like()
    plan = plan_from(prepared)
    with pytest.raises(PlanError, match="another model"):
        apply_plan(T.Residual().eval(), torch.randn(2, 3, 8, 8), plan)
    with pytest.raises(PlanError, match="another model"):  # same class, other input shape
        apply_plan(T.InvertedResidual().eval(), torch.randn(2, 3, 16, 16), plan)


def test_truncated_or_tampered_plan_file(tmp_path: Path) -> None:
    _, _, prepared = _trained_like()
    text = plan_from(prepared).to_json()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(PlanError, match="not a valid compression plan"):
        CompressionPlan.load(tmp_path / "cut.json")
    data = json.loads(text)
    first = next(iter(data["keep"]))
    data["keep"][first] = [0, 0]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="invalid"):
        CompressionPlan.load(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="cannot read"):
        CompressionPlan.load(tmp_path / "missing.json")


def test_prepared_state_reloads_into_a_fresh_prepare_and_converts_identically() -> None:
    model, x, prepared = _trained_like()
    state = prepared.state_dict()
    fresh = djpq.prepare(model, x)
    fresh.load_state_dict(state)
    a, b = convert(prepared), convert(fresh.eval())
    assert torch.equal(a(x), b(x))
