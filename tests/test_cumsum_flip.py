"""``torch.cumsum`` and ``torch.flip`` as float islands in both backends (the fuzzer's ops with
no channel rule; before, a converted model holding them built in neither): TVM and onnxruntime
agree with the reference within the float islands' 1 LSB (flip alone: exactly), and arguments
the backends cannot honour are refused naming the node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from djpq_compiler.backends.common_ops import cumsum_dim, flip_dims
from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im
from djpq_compiler.testing.int_layers import int_layer


class Island(nn.Module):
    """A conv, then in float ``cumsum`` along the width and ``flip`` of channels and rows,
    quantized again; and ``flip`` alone (exact) as a second output."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.conv = int_layer("conv", 1, 7, 0.02, 0.05, out_bits=5, spread_codes=True, seed=5)
        self.deq = im.Dequantize(0.05)
        self.requant = im.Quantize(0.2, 8, False)
        self.requant_flip = im.Quantize(0.05, 8, False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.deq(self.conv(self.quant(x)))
        return (self.requant(torch.flip(torch.cumsum(y, 3), dims=[1, 2])),
                self.requant_flip(y.flip(-1)))


X = torch.rand(2, 1, 6, 9, generator=torch.Generator().manual_seed(0)) * 5


def _check(got: list[np.ndarray], want: tuple[torch.Tensor, ...]) -> None:
    summed, flipped = (np.asarray(g).astype(np.int64) for g in got)
    assert np.abs(summed - want[0].numpy()).max() <= 1
    assert (summed == want[0].numpy()).mean() > 0.97 and len(np.unique(summed)) > 5
    assert np.array_equal(flipped, want[1].numpy())


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_tvm_cumsum_and_flip(target: str) -> None:
    pytest.importorskip("tvm")
    from djpq_compiler.backends.tvm import build

    gm = im.trace_integer(Island().eval())
    got = build(gm, target, example_inputs=X)(X)
    _check([g.numpy() for g in got], gm(X))


def test_onnx_cumsum_and_flip(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export

    gm = im.trace_integer(Island().eval())
    path = export(gm, tmp_path / "island.onnx", (X,))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _check(session.run(None, {session.get_inputs()[0].name: X.numpy()}), gm(X))


def _node(fn: object, *args: object, **kwargs: object) -> fx.Node:
    graph = fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(fn, (x, *args), kwargs)  # type: ignore[arg-type]


#: (op, args, kwargs, what the plan says or the refusal it raises)
PLANS = [
    (torch.cumsum, (-1,), {}, 3),
    (torch.cumsum, (), {"dim": 1}, 1),
    (torch.cumsum, (4,), {}, "constant dim in \\[-4, 4\\)"),
    (torch.cumsum, (1,), {"dtype": torch.float64}, "dtype= or out="),
    (torch.flip, ([-1, 1],), {}, [1, 3]),
    (torch.flip, (), {"dims": (2,)}, [2]),
    (torch.flip, ([1, -3],), {}, "distinct constant dims"),
    (torch.flip, ([],), {}, "distinct constant dims"),
]


@pytest.mark.parametrize(("op", "args", "kwargs", "expected"), PLANS)
def test_argument_plans(op: object, args: tuple, kwargs: dict, expected: object) -> None:
    node = _node(op, *args, **kwargs)
    plan = cumsum_dim if op is torch.cumsum else flip_dims
    if isinstance(expected, str):
        with pytest.raises(BackendError, match=expected):
            plan(node, 4)
    else:
        assert plan(node, 4) == expected
