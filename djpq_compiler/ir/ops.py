"""Integer reference ops: the one definition of the converted model's integer arithmetic.

Every integer op of a converted model is defined here, in pure PyTorch on ``int64`` containers.
The TVM backend must reproduce these functions bit for bit and onnxruntime to within one LSB;
``docs/integer_semantics.md`` states the same definitions in prose and formulas.

This module is the public facade: it defines quantize/dequantize and the accumulating ops
(conv, linear) and re-exports the fixed-point primitives, the elementwise ops and the pooling ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from djpq_compiler.errors import QuantizationError

from .elementwise import (
    AddRescale,
    add_rescale,
    concat_rescales,
    int_add,
    int_concat,
    int_relu,
    int_relu6,
)
from .fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    MAX_SHIFT,
    abs_max,
    as_int_tensor,
    multiplier_bits,
    qrange,
    quantize_multiplier,
    quantize_multipliers,
    requantize,
    rescale,
)
from .pooling import div_half_up, int_adaptive_avg_pool2d, int_avg_pool2d, int_max_pool2d

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "MAX_SHIFT",
    "FLOAT64_EXACT",
    "AddRescale",
    "accumulator_bound",
    "accumulator_dtype",
    "add_bias",
    "add_rescale",
    "concat_rescales",
    "dequantize",
    "div_half_up",
    "int_adaptive_avg_pool2d",
    "int_add",
    "int_avg_pool2d",
    "int_concat",
    "int_conv2d",
    "int_linear",
    "int_max_pool2d",
    "int_relu",
    "int_relu6",
    "multiplier_bits",
    "qrange",
    "quantize",
    "quantize_bias",
    "quantize_multiplier",
    "quantize_multipliers",
    "requant_params",
    "requantize",
    "rescale",
]

#: Integers of magnitude below this are exact in float64; the accumulating ops check against it.
FLOAT64_EXACT = 2**53
#: Integers of magnitude up to this are exact in float32: on CPU, an accumulation whose every
#: partial sum stays within it (``fan_in * max|x| * max|w| <= 2^24``) is computed in float32,
#: which is exact whatever the summation order and several times faster than float64.
FLOAT32_EXACT = 2**24

ScaleLike = float | torch.Tensor
IntPair = int | tuple[int, int]


def _channel_scale(scale: ScaleLike, ndim: int, axis: int, dtype: torch.dtype) -> torch.Tensor:
    """Return a scale as a tensor broadcastable along ``axis``, rejecting non-positive values."""
    s = torch.as_tensor(scale, dtype=dtype)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise QuantizationError(f"scale must be finite and > 0, got {scale!r}")
    if s.ndim == 1 and ndim >= 1:
        shape = [1] * ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return s


def quantize(
    x: torch.Tensor,
    scale: ScaleLike,
    zero_point: int | torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int = 1,
) -> torch.Tensor:
    """Quantize floats: ``clip(round_half_even(x / scale) + zero_point, qmin, qmax)``.

    The division is evaluated in ``x``'s floating dtype (float32 for float32 input), as ONNX
    ``QuantizeLinear`` does; rounding is half to even, like ``torch.round``.

    Args:
        x: Floating-point tensor.
        scale: Positive scale, a float or a 1-D tensor per channel along ``axis``.
        zero_point: Integer zero point (int or 1-D tensor along ``axis``).
        qmin: Lower bound of the integer range.
        qmax: Upper bound of the integer range.
        axis: Channel axis of per-channel ``scale``/``zero_point``.

    Returns:
        An ``int64`` tensor in ``[qmin, qmax]``.
    """
    if not x.dtype.is_floating_point:
        raise QuantizationError(f"quantize expects a floating-point tensor, got {x.dtype}")
    s = _channel_scale(scale, x.ndim, axis, x.dtype)
    zp = _channel_scale_int(zero_point, x.ndim, axis)
    return (torch.round(x / s).to(torch.int64) + zp).clamp(qmin, qmax)


def _channel_scale_int(zero_point: int | torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Return a zero point as an int64 tensor broadcastable along ``axis``."""
    zp = torch.as_tensor(zero_point)
    if zp.dtype.is_floating_point:
        raise QuantizationError(f"zero point must be an integer, got {zero_point!r}")
    zp = zp.to(torch.int64)
    if zp.ndim == 1:
        shape = [1] * ndim
        shape[axis] = -1
        zp = zp.reshape(shape)
    return zp


