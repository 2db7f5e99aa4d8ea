"""Integer pooling: max (exact) and average (integer division, round half up).

Average pooling keeps the input scale and zero point: ``out = z + div_half_up(S, c)`` with ``S``
the window sum of ``q - z`` (padding contributes real zero) and ``c`` the divisor, exactly as
``torch.nn.functional.avg_pool2d`` counts it. ``div_half_up(S, c) = floor((2S + c) / (2c))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from djpq_compiler.errors import QuantizationError

from .fixedpoint import as_int_tensor

__all__ = [
    "adaptive_bin_matrix",
    "adaptive_pool_sums",
    "avg_counts",
    "avg_pool_sums",
    "ceil_extra_padding",
    "div_half_up",
    "int_adaptive_avg_pool2d",
    "int_avg_pool2d",
    "int_max_pool2d",
    "pooled_size",
]

IntPair = int | Sequence[int]


def _pair(value: IntPair) -> tuple[int, int]:
    """Expand an int (or a 1/2-sequence) to a pair of ints."""
    if isinstance(value, int):
        return value, value
    vals = tuple(int(v) for v in value)
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


def div_half_up(num: torch.Tensor, den: torch.Tensor | int) -> torch.Tensor:
    """Integer division rounded to nearest, ties towards +inf: ``floor((2 num + den) / (2 den))``.

    Args:
        num: ``int64`` numerator (any sign).
        den: Positive ``int64`` divisor (tensor broadcastable to ``num``, or int).
    """
    return torch.div(2 * num + den, 2 * den, rounding_mode="floor")


def _check_4d(x: torch.Tensor, op: str) -> torch.Tensor:
    x = as_int_tensor(x, "x_q")
    if x.ndim != 4:
        raise QuantizationError(f"{op} expects an (N, C, H, W) tensor, got {tuple(x.shape)}")
    return x


def int_max_pool2d(
    x_q: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Max pooling on integers (exact; padded positions never win, as in torch).

    Same scale and zero point in and out (max commutes with the monotone dequantization).
    """
    x = _check_4d(x_q, "int_max_pool2d")
    kernel = _pair(kernel_size)
    strides = kernel if stride is None or stride in ([], ()) else _pair(stride)
    return F.max_pool2d(x, kernel, strides, _pair(padding), _pair(dilation), ceil_mode)


def avg_counts(
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    count_include_pad: bool,
) -> torch.Tensor:
    """Per-output divisors of ``avg_pool2d`` (torch's definition, incl. ceil_mode windows)."""
    per_axis = []
    for size, out, k, s, p in zip(in_hw, out_hw, kernel, stride, padding, strict=True):
        start = torch.arange(out, dtype=torch.int64) * s - p
        end = torch.clamp(start + k, max=size + p)
        if count_include_pad:
            per_axis.append(end - start)
        else:
            per_axis.append(torch.clamp(end, max=size) - torch.clamp(start, min=0))
    return per_axis[0][:, None] * per_axis[1][None, :]


def int_avg_pool2d(
    x_q: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    zero_point: int = 0,
    qmin: int | None = None,
    qmax: int | None = None,
) -> torch.Tensor:
    """Average pooling: ``z + div_half_up(sum(q - z over window), count)``, optional clip.

    Window sums are exact (float64 sum of integers ``< 2^53``); the divisor follows
    ``torch.nn.functional.avg_pool2d`` (``count_include_pad``, ``ceil_mode``,
    ``divisor_override``).

    Returns:
        An ``int64`` tensor at the input's scale and zero point.
    """
    x = _check_4d(x_q, "int_avg_pool2d") - zero_point
    sums, window_counts = avg_pool_sums(x, kernel_size, stride, padding, ceil_mode,
                                        count_include_pad)
    if divisor_override is not None:
        if int(divisor_override) <= 0:
            raise QuantizationError(f"divisor_override must be > 0, got {divisor_override}")
        counts: torch.Tensor | int = int(divisor_override)
    else:
        counts = window_counts
    out = div_half_up(sums, counts) + zero_point
    return out.clamp(min=qmin, max=qmax) if qmin is not None or qmax is not None else out


