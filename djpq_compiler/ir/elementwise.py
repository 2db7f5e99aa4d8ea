"""Integer elementwise ops: add, concat, ReLU, ReLU6 (see ``docs/integer_semantics.md``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from djpq_compiler.errors import ConfigError, QuantizationError

from .fixedpoint import as_int_tensor, multiplier_bits, quantize_multiplier, requantize, rescale

__all__ = [
    "AddRescale",
    "add_rescale",
    "concat_rescales",
    "int_add",
    "int_concat",
    "int_relu",
    "int_relu6",
]


@dataclass(frozen=True)
class AddRescale:
    """Dyadic parameters of :func:`int_add` (build them with :func:`add_rescale`).

    Attributes:
        a_m: Multiplier of input ``a`` to the intermediate scale.
        a_shift: Shift of input ``a``.
        b_m: Multiplier of input ``b``.
        b_shift: Shift of input ``b``.
        out_m: Multiplier from the intermediate scale to the output scale.
        out_shift: Shift to the output scale.
        left_shift: Headroom bits ``L`` of the intermediate scale (informational).
    """

    a_m: int
    a_shift: int
    b_m: int
    b_shift: int
    out_m: int
    out_shift: int
    left_shift: int


def add_rescale(
    a_scale: float,
    b_scale: float,
    out_scale: float,
    *,
    input_bits: int = 16,
    left_shift: int = 20,
) -> AddRescale:
    """Compute the :class:`AddRescale` of ``out = a + b`` (TFLite-style headroom).

    The intermediate scale is ``s_i = 2 * max(s_a, s_b) / 2^left_shift``. Inputs are rescaled
    to ``s_i`` with 31-bit multipliers; the sum is rescaled to ``s_out`` with
    ``multiplier_bits(2^(input_bits + left_shift))`` bits, so no step can overflow int64 for
    inputs whose ``|q - z|`` is below ``2^input_bits``.

    Args:
        a_scale: Scale of input ``a``.
        b_scale: Scale of input ``b``.
        out_scale: Scale of the output.
        input_bits: Bound ``|q - z| < 2^input_bits`` on both inputs (16 covers every bit-width).
        left_shift: Headroom bits ``L`` (2..30); the intermediate rounding error is
            ``max(s_a, s_b) * 2^-L`` in real units.

    Raises:
        ConfigError: ``left_shift`` or ``input_bits`` out of range.
        QuantizationError: A scale is not positive and finite.
    """
    if not 2 <= left_shift <= 30 or not 1 <= input_bits <= 17:
        raise ConfigError(
            f"add_rescale needs left_shift in 2..30 and input_bits in 1..17, "
            f"got {left_shift}, {input_bits}"
        )
    for name, s in (("a_scale", a_scale), ("b_scale", b_scale), ("out_scale", out_scale)):
        if not math.isfinite(float(s)) or float(s) <= 0.0:
            raise QuantizationError(f"int_add: {name} must be finite and > 0, got {s!r}")
    inter = 2.0 * max(a_scale, b_scale) / 2.0**left_shift
    a_m, a_shift = quantize_multiplier(a_scale / inter)
    b_m, b_shift = quantize_multiplier(b_scale / inter)
    out_bits = multiplier_bits(2 ** (input_bits + left_shift))
    out_m, out_shift = quantize_multiplier(inter / out_scale, bits=out_bits)
    return AddRescale(a_m, a_shift, b_m, b_shift, out_m, out_shift, left_shift)


def int_add(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    params: AddRescale,
    a_zero_point: int,
    b_zero_point: int,
    out_zero_point: int,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Add two quantized tensors with different scales, integer-only (broadcasting).

    ``a_i = requantize(a_q - z_a, a_m, a_shift)``, ``b_i`` likewise (intermediate scale, no clip),
    ``out = requantize(a_i + b_i, out_m, out_shift, z_out, qmin, qmax)``; every ``requantize``
    rounds half up. Within one LSB of ``round((s_a (a - z_a) + s_b (b - z_b)) / s_out) + z_out``.

    Returns:
        An ``int64`` tensor in ``[qmin, qmax]``.
    """
    a = as_int_tensor(a_q, "a_q") - a_zero_point
    b = as_int_tensor(b_q, "b_q") - b_zero_point
    a_i = requantize(a, params.a_m, params.a_shift)
    b_i = requantize(b, params.b_m, params.b_shift)
    return requantize(a_i + b_i, params.out_m, params.out_shift, out_zero_point, qmin, qmax)


def concat_rescales(
    in_scales: Sequence[float], out_scale: float
) -> list[tuple[int, int] | None]:
    """Per-input ``(m, shift)`` for :func:`int_concat`; ``None`` where the scale already matches."""
    return [None if s == out_scale else quantize_multiplier(s / out_scale) for s in in_scales]


def int_concat(
    tensors: Sequence[torch.Tensor],
    rescales: Sequence[tuple[int, int] | None],
    in_zero_points: Sequence[int],
    out_zero_point: int,
    qmin: int,
    qmax: int,
    dim: int = 1,
) -> torch.Tensor:
    """Concatenate quantized tensors, moving each to the output scale/zero point first.

    Input ``k`` becomes ``rescale(q_k, m_k, shift_k, z_k, z_out, qmin, qmax)``; with
    ``rescales[k] is None`` (equal scales) that is ``clip(q_k - z_k + z_out)``, the identity when
    the zero points match too.

    Returns:
        An ``int64`` tensor.
    """
    if not (len(tensors) == len(rescales) == len(in_zero_points)) or not tensors:
        raise QuantizationError(
            "int_concat needs one rescale and one zero point per input tensor "
            f"(got {len(tensors)} tensors, {len(rescales)} rescales, "
            f"{len(in_zero_points)} zero points)"
        )
    parts = []
    for q, rs, z in zip(tensors, rescales, in_zero_points, strict=True):
        m, shift = (None, 0) if rs is None else rs
        parts.append(rescale(q, m, shift, z, out_zero_point, qmin, qmax))
    return torch.cat(parts, dim=dim)


def int_relu(x_q: torch.Tensor, zero_point: int, qmax: int | None = None) -> torch.Tensor:
    """ReLU in the quantized domain: ``clip(x_q, zero_point, qmax)`` (same scale in and out)."""
    return as_int_tensor(x_q, "x_q").clamp(min=zero_point, max=qmax)


def int_relu6(
    x_q: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int
) -> torch.Tensor:
    """ReLU6 in the quantized domain (same scale in and out).

    ``clip(x_q, max(z, qmin), min(round_half_even(6 / scale) + z, qmax))``.
    """
    if not float(scale) > 0.0:
        raise QuantizationError(f"int_relu6: scale must be > 0, got {scale!r}")
    upper = min(round(6.0 / float(scale)) + zero_point, qmax)
    return as_int_tensor(x_q, "x_q").clamp(min=max(zero_point, qmin), max=upper)
