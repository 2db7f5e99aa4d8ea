"""ONNX export of ``IntMul`` (the squeeze-excite product of two code tensors) is bit-exact.

Products of integer codes rescaled by a dyadic multiplier often land exactly on ``k + 1/2``:
the reference rounds them half up (``(p * m + 2^(shift-1)) >> shift``), onnxruntime's
``QuantizeLinear`` half to even, so a float ``DQ * DQ -> Q`` export flipped such codes. The
export now computes the reference's integer arithmetic with ONNX integer ops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from djpq_compiler.ir import modules as im

pytest.importorskip("onnxruntime")
from djpq_compiler.backends.onnx import export  # noqa: E402


class Product(nn.Module):
    """Quantize two inputs, multiply their codes, return the codes (and a float copy)."""

    def __init__(self, scales: tuple[float, float, float], bits: tuple[int, int, int],
                 signed: tuple[bool, bool, bool]) -> None:
        super().__init__()
        self.qa = im.Quantize(scales[0], bits[0], signed[0])
        self.qb = im.Quantize(scales[1], bits[1], signed[1])
        self.mul = im.IntMul(scales, bits[2], signed[2])
        self.dq = im.Dequantize(scales[2])

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.mul(self.qa(a), self.qb(b))
        return codes, self.dq(codes)


def _run(path: Path, *inputs: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


CASES = {
    # out scale 2: every odd product of codes is a tie k + 1/2 (also negative ones)
    "ties_signed": ((1.0, 1.0, 2.0), (6, 6, 8), (True, True, True)),
    # SE-like: unsigned activations times an unsigned gate, to a coarser unsigned grid
    "se_unsigned": ((0.05, 1 / 255, 0.1), (8, 8, 8), (False, False, False)),
    # a non-power-of-two multiplier with a large shift, into a narrow 4-bit signed range
    "odd_multiplier": ((0.037, 0.011, 0.0023), (8, 7, 4), (True, True, True)),
    # 16-bit codes: the int64 product path with a wide bound
    "wide": ((0.001, 0.002, 0.0005), (16, 12, 16), (True, False, True)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_int_mul_onnx_bit_exact(name: str, tmp_path: Path) -> None:
    scales, bits, signed = CASES[name]
    gm = im.trace_integer(Product(scales, bits, signed))
    gen = torch.Generator().manual_seed(0)
    qa, qb = gm.qa, gm.qb
    a = torch.randint(qa.qmin, qa.qmax + 1, (4, 8, 16, 16), generator=gen) * scales[0]
    b = torch.randint(qb.qmin, qb.qmax + 1, (4, 8, 1, 1), generator=gen) * scales[1]
    a, b = a.float(), b.float()
    path = export(gm, tmp_path / f"{name}.onnx", (a, b))
    got_codes, got_real = _run(path, a, b)
    want_codes, want_real = gm(a, b)
    assert np.array_equal(got_codes.astype(np.int64), want_codes.numpy()), name
    assert np.array_equal(got_real, want_real.numpy()), name
    if name == "ties_signed":  # the case a half-to-even QuantizeLinear got wrong
        product = gm.qa(a) * gm.qb(b)
        ties = product % 2 == 1
        assert bool(ties.any()) and bool((product[ties] < 0).any())

