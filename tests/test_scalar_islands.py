"""``torch.rsub``, ``torch.clamp`` with number operands and ``add``/``sub`` with ``alpha`` as
float islands in both backends (the fuzzer's scalar blocks; before, a converted model holding
them built in neither). rsub and clamp are exact in float32: TVM and onnxruntime equal the
reference bit for bit, ``min > max`` included (PyTorch answers ``max`` there); ``a + alpha * b``
rounds the product first, which PyTorch may fuse: within the islands' 1 LSB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from djpq_compiler.backends.common_ops import clamp_bounds, rsub_operand
from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im
from djpq_compiler.testing.int_layers import int_layer
from tests.test_cumsum_flip import _node


class Islands(nn.Module):
    """A conv, then in float: ``rsub``; ``clamp`` with both bounds, with ``max`` only, with
    ``min > max``; ``add`` and ``sub`` with ``alpha``; each quantized again (signed)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.conv = int_layer("conv", 1, 6, 0.02, 0.05, out_bits=5, spread_codes=True, seed=7)
        self.deq = im.Dequantize(0.05)
        self.out = nn.ModuleList(im.Quantize(0.01, 8, True) for _ in range(6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.deq(self.conv(self.quant(x)))
        r = torch.rsub(y, 0.75)
        return (self.out[0](r), self.out[1](torch.clamp(r, min=-0.5, max=0.4)),
                self.out[2](r.clamp(max=-0.1)), self.out[3](torch.clamp(r, 0.3, -0.2)),
                self.out[4](y.add(r, alpha=-0.5)), self.out[5](torch.sub(r, y, alpha=2)))


X = torch.rand(2, 1, 6, 7, generator=torch.Generator().manual_seed(1)) * 5


def _want() -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    gm = im.trace_integer(Islands().eval())
    want = gm(X)
    assert len(torch.unique(want[0])) > 5 and len(torch.unique(want[1])) > 3
    assert torch.all(want[3] == want[3].flatten()[0])  # min > max: every value is max
    return gm, want


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_tvm_rsub_and_clamp_bit_exact(target: str) -> None:
    pytest.importorskip("tvm")
    from djpq_compiler.backends.tvm import build

    gm, want = _want()
    got = build(gm, target, example_inputs=X)(X)
    assert all(torch.equal(g, w) for g, w in zip(got[:4], want[:4], strict=True))
    assert all(int((g - w).abs().max()) <= 1 for g, w in zip(got[4:], want[4:], strict=True))


def test_onnx_rsub_and_clamp_bit_exact(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export

    gm, want = _want()
    path = export(gm, tmp_path / "islands.onnx", (X,))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    assert all(np.array_equal(g.astype(np.int64), w.numpy())
               for g, w in zip(got[:4], want[:4], strict=True))
    assert all(np.abs(g.astype(np.int64) - w.numpy()).max() <= 1
               for g, w in zip(got[4:], want[4:], strict=True))


def test_bad_arguments_are_refused_naming_the_node() -> None:
    with pytest.raises(BackendError, match="clamp needs min or max"):
        clamp_bounds(_node(torch.clamp), lambda b: b)
    with pytest.raises(BackendError, match="clamp bounds must be numbers"):
        clamp_bounds(_node(torch.clamp, min=True), lambda b: b)
    assert clamp_bounds(_node(torch.clamp, None, 2), lambda b: b) == (None, 2)
    with pytest.raises(BackendError, match="rsub with alpha"):
        rsub_operand(_node(torch.rsub, 1.0, alpha=2))
    assert rsub_operand(_node(torch.rsub, other=3.0)) == 3.0
