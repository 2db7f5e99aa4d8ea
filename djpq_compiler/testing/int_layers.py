"""Random integer conv/linear layers, as ``convert()`` emits them, for backend tests.

One parameterized builder, :func:`int_layer`, shared by the TVM backend, kernel and layout tests
(and usable by any backend's): an :class:`~djpq_compiler.ir.modules.IntConv2d` or
:class:`~djpq_compiler.ir.modules.IntLinear` of a pruned layer -- any channel counts (odd ones,
a single channel), random weights of both signs at ``w_bits``, per-output-channel weight scales,
an int32 bias and the dyadic requantization ``(m, shift)`` that ``convert`` would compute for the
given scales and bit-widths (or a float output with ``out_scale=None``).

Everything is drawn from one seeded ``torch.Generator`` in a fixed order (weights, weight
scales, bias), so a ``(arguments, seed)`` pair always builds the same layer.

Example::

    from djpq_compiler.ir import modules as im
    from djpq_compiler.testing.int_layers import int_layer

    net = torch.nn.Sequential(im.Quantize(0.02, 8, False),
                              int_layer("conv", 3, 13, 0.02, 0.05, seed=1),
                              int_layer("conv", 13, 13, 0.05, 0.05, groups=13, seed=2))
    gm = im.trace_integer(net.eval())
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from djpq_compiler.errors import DjpqError
from djpq_compiler.ir import accumulator_bound, qrange, requant_params
from djpq_compiler.ir import modules as im

__all__ = ["int_layer"]


def int_layer(kind: str, c_in: int, c_out: int, in_scale: float,
              out_scale: float | None = 0.05, *, x_bits: int = 8, w_bits: int = 4,
              out_bits: int = 8, out_signed: bool = False, groups: int = 1, k: int = 3,
              stride: int = 1, padding: int | None = None, bias_bound: int = 500,
              spread_codes: bool = False, seed: int = 0) -> nn.Module:
    """An integer conv or linear layer with random weights, per-channel scales and bias.

    Args:
        kind: ``"conv"`` (``IntConv2d``, OIHW weights ``(c_out, c_in // groups, k, k)``) or
            ``"linear"`` (``IntLinear``, weights ``(c_out, c_in)``).
        c_in: Input channels / features.
        c_out: Output channels / features.
        in_scale: Scale of the input codes.
        out_scale: Scale of the output codes; ``None`` makes a float-output layer (the
            accumulator times ``in_scale * w_scale``).
        x_bits: Bit-width of the input codes (bounds the accumulator, hence the multiplier).
        w_bits: Bit-width of the signed weights, drawn uniformly from its whole range.
        out_bits: Bit-width of the output codes.
        out_signed: Signed output codes.
        groups: Conv groups (``c_in`` for a depthwise conv).
        k: Square conv kernel size.
        stride: Conv stride (both dims).
        padding: Conv zero padding (both dims); ``None``: ``k // 2`` ("same" at stride 1).
        bias_bound: The int bias is drawn from ``[-bias_bound, bias_bound]``.
        spread_codes: Scale ``out_scale`` by ``0.03 * 4 * sqrt(fan_in) / 3``, the typical size
            of a random accumulator here, so the output codes spread over the range like the
            input codes instead of clipping (chains of many layers stay informative).
        seed: Seed of the generator every random value comes from.

    Returns:
        The ``IntConv2d`` / ``IntLinear`` module.

    Raises:
        DjpqError: An unknown ``kind`` or channels not divisible by ``groups``.
    """
    if kind not in ("conv", "linear"):
        raise DjpqError(f"int_layer: kind must be 'conv' or 'linear', got {kind!r}")
    if c_in % groups or c_out % groups:
        raise DjpqError(f"int_layer: {c_in} -> {c_out} channels are not divisible by "
                        f"groups={groups}")
    gen = torch.Generator().manual_seed(seed)
    wmin, wmax = qrange(w_bits, True)
    shape = (c_out, c_in // groups, k, k) if kind == "conv" else (c_out, c_in)
    weight = torch.randint(wmin, wmax + 1, shape, generator=gen)
    w_scale = 0.01 + 0.04 * torch.rand(c_out, generator=gen, dtype=torch.float64)
    bias = torch.randint(-bias_bound, bias_bound + 1, (c_out,), generator=gen)
    bound = accumulator_bound(weight[0].numel(), x_bits, w_bits, bias_bound=bias_bound)
    if spread_codes and out_scale is not None:
        out_scale *= 0.03 * 4 * weight[0].numel() ** 0.5 / 3
    m, shift = requant_params(in_scale, w_scale, out_scale or 1.0, bound)
    common: dict[str, Any] = dict(weight=weight, bias=bias, w_scale=w_scale, in_scale=in_scale,
                                  w_bits=w_bits,
                                  out_scale=out_scale, out_bits=out_bits,
                                  out_signed=out_signed, clip=None, m=m, shift=shift)
    if kind == "linear":
        return im.IntLinear(**common)
    pad = k // 2 if padding is None else padding
    return im.IntConv2d(stride=(stride, stride), padding=(pad, pad), dilation=(1, 1),
                        groups=groups, **common)