def dequantize(
    q: torch.Tensor,
    scale: ScaleLike,
    zero_point: int | torch.Tensor = 0,
    axis: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize: ``(q - zero_point) * scale`` in ``dtype`` (float32 by default).

    Args:
        q: Integer tensor.
        scale: Positive scale, float or 1-D tensor per channel along ``axis``.
        zero_point: Zero point (int or 1-D tensor along ``axis``).
        axis: Channel axis of per-channel parameters.
        dtype: Floating dtype of the result.
    """
    q = as_int_tensor(q, "q")
    centered = q - _channel_scale_int(zero_point, q.ndim, axis)
    return centered.to(dtype) * _channel_scale(scale, q.ndim, axis, dtype)


def quantize_bias(bias: torch.Tensor, x_scale: float, w_scale: ScaleLike) -> torch.Tensor:
    """Quantize a float bias to int32 at scale ``x_scale * w_scale`` (round half to even).

    Args:
        bias: Float bias, shape ``(C_out,)``.
        x_scale: Scale of the layer's input activation.
        w_scale: Weight scale, per tensor (float) or per output channel (1-D tensor).

    Returns:
        An ``int64`` tensor whose values fit int32.

    Raises:
        QuantizationError: A value does not fit int32 (the scales are far too small).
    """
    s = torch.as_tensor(w_scale, dtype=torch.float64) * float(x_scale)
    q = torch.round(bias.detach().double() / s)
    if not bool(torch.isfinite(q).all()) or bool((q.abs() > INT32_MAX).any()):
        raise QuantizationError(
            "quantized bias does not fit int32: |bias| / (x_scale * w_scale) >= 2^31; "
            "check for tiny or zero scales"
        )
    return q.to(torch.int64)


def requant_params(
    x_scale: float, w_scale: ScaleLike, out_scale: float, acc_bound: int = INT32_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dyadic requantization parameters for a conv/linear: ``m/2^shift ≈ s_x * s_w / s_out``.

    Args:
        x_scale: Input activation scale.
        w_scale: Weight scale, float or 1-D tensor per output channel.
        out_scale: Output activation scale.
        acc_bound: Bound on ``|acc|`` (:func:`accumulator_bound`); sets the multiplier precision
            with :func:`multiplier_bits` so that requantization never overflows int64.

    Returns:
        ``(m, shift)`` 1-D ``int64`` tensors (length 1 for a per-tensor weight scale).
    """
    reals = torch.as_tensor(w_scale, dtype=torch.float64).flatten() * x_scale / out_scale
    return quantize_multipliers(reals, bits=multiplier_bits(acc_bound))


def accumulator_bound(
    fan_in: int,
    x_bits: int,
    w_bits: int,
    *,
    x_signed: bool = False,
    x_zero_point: int | None = None,
    w_narrow: bool = True,
    bias_bound: int = 0,
) -> int:
    """Worst-case ``|acc|`` of a conv/linear: ``fan_in * max|x - z_x| * max|w| + bias_bound``.

    ``fan_in`` is ``C_in / groups * k_h * k_w`` for a conv and ``in_features`` for a linear.
    Without a zero point the activation term is the full span ``qmax - qmin``.

    Returns:
        The bound as a Python int; the accumulator fits int32 iff it is ``<= 2^31 - 1``.
    """
    xmin, xmax = qrange(x_bits, x_signed, narrow=False)
    if x_zero_point is None:
        x_abs = xmax - xmin
    else:
        x_abs = max(abs(xmin - x_zero_point), abs(xmax - x_zero_point))
    wmin, wmax = qrange(w_bits, True, narrow=w_narrow)
    return int(fan_in) * x_abs * max(abs(wmin), wmax) + abs(int(bias_bound))


def accumulator_dtype(acc_bound: int) -> torch.dtype:
    """``torch.int32`` if ``acc_bound`` fits int32, else ``torch.int64``."""
    return torch.int32 if acc_bound <= INT32_MAX else torch.int64


def _exact_dtype(x: torch.Tensor, w: torch.Tensor, fan_in: int, op: str) -> torch.dtype:
    """The float dtype that accumulates ``x`` times ``w`` exactly: float32 when every partial sum
    is within ``2^24``, else float64; raise when even float64 is not exact (``>= 2^53``)."""
    if x.numel() == 0 or w.numel() == 0:
        return torch.float32
    bound = fan_in * abs_max(x) * abs_max(w)
    if bound >= FLOAT64_EXACT:
        raise QuantizationError(
            f"{op}: accumulator bound {bound} >= 2^53 cannot be computed exactly; "
            "use fewer bits or a smaller fan-in"
        )
    exact32 = bound <= FLOAT32_EXACT and _float32_is_ieee(x.device)
    return torch.float32 if exact32 else torch.float64


def _float32_is_ieee(device: torch.device) -> bool:
    """Whether float32 conv/matmul on ``device`` use full float32 products and sums: on CPU unless
    the user allowed reduced precision (TF32/bf16); never assumed on accelerators (cuDNN
    convolutions default to TF32)."""
    if device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = torch.backends.mkldnn
    return all(getattr(getattr(mkldnn, part, None), "fp32_precision", "none") in ("none", "ieee")
               for part in ("conv", "matmul"))


def add_bias(acc: torch.Tensor, bias: torch.Tensor | None, channels: int) -> torch.Tensor:
    """Add an int32-range bias along dim 1 (or the last dim of a 1-D/2-D linear output)."""
    if bias is None:
        return acc
    b = as_int_tensor(bias, "bias")
    if b.shape != (channels,):
        raise QuantizationError(f"bias must have shape ({channels},), got {tuple(b.shape)}")
    if b.numel() and (int(b.min()) < INT32_MIN or int(b.max()) > INT32_MAX):
        raise QuantizationError("bias must fit int32 (quantize it with quantize_bias)")
    return acc + b.reshape((1, -1) + (1,) * (acc.ndim - 2)) if acc.ndim >= 2 else acc + b


def int_conv2d(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    bias_i32: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    x_zero_point: int = 0,
) -> torch.Tensor:
    """Integer 2-D convolution: ``acc = conv(x_q - z_x, w_q) + bias`` (int64 accumulator).

    The zero point is subtracted *before* padding, so padding is a real-domain zero
    (equivalently: pad ``x_q`` with ``z_x``). Weights are symmetric (zero point 0). The bias is
    int32 at scale ``s_x * s_w``. Computed exactly in float32 when every partial sum is an integer
    ``<= 2^24``, else in float64 (``< 2^53``, checked), and returned as int64.

    Args:
        x_q: Integer input ``(N, C_in, H, W)``.
        w_q: Integer weight ``(C_out, C_in / groups, k_h, k_w)``.
        bias_i32: Optional integer bias ``(C_out,)`` within int32.
        stride: Conv stride.
        padding: Conv padding (ints, or ``"same"``/``"valid"``).
        dilation: Conv dilation.
        groups: Conv groups (``C_in`` for depthwise).
        x_zero_point: Input zero point (per tensor).

    Returns:
        ``int64`` accumulator ``(N, C_out, H_out, W_out)``.
    """
    x = as_int_tensor(x_q, "x_q") - int(x_zero_point)
    w = as_int_tensor(w_q, "w_q")
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1] * groups:
        raise QuantizationError(
            f"int_conv2d: input {tuple(x.shape)} and weight {tuple(w.shape)} do not match "
            f"for groups={groups} (want (N, C_in, H, W) and (C_out, C_in/groups, kh, kw))"
        )
    dtype = _exact_dtype(x, w, w.shape[1] * w.shape[2] * w.shape[3], "int_conv2d")
    acc = F.conv2d(x.to(dtype), w.to(dtype), None, stride, padding, dilation, groups)
    return add_bias(torch.round(acc).to(torch.int64), bias_i32, w.shape[0])


