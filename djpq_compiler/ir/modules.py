"""Integer modules: the op set of a converted model (``convert(prepared, integer=True)``).

Each module computes exactly what ``docs/integer_semantics.md`` defines, on ``int64`` tensors that
hold integer codes (the container dtype a backend uses — int8, uint8, int16 — follows ``bits``
and ``signed``). All activation zero points are 0: DJPQ's DQ quantizers are symmetric (signed) or
start at zero (unsigned), so every activation range is ``qrange(bits, signed)``.

A backend lowers a converted graph node by node, keyed by these classes (plus shape ops such as
``flatten``/``view`` and the float ops of non-integer islands, which always sit between a
:class:`Dequantize` and a :class:`Quantize`). Attributes are plain Python numbers or buffers so
that backends and the ONNX exporter can read them directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from djpq_compiler.errors import QuantizationError
from djpq_compiler.records import ConvertedRecord, store

from .elementwise import AddRescale, int_add, int_concat
from .fixedpoint import (
    dyadic_round,
    multiplier_bits,
    qrange,
    quantize_multiplier,
    quantize_multipliers,
    requantize,
)
from .lookup import IntLUT
from .ops import add_bias, dequantize, int_conv2d, int_linear, quantize
from .pooling import (
    adaptive_pool_sums,
    avg_pool_sums,
    int_adaptive_avg_pool2d,
    int_avg_pool2d,
    int_max_pool2d,
)

__all__ = [
    "Quantize",
    "Dequantize",
    "IntConv2d",
    "IntLinear",
    "IntAdd",
    "IntMul",
    "IntConcat",
    "IntClip",
    "Requantize",
    "IntMaxPool2d",
    "IntAvgPool2d",
    "IntAdaptiveAvgPool2d",
    "IntPoolRequantize",
    "IntLUT",
    "INTEGER_MODULES",
    "IntegerTracer",
    "trace_integer",
]


class Quantize(nn.Module):
    """Float -> integer codes: ``clamp(round_half_even(x / scale), qmin, qmax)``."""

    def __init__(self, scale: float, bits: int, signed: bool) -> None:
        super().__init__()
        self.scale, self.bits, self.signed = float(scale), int(bits), bool(signed)
        self.qmin, self.qmax = qrange(self.bits, self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.scale, 0, self.qmin, self.qmax).to(torch.int64)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, bits={self.bits}, signed={self.signed}"


class Dequantize(nn.Module):
    """Integer codes -> float: ``q * scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize(q, self.scale, 0, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"


class _IntLayer(nn.Module):
    weight: torch.Tensor
    bias: torch.Tensor
    w_scale: torch.Tensor
    m: torch.Tensor
    shift: torch.Tensor
    out_bias: torch.Tensor

    """Shared state of integer conv/linear: int weights, int bias, per-channel requantization.

    The accumulator is ``acc * 2^acc_shift + bias``: with ``acc_shift = k > 0`` the bias is at the
    finer scale ``in_scale * w_scale / 2^k`` and ``m / 2^shift`` realizes
    ``in_scale * w_scale / (2^k * out_scale)``. ``convert`` picks ``k > 0`` only where rounding
    the bias to ``in_scale * w_scale`` would cost an output LSB (coarse inputs and weights into a
    fine output grid); every backend computes the same integers.

    ``out_scale is None`` means the layer ends a float island boundary: it returns the real value
    ``acc * in_scale * w_scale[c] + out_bias[c]`` as float32 instead of requantized codes (the
    bias then stays float: ``bias`` is zero and ``out_bias`` holds it, so no int32 bound applies).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, w_scale: torch.Tensor,
                 in_scale: float, w_bits: int, out_scale: float | None, out_bits: int,
                 out_signed: bool, clip: tuple[int, int] | None, m: torch.Tensor,
                 shift: torch.Tensor, out_bias: torch.Tensor | None = None,
                 acc_shift: int = 0) -> None:
        super().__init__()
        if not 0 <= int(acc_shift) <= 30:
            raise QuantizationError(f"acc_shift must be in [0, 30], got {acc_shift}")
        self.acc_shift = int(acc_shift)
        zeros = torch.zeros(weight.shape[0], dtype=torch.float64)
        self.register_buffer("out_bias", zeros if out_bias is None else out_bias.to(torch.float64))
        self.register_buffer("weight", weight.to(torch.int64))
        self.register_buffer("bias", bias.to(torch.int64))
        self.register_buffer("w_scale", w_scale.to(torch.float64))
        self.register_buffer("m", m.to(torch.int64))
        self.register_buffer("shift", shift.to(torch.int64))
        self.in_scale, self.w_bits = float(in_scale), int(w_bits)
        self.out_scale = None if out_scale is None else float(out_scale)
        self.out_bits, self.out_signed = int(out_bits), bool(out_signed)
        if self.out_scale is None:  # float output: no integer range
            self.qmin, self.qmax = 0, 0
        else:
            self.qmin, self.qmax = clip if clip is not None else qrange(self.out_bits,
                                                                       self.out_signed)

    def _add_bias(self, acc: torch.Tensor) -> torch.Tensor:
        """``acc * 2^acc_shift + bias`` from the int64 accumulator without bias."""
        k = getattr(self, "acc_shift", 0)  # artifacts saved before acc_shift existed: 0
        acc = acc * (1 << k) if k else acc
        return add_bias(acc, self.bias, self.bias.numel())

    def _finish(self, acc: torch.Tensor) -> torch.Tensor:
        if self.out_scale is None:
            shape = [1] * acc.ndim
            shape[1] = -1
            scale = self.w_scale * self.in_scale
            real = acc.to(torch.float64) * scale.view(shape)
            return (real + self.out_bias.view(shape)).to(torch.float32)
        return requantize(acc, self.m, self.shift, 0, self.qmin, self.qmax)


class IntConv2d(_IntLayer):
    """``requantize(sum x_q * w_q + bias) `` with per-output-channel multipliers (BN, gate and the
    weight scale folded in); ``clip`` fuses a following ReLU/ReLU6."""

    def __init__(self, *, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.stride: tuple[int, int] = (int(stride[0]), int(stride[-1]))
        self.padding: tuple[int, int] = (int(padding[0]), int(padding[-1]))
        self.dilation: tuple[int, int] = (int(dilation[0]), int(dilation[-1]))
        self.groups = int(groups)

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        acc = int_conv2d(x_q, self.weight, None, stride=self.stride, padding=self.padding,
                         dilation=self.dilation, groups=self.groups)
        return self._finish(self._add_bias(acc))


class IntLinear(_IntLayer):
    """Integer linear on ``(..., in_features)`` inputs, e.g. ``(N, C)`` or tokens ``(N, T, C)``.

    The output channels are the last dim; every leading position (batch, token, ...) is one
    row of a 2-D ``(rows, in_features)`` layer, so the bias, the per-channel requantization and
    the float finish apply along the last dim whatever the rank (``channel_view`` and
    ``add_bias`` broadcast along dim 1, which is the last dim only for 2-D)."""

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        if x_q.ndim == 0 or x_q.shape[-1] != self.weight.shape[1]:
            raise QuantizationError(
                f"IntLinear: input of shape {tuple(x_q.shape)} does not end in "
                f"in_features={self.weight.shape[1]}; feed it (..., in_features) codes")
        lead = tuple(x_q.shape[:-1])
        rows = x_q.reshape(-1, x_q.shape[-1])
        out = self._finish(self._add_bias(int_linear(rows, self.weight, None)))
        return out.reshape(lead + (self.weight.shape[0],))


class IntAdd(nn.Module):
    """``a + b`` of two integer tensors at different scales, rescaled to the output scale."""

    def __init__(self, params: AddRescale, scales: tuple[float, float, float], bits: int,
                 signed: bool, clip: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.params = params
        self.a_scale, self.b_scale, self.out_scale = (float(s) for s in scales)
        self.bits, self.signed = int(bits), bool(signed)
        self.qmin, self.qmax = clip if clip is not None else qrange(self.bits, self.signed)

    def forward(self, a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
        return int_add(a_q, b_q, self.params, 0, 0, 0, self.qmin, self.qmax)


class IntMul(nn.Module):
    """``a * b`` of two integer tensors (broadcasting): the exact int64 product of the codes,
    requantized from scale ``s_a * s_b`` to ``s_out`` by one dyadic multiplier, then clipped
    (e.g. the squeeze-excite ``x * gate``)."""

    def __init__(self, scales: tuple[float, float, float], bits: int, signed: bool) -> None:
        super().__init__()
        self.a_scale, self.b_scale, self.out_scale = (float(s) for s in scales)
        self.bits, self.signed = int(bits), bool(signed)
        self.m, self.shift = quantize_multiplier(self.a_scale * self.b_scale / self.out_scale)
        self.qmin, self.qmax = qrange(self.bits, self.signed)

    def forward(self, a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
        product = a_q.to(torch.int64) * b_q.to(torch.int64)
        return requantize(product, self.m, self.shift, 0, self.qmin, self.qmax)


class IntConcat(nn.Module):
    """Concatenation with each input rescaled to the output scale (identity when equal)."""

    def __init__(self, rescales: Sequence[tuple[int, int] | None], in_scales: Sequence[float],
                 out_scale: float, bits: int, signed: bool, dim: int) -> None:
        super().__init__()
        self.rescales = list(rescales)
        self.in_scales, self.out_scale = [float(s) for s in in_scales], float(out_scale)
        self.bits, self.signed, self.dim = int(bits), bool(signed), int(dim)
        self.qmin, self.qmax = qrange(self.bits, self.signed)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return int_concat(list(xs), self.rescales, [0] * len(xs), 0, self.qmin, self.qmax,
                          dim=self.dim)


class Requantize(nn.Module):
    """Codes at ``in_scale`` -> codes at ``out_scale`` (dyadic multiplier, clip to the range)."""

    def __init__(self, in_scale: float, out_scale: float, bits: int, signed: bool,
                 clip: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.in_scale, self.out_scale = float(in_scale), float(out_scale)
        self.bits, self.signed = int(bits), bool(signed)
        self.m, self.shift = quantize_multiplier(self.in_scale / self.out_scale)
        self.qmin, self.qmax = clip if clip is not None else qrange(self.bits, self.signed)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return requantize(q, self.m, self.shift, 0, self.qmin, self.qmax)


class IntClip(nn.Module):
    """ReLU / ReLU6 on codes: ``clamp(q, lo, hi)``."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = int(lo), int(hi)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.clamp(self.lo, self.hi)


class IntMaxPool2d(nn.Module):
    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], ceil_mode: bool) -> None:
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation, self.ceil_mode = tuple(padding), tuple(dilation), ceil_mode

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return int_max_pool2d(q, self.kernel_size, self.stride, self.padding, self.dilation,
                              self.ceil_mode)


