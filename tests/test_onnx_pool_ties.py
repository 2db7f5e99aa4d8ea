"""Integer average pools in ONNX round exactly as the reference, rounding ties included.

The reference rounds a window mean ``S / c`` half up (``div_half_up``), and a pool fused with
its requantization (``IntPoolRequantize``) by ``(S m + 2^(s-1)) >> s`` per output position. A
float ``DQ -> AveragePool -> Q`` rounds ``k + 1/2`` half to even: one LSB off on every tie.
``backends/onnx/pool_ops.py`` sums the codes exactly and rounds in int64; these inputs are
random codes, where ties (``S = c k + c / 2``) are frequent, and signed codes (negative ties).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from djpq_compiler.ir import modules as im
from djpq_compiler.ir.pooling import adaptive_pool_sums, avg_pool_sums

pytest.importorskip("onnxruntime")
from djpq_compiler.backends.onnx import export  # noqa: E402


class Pool(nn.Module):
    """Codes of ``x`` (``bits``, ``signed``) through ``pool``; returns the codes and their
    dequantized values."""

    def __init__(self, pool: nn.Module, bits: int, signed: bool, out_scale: float = 1.0) -> None:
        super().__init__()
        self.q, self.pool, self.dq = im.Quantize(1.0, bits, signed), pool, im.Dequantize(out_scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.pool(self.q(x))
        return codes, self.dq(codes)


def _codes_input(bits: int, signed: bool, shape: tuple[int, ...] = (2, 3, 8, 8)) -> torch.Tensor:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(lo, hi + 1, shape, generator=gen).float()  # scale 1: x are the codes


def _onnx_codes(gm: torch.fx.GraphModule, x: torch.Tensor, path: Path) -> np.ndarray:
    import onnxruntime as ort

    export(gm, path, (x,))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    codes, _ = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return codes.astype(np.int64)


def _pool(kind: str) -> nn.Module:
    if kind == "2x2":
        return im.IntAvgPool2d((2, 2), (2, 2), (0, 0), False, True, None)
    if kind == "3x3_uncounted_ceil":
        return im.IntAvgPool2d((3, 3), (2, 2), (1, 1), True, False, None)
    if kind == "adaptive_3x3":
        return im.IntAdaptiveAvgPool2d((3, 3))
    return im.IntAdaptiveAvgPool2d(1)


def _ties(pool: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """Where the exact mean is ``k + 1/2``."""
    if isinstance(pool, im.IntAvgPool2d):
        sums, counts = avg_pool_sums(codes, pool.kernel_size, pool.stride, pool.padding,
                                     pool.ceil_mode, pool.count_include_pad)
    else:
        sums, counts = adaptive_pool_sums(codes, pool.output_size)
    return (2 * sums + counts) % (2 * counts) == 0


CASES = [(kind, bits, signed) for kind in ("2x2", "3x3_uncounted_ceil", "adaptive_3x3", "global")
         for bits, signed in ((4, False), (6, True))]


@pytest.mark.parametrize(("kind", "bits", "signed"), CASES,
                         ids=[f"{k}-{b}{'s' if s else 'u'}" for k, b, s in CASES])
def test_avg_pool_ties_exact(kind: str, bits: int, signed: bool, tmp_path: Path) -> None:
    model = Pool(_pool(kind), bits, signed)
    gm = im.trace_integer(model)
    x = _codes_input(bits, signed, (2, 3, 8, 8) if kind != "global" else (64, 3, 2, 2))
    ties = _ties(model.pool, model.q(x))
    assert bool(ties.any())  # the case half-to-even rounding gets wrong
    want, _ = gm(x)
    got = _onnx_codes(gm, x, tmp_path / "pool.onnx")
    assert np.array_equal(got, want.numpy())


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("pool", ["uneven", "even"])
def test_pool_requantize_ties_exact(pool: str, signed: bool, tmp_path: Path) -> None:
    """``IntPoolRequantize`` at ``in_scale / out_scale = c / 2`` for a 2x2 pool: every odd
    window sum is a tie of the dyadic rounding; uneven windows (uncounted padding) mix
    divisors 1, 2 and 4."""
    if pool == "even":
        inner = im.IntAvgPool2d((2, 2), (2, 2), (0, 0), False, True, None)
    else:
        inner = im.IntAvgPool2d((2, 2), (2, 2), (1, 1), False, False, None)
    fused = im.IntPoolRequantize(inner, (8, 8), 1.0, 4, signed, 0.5, 8, True)
    gm = im.trace_integer(Pool(fused, 4, signed, out_scale=0.5))
    x = _codes_input(4, signed)
    want, _ = gm(x)
    got = _onnx_codes(gm, x, tmp_path / "fused.onnx")
    assert np.array_equal(got, want.numpy())


class _UpsamplingAdaptivePool(nn.Module):
    """AlexNet at a small input: a 1x1 map pooled adaptively to 3x3 (overlapping, unequal bins
    from a 2x2 map too), which ``convert`` leaves as a float op."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 4, 3, stride=2), nn.AdaptiveAvgPool2d((3, 3))
        self.side = side
        self.head = nn.Linear(4 * 9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("size", [8, 12])
def test_float_adaptive_pool_with_unequal_bins_exports(size: int, tmp_path: Path) -> None:
    import djpq_compiler as djpq
    from djpq_compiler.backends.onnx import verify

    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    converted = djpq.convert(djpq.prepare(_UpsamplingAdaptivePool(size).eval(), x).eval())
    report = verify(converted, export(converted, tmp_path / "m.onnx", (x,)), (x,))
    assert report["max_lsb_per_op"] <= 1


class _SumPoolRequantize(nn.Module):
    """convert's window-sum pool (``divisor_override``) and the ``Requantize`` after it."""

    def __init__(self, divisor: int, out_scale: float) -> None:
        super().__init__()
        self.q = im.Quantize(1.0, 4, True)
        self.pool = im.IntAvgPool2d((4, 4), (4, 4), (0, 0), False, True, divisor)
        self.rq = im.Requantize(1.0, out_scale, 8, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rq(self.pool(self.q(x)))


@pytest.mark.parametrize(("divisor", "out_scale"), [(1, 8.0), (3, 2.0), (16, 0.25)])
def test_sum_pool_requantize_ties_exact(divisor: int, out_scale: float, tmp_path: Path) -> None:
    """Window sums rescaled by a power of two land on ties often (the case
    ``efficientnet_b0``'s squeeze-excite pools flipped in ~17 % of codes)."""
    import onnxruntime as ort

    gm = im.trace_integer(_SumPoolRequantize(divisor, out_scale))
    x = _codes_input(4, True)
    export(gm, tmp_path / "sum.onnx", (x,))
    session = ort.InferenceSession(str(tmp_path / "sum.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.array_equal(got.astype(np.int64), gm(x).numpy())
