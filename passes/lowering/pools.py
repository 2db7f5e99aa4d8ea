"""Pooling on integer codes for ``to_integer``: max pooling is exact; average pooling divides the
integer window sum with the reference's rounding (at the input's scale)."""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from djpq_compiler.errors import QuantizationError
from djpq_compiler.ir import modules as im
from djpq_compiler.ir.pooling import pooled_size

__all__ = ["pool_module", "window_sum"]


def _arg(node: fx.Node, i: int, name: str, default: object) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _from_module(mod: nn.Module) -> nn.Module | None:
    if isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
        return im.IntMaxPool2d(_pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size),
                               _pair(mod.padding), _pair(mod.dilation), mod.ceil_mode)
    if isinstance(mod, nn.AvgPool2d):
        return im.IntAvgPool2d(_pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size),
                               _pair(mod.padding), mod.ceil_mode, mod.count_include_pad,
                               mod.divisor_override)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        size = _static_size(mod.output_size)
        return im.IntAdaptiveAvgPool2d(size) if size is not None else None
    return None


def _from_function(node: fx.Node) -> nn.Module | None:
    if node.target is F.max_pool2d and not _arg(node, 6, "return_indices", False):
        k = _pair(_arg(node, 1, "kernel_size", None))
        s = _arg(node, 2, "stride", None)
        return im.IntMaxPool2d(k, _pair(s) if s else k, _pair(_arg(node, 3, "padding", 0)),
                               _pair(_arg(node, 4, "dilation", 1)),
                               bool(_arg(node, 5, "ceil_mode", False)))
    if node.target is F.avg_pool2d:
        k = _pair(_arg(node, 1, "kernel_size", None))
        s = _arg(node, 2, "stride", None)
        return im.IntAvgPool2d(k, _pair(s) if s else k, _pair(_arg(node, 3, "padding", 0)),
                               bool(_arg(node, 4, "ceil_mode", False)),
                               bool(_arg(node, 5, "count_include_pad", True)),
                               _divisor(node, _arg(node, 6, "divisor_override", None)))
    if node.target is F.adaptive_avg_pool2d:
        size = _static_size(_adaptive_size(node))
        return im.IntAdaptiveAvgPool2d(size) if size is not None else None
    return None


def _static_size(size: object) -> int | tuple[int, int] | None:
    """An adaptive pool's output size when it is all ints; ``None`` (e.g. ``(None, 7)``, "keep
    the input's size") leaves the pool to the float path instead of guessing."""
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return (int(size[0]), int(size[1]))
    return None


def _divisor(node: fx.Node, value: object) -> int | None:
    if value is None or isinstance(value, int):
        return value
    raise QuantizationError(f"{node.format_node()}: divisor_override={value!r} is not a constant "
                            "int; pass a Python int (or None)")


def _adaptive_size(node: fx.Node) -> object:
    """An adaptive pool's output size as ints: from the call, or, when the call computes it from
    a shape (``x.shape[-1] - 1`` is an fx node), from the traced output shape."""
    size = _arg(node, 1, "output_size", None)
    if isinstance(size, fx.Node) or (isinstance(size, (tuple, list)) and
                                     any(isinstance(v, fx.Node) for v in size)):
        meta = node.meta.get("tensor_meta")
        return tuple(int(v) for v in meta.shape[2:]) if meta is not None and \
            len(meta.shape) == 4 else None
    return size


def pool_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The integer pooling module for ``node``, or ``None`` if it is not a supported pool."""
    if node.op == "call_module":
        return _from_module(gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        return _from_function(node)
    return None


def window_sum(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, int] | None:
    """An average pool with one divisor everywhere, as ``(window-sum module, count)``.

    Summing on codes and rescaling ``s_in / count -> s_out`` in one requantization rounds once,
    where pooling at the input scale and then requantizing would round twice.
    """
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    shape = getattr(meta, "shape", None)  # None for a tuple-valued input (chunk, split)
    if shape is None or len(shape) != 4:
        return None
    h, w = int(shape[2]), int(shape[3])
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            return _adaptive_sum(mod.output_size, h, w)
        if isinstance(mod, nn.AvgPool2d):
            return _fixed_sum(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                              mod.count_include_pad, mod.divisor_override, h, w)
    elif node.target is F.adaptive_avg_pool2d:
        size = _adaptive_size(node)
        return _adaptive_sum(size, h, w) if size is not None else None
    elif node.target is F.avg_pool2d:
        return _fixed_sum(_arg(node, 1, "kernel_size", None), _arg(node, 2, "stride", None),
                          _arg(node, 3, "padding", 0), _arg(node, 4, "ceil_mode", False),
                          _arg(node, 5, "count_include_pad", True),
                          _arg(node, 6, "divisor_override", None), h, w)
    return None


def _fixed_sum(kernel_size: object, stride: object, padding: object, ceil_mode: object,
               count_include_pad: object, divisor_override: object, h: int, w: int
               ) -> tuple[nn.Module, int] | None:
    """A 2-D average pool with one divisor for every window, as a window sum and that divisor:
    ``divisor_override``, else ``k_h * k_w`` when every window holds that many inputs (zero
    padding counted by ``count_include_pad``, padding codes are real zeros). Not: padding that
    is not counted, or a ``ceil_mode`` that adds partial windows (their divisors differ)."""
    k = _pair(kernel_size)
    st = _pair(stride) if stride else k
    pad = _pair(padding)
    partial = bool(ceil_mode) and any(
        pooled_size(n, kk, ss, pp, True) != pooled_size(n, kk, ss, pp, False)
        for n, kk, ss, pp in zip((h, w), k, st, pad, strict=True))
    if partial:
        return None  # torch clips those windows' divisors (and ONNX's differ again)
    if divisor_override is not None:
        count = int(divisor_override)  # type: ignore[call-overload]
        if count <= 0:
            return None
    elif pad != (0, 0) and not count_include_pad:
        return None  # border windows count fewer inputs
    else:
        count = k[0] * k[1]
    return im.IntAvgPool2d(k, st, pad, False, True, 1), count


def _adaptive_sum(output_size: object, h: int, w: int) -> tuple[nn.Module, int] | None:
    oh, ow = _pair(output_size)
    oh, ow = oh or h, ow or w
    if h % oh or w % ow:
        return None  # uneven bins: counts differ per bin
    k = (h // oh, w // ow)
    return im.IntAvgPool2d(k, k, (0, 0), False, True, 1), k[0] * k[1]
