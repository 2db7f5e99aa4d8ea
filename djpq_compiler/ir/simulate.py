"""Float simulations of the integer ops (fake-quant semantics), for equivalence tests.

Each function computes what the fake-quant prepared model computes: dequantize the integer
inputs, run the float op, quantize the result (round half to even). They run in float64 so that a
difference from the integer op is due to the integer arithmetic (dyadic multiplier, round half
up), which is bounded by one LSB, and not to float32 noise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .ops import ScaleLike, dequantize, quantize

__all__ = [
    "fake_quantize",
    "simulate_add",
    "simulate_avg_pool2d",
    "simulate_conv2d",
    "simulate_linear",
]

_F64 = torch.float64


def fake_quantize(
    x: torch.Tensor, scale: ScaleLike, zero_point: int, qmin: int, qmax: int, axis: int = 1
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: the value grid a fake quantizer snaps to."""
    q = quantize(x, scale, zero_point, qmin, qmax, axis)
    return dequantize(q, scale, zero_point, axis, dtype=x.dtype)


def _real_bias(
    bias_q: torch.Tensor | None, x_scale: float, w_scale: ScaleLike
) -> torch.Tensor | None:
    """Bias in real units, ``bias_q * s_x * s_w`` (float64), or ``None``."""
    if bias_q is None:
        return None
    return bias_q.to(_F64) * torch.as_tensor(w_scale, dtype=_F64) * x_scale


def simulate_conv2d(
    x_q: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w_q: torch.Tensor,
    w_scale: ScaleLike,
    bias_q: torch.Tensor | None,
    out_scale: float,
    out_zero_point: int,
    qmin: int,
    qmax: int,
    **conv_kwargs: Any,
) -> torch.Tensor:
    """``quantize(conv2d(dequant(x), dequant(w)) + bias_q * s_x * s_w, s_out, z_out)``.

    Args:
        x_q, x_scale, x_zero_point: Quantized input.
        w_q, w_scale: Quantized weight (scale per tensor or per output channel).
        bias_q: Integer bias at scale ``s_x * s_w``, or ``None``.
        out_scale, out_zero_point, qmin, qmax: Output quantization.
        **conv_kwargs: ``stride``, ``padding``, ``dilation``, ``groups`` of ``F.conv2d``.
    """
    x = dequantize(x_q, x_scale, x_zero_point, dtype=_F64)
    w = dequantize(w_q, w_scale, 0, axis=0, dtype=_F64)
    y = F.conv2d(x, w, _real_bias(bias_q, x_scale, w_scale), **conv_kwargs)
    return quantize(y, out_scale, out_zero_point, qmin, qmax)


def simulate_linear(
    x_q: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w_q: torch.Tensor,
    w_scale: ScaleLike,
    bias_q: torch.Tensor | None,
    out_scale: float,
    out_zero_point: int,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """``quantize(linear(dequant(x), dequant(w)) + bias_q * s_x * s_w, s_out, z_out)``."""
    x = dequantize(x_q, x_scale, x_zero_point, dtype=_F64)
    w = dequantize(w_q, w_scale, 0, axis=0, dtype=_F64)
    y = F.linear(x, w, _real_bias(bias_q, x_scale, w_scale))
    return quantize(y, out_scale, out_zero_point, qmin, qmax)


def simulate_add(
    a_q: torch.Tensor,
    a_scale: float,
    a_zero_point: int,
    b_q: torch.Tensor,
    b_scale: float,
    b_zero_point: int,
    out_scale: float,
    out_zero_point: int,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """``quantize(dequant(a) + dequant(b), s_out, z_out)``."""
    a = dequantize(a_q, a_scale, a_zero_point, dtype=_F64)
    b = dequantize(b_q, b_scale, b_zero_point, dtype=_F64)
    return quantize(a + b, out_scale, out_zero_point, qmin, qmax)


def simulate_avg_pool2d(
    x_q: torch.Tensor,
    scale: float,
    zero_point: int,
    qmin: int,
    qmax: int,
    **pool_kwargs: Any,
) -> torch.Tensor:
    """``quantize(avg_pool2d(dequant(x)), s, z)`` at the input's scale and zero point."""
    x = dequantize(x_q, scale, zero_point, dtype=_F64)
    return quantize(F.avg_pool2d(x, **pool_kwargs), scale, zero_point, qmin, qmax)
