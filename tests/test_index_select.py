"""``torch.index_select`` with a constant index in both backends: ``prune`` rewrites a channel
selection of a pruned concat (a split, a chunk, a slice) as ``index_select`` of the kept
positions, so a converted model may hold it on integer codes or (between Dequantize and Quantize)
on floats. TVM lowers it to ``take``, ONNX to ``Gather``; both equal the reference, and a
position out of range or a non-constant index is refused naming the node."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im
from djpq_compiler.testing.int_layers import int_layer


class Select(nn.Module):
    """A conv, then two selections of its channels by constant positions: one on the codes, one
    on the dequantized floats (what a float island reads)."""

    def __init__(self, positions: list[int], dim: int = 1) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.conv = int_layer("conv", 1, 11, 0.02, 0.05, out_bits=5, spread_codes=True, seed=3)
        self.deq = im.Dequantize(0.05)
        self.register_buffer("positions", torch.tensor(positions, dtype=torch.long))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.conv(self.quant(x))
        picked = torch.index_select(codes, self.dim, self.positions)
        return picked, torch.index_select(self.deq(codes), self.dim, self.positions)


X = torch.rand(3, 1, 7, 9, generator=torch.Generator().manual_seed(0)) * 5
#: Kept positions like prune writes them (increasing), plus a repeat and a reversal.
POSITIONS = [[0, 2, 3, 7, 10], [5], [10, 4, 4, 0]]


@pytest.mark.parametrize("positions", POSITIONS)
def test_tvm_index_select_equals_the_reference(positions: list[int]) -> None:
    pytest.importorskip("tvm")
    from djpq_compiler.backends.tvm import build

    gm = im.trace_integer(Select(positions).eval())
    want = gm(X)
    assert want[0].shape[1] == len(positions) and len(torch.unique(want[0])) > 2
    for target in ("x86", "x86-avx2"):
        got = build(gm, target, example_inputs=X)(X)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), target


@pytest.mark.parametrize("positions", POSITIONS)
def test_onnx_index_select_equals_the_reference(positions: list[int], tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export

    gm = im.trace_integer(Select(positions).eval())
    path = export(gm, tmp_path / "select.onnx", (X,))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    want = gm(X)
    assert np.array_equal(got[0].astype(np.int64), want[0].numpy())
    assert np.array_equal(got[1], want[1].numpy())


def test_positions_out_of_range_are_refused_naming_the_node() -> None:
    """(torch itself raises on such a model; the plan checks anyway, before any lowering.)"""
    from djpq_compiler.backends.common_ops import index_select_plan

    gm = im.trace_integer(Select([0, 3]).eval())
    node = next(n for n in gm.graph.nodes if n.target is torch.index_select)
    ctx = SimpleNamespace(gm=gm)
    assert index_select_plan(ctx, node, (3, 11, 7, 9))[0] == 1
    gm.positions.copy_(torch.tensor([0, 11]))
    with pytest.raises(BackendError, match=r"positions must be integers in \[0, 11\)"):
        index_select_plan(ctx, node, (3, 11, 7, 9))


def test_an_index_that_is_not_a_constant_is_refused() -> None:
    """The index must be a tensor attribute (what prune writes); anything else, here the
    model's input, is refused by the plan both backends share."""
    from djpq_compiler.backends.common_ops import index_select_plan

    gm = im.trace_integer(Select([0, 3]).eval())
    node = next(n for n in gm.graph.nodes if n.target is torch.index_select)
    node.args = (node.args[0], 1, next(n for n in gm.graph.nodes if n.op == "placeholder"))
    with pytest.raises(BackendError, match="index_select's index must be a tensor attribute"):
        index_select_plan(SimpleNamespace(gm=gm), node, (3, 11, 7, 9))