def int_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    bias_i32: torch.Tensor | None = None,
    x_zero_point: int = 0,
) -> torch.Tensor:
    """Integer linear layer: ``acc = (x_q - z_x) @ w_q.T + bias`` (int64 accumulator).

    Same conventions as :func:`int_conv2d`; the output feature dim is the last dim (dim 1 for
    the usual ``(N, in)`` input, which is where per-channel requantization applies).

    Args:
        x_q: Integer input ``(..., in_features)``.
        w_q: Integer weight ``(out_features, in_features)``.
        bias_i32: Optional integer bias ``(out_features,)`` within int32.
        x_zero_point: Input zero point.

    Returns:
        ``int64`` accumulator ``(..., out_features)``.
    """
    x = as_int_tensor(x_q, "x_q") - int(x_zero_point)
    w = as_int_tensor(w_q, "w_q")
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise QuantizationError(
            f"int_linear: input {tuple(x.shape)} does not match weight {tuple(w.shape)}"
        )
    dtype = _exact_dtype(x, w, w.shape[1], "int_linear")
    acc = torch.round(x.to(dtype) @ w.to(dtype).T).to(torch.int64)
    if bias_i32 is None:
        return acc
    if acc.ndim > 2:
        return add_bias(acc.movedim(-1, 1), bias_i32, w.shape[0]).movedim(1, -1)
    return add_bias(acc, bias_i32, w.shape[0])