class IntAvgPool2d(nn.Module):
    """Average pooling at the input's scale (window sum, divide with round-half-up)."""

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], ceil_mode: bool, count_include_pad: bool,
                 divisor_override: int | None) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = (tuple(kernel_size), tuple(stride),
                                                       tuple(padding))
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override = divisor_override

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return int_avg_pool2d(q, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                              self.count_include_pad, self.divisor_override)


class IntAdaptiveAvgPool2d(nn.Module):
    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return int_adaptive_avg_pool2d(q, self.output_size)


class IntPoolRequantize(nn.Module):
    """An average pool whose windows hold different numbers of inputs, fused with the
    requantization after it, so that it rounds once.

    ``out_p = clip(requantize(S_p, m_p, shift_p))`` for every output position ``p``: ``S_p`` the
    exact window sum of the input codes, ``m_p / 2^shift_p ~ in_scale / (c_p * out_scale)`` with
    ``c_p`` torch's divisor of that window (``avg_pool2d``'s ``ceil_mode``/``count_include_pad``
    rules, or the size of an adaptive bin). Pooling at the input's scale and requantizing after
    would round twice, up to ``in_scale / (2 out_scale)`` output LSB off.
    """

    m: torch.Tensor
    shift: torch.Tensor
    counts: torch.Tensor

    def __init__(self, pool: IntAvgPool2d | IntAdaptiveAvgPool2d, in_hw: Sequence[int],
                 in_scale: float, in_bits: int, in_signed: bool, out_scale: float, bits: int,
                 signed: bool) -> None:
        super().__init__()
        if isinstance(pool, IntAvgPool2d) and pool.divisor_override is not None:
            raise QuantizationError("IntPoolRequantize: a divisor_override pool has one divisor "
                                    "everywhere; use its window sum and one Requantize")
        self.pool = pool
        probe = torch.zeros((1, 1, int(in_hw[0]), int(in_hw[1])), dtype=torch.int64)
        _, counts = self._sums(probe)
        self.register_buffer("counts", counts)
        self.in_scale, self.out_scale = float(in_scale), float(out_scale)
        self.out_bits, self.out_signed = int(bits), bool(signed)
        self.qmin, self.qmax = qrange(self.out_bits, self.out_signed)
        lo, hi = qrange(int(in_bits), bool(in_signed))
        bound = int(counts.max()) * max(abs(lo), abs(hi))
        reals = self.in_scale / (counts.to(torch.float64) * self.out_scale)
        m, shift = quantize_multipliers(reals.flatten(), bits=multiplier_bits(bound))
        self.register_buffer("m", m.view(counts.shape))
        self.register_buffer("shift", shift.view(counts.shape))

    def _sums(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pool
        if isinstance(p, IntAvgPool2d):
            return avg_pool_sums(q, p.kernel_size, p.stride, p.padding, p.ceil_mode,
                                 p.count_include_pad)
        return adaptive_pool_sums(q, p.output_size)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        sums, _ = self._sums(q)
        return dyadic_round(sums, self.m, self.shift).clamp(self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return (f"in_scale={self.in_scale:.6g}, out_scale={self.out_scale:.6g}, "
                f"bits={self.out_bits}, signed={self.out_signed}")


INTEGER_MODULES: tuple[type[nn.Module], ...] = (
    Quantize, Dequantize, IntConv2d, IntLinear, IntAdd, IntMul, IntConcat, IntClip, Requantize,
    IntMaxPool2d,
    IntAvgPool2d, IntAdaptiveAvgPool2d, IntPoolRequantize, IntLUT,
)


class IntegerTracer(torch.fx.Tracer):
    """FX tracer that keeps every integer module as one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, INTEGER_MODULES) or super().is_leaf_module(m, module_qualified_name)


def trace_integer(root: nn.Module) -> torch.fx.GraphModule:
    """Trace a hand-built integer model into the graph form ``convert`` produces."""
    graph = IntegerTracer().trace(root)
    gm = torch.fx.GraphModule(root, graph, type(root).__name__)
    store(gm, ConvertedRecord(integer=True))
    return gm