def avg_pool_sums(
    x_q: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``avg_pool2d`` window sums of integer codes (padding adds zeros) and torch's divisor
    of every output position ``(H_out, W_out)``, both ``int64``."""
    x = _check_4d(x_q, "avg_pool_sums")
    kernel = _pair(kernel_size)
    strides = kernel if stride is None or stride in ([], ()) else _pair(stride)
    pads = _pair(padding)
    sums = F.avg_pool2d(x.double(), kernel, strides, pads, ceil_mode, True, divisor_override=1)
    counts = avg_counts((x.shape[2], x.shape[3]), (sums.shape[2], sums.shape[3]), kernel,
                         strides, pads, count_include_pad)
    return torch.round(sums).to(torch.int64), counts


def adaptive_pool_sums(x_q: torch.Tensor, output_size: int | Sequence[int | None]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact sums of torch's adaptive pooling bins and each bin's size ``(H_out, W_out)``."""
    x = _check_4d(x_q, "adaptive_pool_sums")
    sizes = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    out_h, out_w = (x.shape[2 + i] if s is None else int(s) for i, s in enumerate(sizes))
    h_bins = _adaptive_bins(x.shape[2], out_h)
    w_bins = _adaptive_bins(x.shape[3], out_w)
    sums = torch.empty(x.shape[:2] + (out_h, out_w), dtype=torch.int64)
    counts = torch.empty((out_h, out_w), dtype=torch.int64)
    for i, (h0, h1) in enumerate(h_bins):
        for j, (w0, w1) in enumerate(w_bins):
            sums[:, :, i, j] = x[:, :, h0:h1, w0:w1].sum(dim=(2, 3))
            counts[i, j] = (h1 - h0) * (w1 - w0)
    return sums, counts


def pooled_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """torch's pooled length of one axis (a ceil-mode window must start inside the input or its
    left padding)."""
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def ceil_extra_padding(in_hw: Sequence[int], out_hw: Sequence[int], kernel: Sequence[int],
                       stride: Sequence[int], padding: Sequence[int]) -> tuple[int, int]:
    """Extra bottom/right zero padding that makes every ``ceil_mode`` window a full window of a
    padded input (zeros never change a window sum)."""
    h, w = (max((o - 1) * s + k - (n + 2 * p), 0)
            for n, o, k, s, p in zip(in_hw, out_hw, kernel, stride, padding, strict=True))
    return h, w


def adaptive_bin_matrix(size: int, out: int) -> torch.Tensor:
    """0/1 ``int64`` matrix ``(out, size)`` of torch's adaptive pooling bins (row ``i`` marks
    bin ``i``, see :func:`int_adaptive_avg_pool2d`)."""
    matrix = torch.zeros((out, size), dtype=torch.int64)
    for i, (start, end) in enumerate(_adaptive_bins(size, out)):
        matrix[i, start:end] = 1
    return matrix


def int_adaptive_avg_pool2d(
    x_q: torch.Tensor,
    output_size: int | Sequence[int | None],
    zero_point: int = 0,
) -> torch.Tensor:
    """Adaptive average pooling with torch's bins and :func:`div_half_up` rounding.

    Bin ``i`` of an axis of length ``n`` pooled to ``o`` covers
    ``[floor(i n / o), ceil((i + 1) n / o))``.

    Returns:
        An ``int64`` tensor at the input's scale and zero point.
    """
    x = _check_4d(x_q, "int_adaptive_avg_pool2d") - zero_point
    sums, counts = adaptive_pool_sums(x, output_size)
    return div_half_up(sums, counts) + zero_point


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling bins ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    if out <= 0:
        raise QuantizationError(f"adaptive pooling output size must be > 0, got {out}")
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]
