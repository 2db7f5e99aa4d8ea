"""The teacher-forced per-op check of a TVM build (``backends/tvm/verify.py``).

The probe cuts every ``Quantize`` and feeds the reference executor's codes in its place, so each
float island and each integer op runs on the reference's own inputs: integer ops must then be
bit-exact and island outputs within 1 LSB. Checked here: the probe itself computes the reference
in PyTorch (the cut changes nothing), a tiny Swin passes in TVM, and the check catches an integer
op that is off by one and an island that is off by more than one LSB, each at the right node.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn

from djpq_compiler.ir import modules as im
from djpq_compiler.registry import op_key
from djpq_compiler.testing.backend_zoo import pruned_converted, tiny_swin

tv = pytest.importorskip("torchvision")

from djpq_compiler.backends.tvm.verify import (  # noqa: E402
    _Recorder,
    teacher_forced_probe,
    verify_per_op,
)


@pytest.fixture(scope="module")
def swin() -> tuple[fx.GraphModule, torch.Tensor]:
    return tiny_swin()


def _inputs(x: torch.Tensor) -> list[torch.Tensor]:
    return [x, torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 2]


def test_probe_computes_the_reference_in_pytorch(swin: Any) -> None:
    """Fed the reference's own codes, the probe (run in PyTorch) reproduces every compared
    node exactly: cutting the quantizers changes nothing but where the values come from."""
    converted, x = swin
    recorder = _Recorder(converted)
    want = recorder.run(x)
    probe, cut, compared = teacher_forced_probe(converted, list(recorder.values))
    quantizers = [n for n in converted.graph.nodes if n.op == "call_module"
                  and isinstance(converted.get_submodule(str(n.target)), im.Quantize)]
    assert cut == [n.name for n in quantizers] and set(cut) <= set(compared)
    placeholders = [n for n in probe.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1 + len(cut)
    got = probe(x, *[recorder.values[n].float() for n in cut])
    assert torch.equal(got[0], want)
    for name, value in zip(compared, got[1:], strict=True):
        assert torch.equal(value, recorder.values[name].to(value.dtype)), name
    # the original model is untouched
    assert len([n for n in converted.graph.nodes if n.op == "placeholder"]) == 1


def test_tiny_swin_passes_per_op(swin: Any) -> None:
    converted, x = swin
    report = verify_per_op(converted, _inputs(x))
    assert report.ok, report.summary()
    assert report.integer_ops > 20 and report.quantizers == 12


def _patch(monkeypatch: pytest.MonkeyPatch, key: object, wrap: Any) -> None:
    from djpq_compiler.backends.tvm.emit import CONVERTERS

    rules = CONVERTERS._rules
    original = rules[op_key(key)]
    monkeypatch.setitem(rules, op_key(key), lambda ctx, node: wrap(ctx, node, original(ctx, node)))


def test_an_integer_op_off_by_one_is_caught_at_that_op(
        swin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def plus_one(ctx: Any, node: fx.Node, value: Any) -> Any:
        one = ctx.bb.const(np.array(1, dtype="int64"), "int64")
        wide = ctx.bb.binary("add", ctx.bb.astype(value.expr, "int64"), one)
        return ctx.int_value(wide, value.lo, value.hi + 1)

    _patch(monkeypatch, im.IntAdd, plus_one)
    converted, x = swin
    report = verify_per_op(converted, _inputs(x))
    adds = {n.name for n in converted.graph.nodes if n.op == "call_module"
            and isinstance(converted.get_submodule(str(n.target)), im.IntAdd)}
    assert not report.ok
    assert set(report.integer_diffs) >= adds and set(report.integer_diffs.values()) >= {1}


def test_an_island_off_by_more_than_one_lsb_is_caught_at_its_quantizer(
        swin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every island's Quantize two codes too high: caught at the quantizers, while the integer
    ops, fed the reference's codes, stay bit-exact (the cut isolates them)."""
    def plus_two(ctx: Any, node: fx.Node, value: Any) -> Any:
        if str(node.target).startswith("djpq_forced_"):
            return value  # the probe's own cut, fed the reference's codes
        two = ctx.bb.const(np.array(2, dtype="int64"), "int64")
        wide = ctx.bb.binary("add", ctx.bb.astype(value.expr, "int64"), two)
        return ctx.int_value(ctx.bb.clip(wide, value.lo, value.hi), value.lo, value.hi)

    _patch(monkeypatch, im.Quantize, plus_two)
    converted, x = swin
    report = verify_per_op(converted, _inputs(x))
    assert not report.ok and report.max_quantizer_lsb == 2
    assert len(report.quantizer_diffs) == report.quantizers and not report.integer_diffs


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.conv(x))
        return y, y + 1.0


def test_several_outputs_are_refused() -> None:
    from djpq_compiler.errors import BackendError

    x = torch.randn(1, 3, 8, 8)
    _, converted = pruned_converted(_TwoOutputs().eval(), x)
    with pytest.raises(BackendError, match="single-output"):
        verify_per_op(converted, [x])
