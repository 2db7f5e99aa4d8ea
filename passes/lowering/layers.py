"""Integer conv/linear construction for ``to_integer``: weight codes, folded BN/gate, multipliers.

For a layer reading codes ``x_q`` at scale ``s_x`` with weight codes ``w_q`` on the learned grid
``d_w`` (exactly what the prepared weight quantizer produced), followed by an optional eval BN
(with the gate's ``mu`` already folded in) or a gate factor ``g`` on the layer itself:

    real_c = k_c * s_x * d_w * acc_c + b'_c,   k_c = g_c * gamma_c / sigma_c,
    b'_c = ((b_c * g_c) - mean_c) * gamma_c / sigma_c + beta_c

so the integer layer uses ``w_scale_c = d_w * |k_c|`` (the sign of ``k_c`` flips that channel's
codes), ``bias_int_c = round(b'_c * 2^k / (s_x * w_scale_c))`` and a per-channel dyadic
multiplier ``s_x * w_scale_c / (2^k * s_out)`` (``requant_params``) applied to
``acc * 2^k + bias_int``. ``k`` (``acc_shift``) is 0 unless the bias rounded at ``s_x * w_scale``
would cost an output LSB (coarse inputs and weights into a fine output grid, ``s_x * s_w / s_out
> 1``); then the bias gets ``k`` more fractional bits, as many as int32 allows.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
import torch.fx as fx
from torch import nn

from djpq_compiler.errors import BiasSaturationWarning, QuantizationError
from djpq_compiler.ir import modules as im
from djpq_compiler.ir.fixedpoint import qrange
from djpq_compiler.ir.ops import accumulator_bound, requant_params

__all__ = ["LayerParams", "layer_params", "bias_agreement_lsb"]


class OutputCodes(Protocol):
    """What a layer's integer output is (``to_integer.Act``): codes in ``qrange(bits, signed)``
    at ``scale``."""

    scale: float
    bits: int
    signed: bool


@dataclass(frozen=True)
class LayerParams:
    kind: str  # "conv" or "linear"
    node: str
    module: str
    d_w: float
    w_bits: int
    #: The gate factor ``g`` of a gated layer (``fold_scales``' record), else ``None``.
    gate_scale: torch.Tensor | None = field(default=None, compare=False)

    def in_channels(self, mod: Any) -> int:
        w = mod.weight
        groups = getattr(mod, "groups", 1)
        return int(w.shape[1]) * int(groups)

    def _affine(self, gm: fx.GraphModule, bn: fx.Node | None) -> tuple[torch.Tensor, torch.Tensor]:
        mod: Any = gm.get_submodule(self.module)
        w = mod.weight.detach().to(torch.float64)
        b = torch.zeros(w.shape[0], dtype=torch.float64)
        if mod.bias is not None:
            b = mod.bias.detach().to(torch.float64)
        g = self.gate_scale
        k = g.to(torch.float64) if g is not None else torch.ones_like(b)
        b = b * k
        if bn is not None:
            n: Any = gm.get_submodule(str(bn.target))
            sigma = torch.sqrt(n.running_var.to(torch.float64) + n.eps)
            gamma, beta = torch.ones_like(b), torch.zeros_like(b)
            if n.weight is not None:
                gamma = n.weight.detach().to(torch.float64)
            if n.bias is not None:
                beta = n.bias.detach().to(torch.float64)
            kb = gamma / sigma
            b = (b - n.running_mean.to(torch.float64)) * kb + beta
            k = k * kb
        return k, b

    def codes(self, gm: fx.GraphModule) -> torch.Tensor:
        w = cast(Any, gm.get_submodule(self.module)).weight.detach()
        limit = 2 ** (self.w_bits - 1) - 1
        return torch.clamp(torch.round(w / self.d_w), -limit, limit).to(torch.int64)

    def build(self, gm: fx.GraphModule, bn: fx.Node | None, x_scale: float, x_bits: int,
              x_signed: bool, out: OutputCodes | None, relu: str | None) -> tuple[nn.Module, int]:
        """The integer module and its agreement bound in output LSB (``out`` is the output
        ``Act`` or None for a float output)."""
        mod = gm.get_submodule(self.module)
        k, post_bias = self._affine(gm, bn)
        codes = self.codes(gm)
        sign = torch.where(k < 0, -1, 1).to(torch.int64)
        shape = [-1] + [1] * (codes.ndim - 1)
        codes = codes * sign.view(shape)
        codes[(k == 0)] = 0
        w_scale = self.d_w * torch.where(k == 0, torch.ones_like(k), k.abs())
        bias = torch.round(post_bias / (x_scale * w_scale)).to(torch.int64)
        fan_in = int(codes[0].numel())
        lsb = 1
        if out is not None:
            lo, hi = qrange(out.bits, out.signed)
            if relu is not None:
                lo = max(lo, 0)
            if relu == "relu6":
                hi = min(hi, int(torch.round(torch.tensor(6.0 / out.scale))))
            exact = post_bias / (x_scale * w_scale)
            multiplier = x_scale * w_scale / out.scale
            live = _unclipped(codes, exact, multiplier, x_bits, x_signed, lo, hi)
            acc_shift, bias, lsb = _fine_bias(exact, multiplier, fan_in, x_bits, self.w_bits,
                                              x_signed, live)
            lsb = min(lsb, max(hi - lo, 1))  # never more than the output's code range
            bias = _saturating_bias(self.node, bias, fan_in, x_bits, self.w_bits, x_signed,
                                    multiplier / 2**acc_shift, max(abs(lo), abs(hi)), acc_shift)
            bound = (accumulator_bound(fan_in, x_bits, self.w_bits, x_signed=x_signed)
                     << acc_shift) + (int(bias.abs().max()) if bias.numel() else 0)
            w_scale_acc = w_scale / 2**acc_shift
            m, shift = requant_params(x_scale, w_scale_acc, out.scale, bound)
            common: dict[str, Any] = dict(out_scale=out.scale, out_bits=out.bits,
                                          out_signed=out.signed, clip=(lo, hi),
                                          acc_shift=acc_shift)
        else:  # float output: the bias stays float (no int32 bound), added after scaling
            m = shift = torch.zeros(codes.shape[0], dtype=torch.int64)
            common = dict(out_scale=None, out_bits=32, out_signed=True, clip=None,
                          out_bias=post_bias)
            bias = torch.zeros_like(bias)
        kwargs: dict[str, Any] = dict(weight=codes, bias=bias, w_scale=w_scale, in_scale=x_scale,
                      w_bits=self.w_bits, m=m, shift=shift, **common)
        if self.kind == "linear":
            layer: nn.Module = im.IntLinear(**kwargs)
        else:
            conv = cast(nn.Conv2d, mod)
            layer = im.IntConv2d(stride=conv.stride, padding=cast(tuple[int, int], conv.padding),
                                 dilation=conv.dilation, groups=conv.groups, **kwargs)
        return layer, lsb


def _unclipped(codes: torch.Tensor, exact: torch.Tensor, multiplier: torch.Tensor, x_bits: int,
               x_signed: bool, lo: int, hi: int) -> torch.Tensor:
    """Channels whose output can land inside ``[lo, hi]`` (with a 1-LSB margin) for some input
    codes; the others are clipped whatever the input (e.g. a large negative bias before a ReLU),
    so their bias rounding cannot change an output."""
    w = codes.reshape(codes.shape[0], -1).to(torch.float64)
    x_lo, x_hi = qrange(x_bits, x_signed)
    pos, neg = w.clamp(min=0).sum(1), w.clamp(max=0).sum(1)
    acc_lo, acc_hi = pos * x_lo + neg * x_hi, pos * x_hi + neg * x_lo
    m = multiplier.to(torch.float64)
    return ((acc_hi + exact) * m >= lo - 1) & ((acc_lo + exact) * m <= hi + 1)


def _fine_bias(exact: torch.Tensor, multiplier: torch.Tensor, fan_in: int, x_bits: int,
               w_bits: int, x_signed: bool, live: torch.Tensor | None = None
               ) -> tuple[int, torch.Tensor, int]:
    """``(k, bias, lsb)``: the integer bias at ``s_x * s_w / 2^k`` and its LSB bound.

    ``k = 0`` (the bias at the accumulator step) unless rounding there moves an output by a
    whole LSB or more; then the smallest ``k`` that brings the bound back to 1 LSB while
    ``max|acc| * 2^k + max|bias|`` still fits int32, else the largest ``k`` that fits (its
    remaining bound is reported). ``exact`` is the real bias in units of ``s_x * s_w``; only
    ``live`` channels (default: all) count for the bound.
    """
    def at(k: int) -> tuple[torch.Tensor, int]:
        rounded = torch.round(exact * 2**k).to(torch.int64)
        return rounded, bias_agreement_lsb(exact * 2**k, rounded, multiplier / 2**k, live)

    bias, lsb = at(0)
    if lsb == 1:
        return 0, bias, 1
    acc_max = accumulator_bound(fan_in, x_bits, w_bits, x_signed=x_signed)
    best = (0, bias, lsb)
    for k in range(1, 31):
        rounded, lsb_k = at(k)
        fits = rounded.abs() <= INT32_MAX  # saturating channels clamp as at k = 0
        if (acc_max << k) + (int(rounded[fits].abs().max()) if bool(fits.any()) else 0) \
                > INT32_MAX:
            break
        best = (k, rounded, lsb_k)
        if lsb_k == 1:
            break
    return best


def bias_agreement_lsb(exact: torch.Tensor, rounded: torch.Tensor,
                       multiplier: torch.Tensor, live: torch.Tensor | None = None) -> int:
    """The LSB bound of an integer layer's output against fake-quant: 1, unless rounding the
    bias to the accumulator grid ``s_x * s_w`` moves it by ``e >= 1`` output LSB (possible only
    where ``s_x * s_w / s_out > 1``: coarse inputs and weights, a fine output grid); then
    ``floor(e) + 1``. Channels whose bias saturates int32, or not ``live`` ones, are skipped
    (their output clips)."""
    fits = rounded.abs() <= INT32_MAX
    if live is not None:
        fits = fits & live
    err = ((exact - rounded.to(torch.float64)).abs() * multiplier.to(torch.float64))[fits]
    worst = float(err.max()) if err.numel() else 0.0
    return int(worst + 1e-6) + 1


INT32_MAX = 2**31 - 1


def _saturating_bias(node: str, bias: torch.Tensor, fan_in: int, x_bits: int, w_bits: int,
                     x_signed: bool, multiplier: torch.Tensor, q_abs: int,
                     acc_shift: int = 0) -> torch.Tensor:
    """Keep ``|acc| + |bias|`` within int32 in every channel, or raise.

    Runtimes add the bias to an int32 accumulator (onnxruntime's fused QLinearConv does), so a
    bias within int32 but above ``2^31 - 1 - max|acc|`` wraps there while the reference (int64)
    and TVM saturate: the backends would disagree. A channel whose bias exceeds that room
    (``|bias| > room``) drives its output past the clip range whatever the accumulator does as long
    as ``(room - max|acc|) * M > q_abs + 1`` (``acc`` shifted by ``acc_shift``, ``M`` the
    multiplier at that scale); its bias is then clamped to ``±room``, which gives the same
    saturated codes in every backend, and a :class:`BiasSaturationWarning` names the channels.
    Otherwise the layer is refused. (When the accumulator alone may exceed int32, ``room`` is
    int32 itself: backends take an int64 accumulator there.)
    """
    acc_max = accumulator_bound(fan_in, x_bits, w_bits, x_signed=x_signed) << acc_shift
    room = INT32_MAX - acc_max if acc_max < INT32_MAX else INT32_MAX
    over = bias.abs() > room
    if not bool(over.any()):
        return bias
    margin = (room - min(acc_max, room)) * multiplier.to(torch.float64)
    channels = torch.nonzero(over).flatten().tolist()
    shown = f"{channels[:8]}{'...' if len(channels) > 8 else ''}"
    if not bool((margin[over] > q_abs + 1).all()):
        raise QuantizationError(
            f"layer {node}: its bias does not fit int32 next to the accumulator in channel(s) "
            f"{shown} (|bias| > 2^31 - 1 - max|acc| = {room} at scale s_x*s_w) and does not "
            "saturate the output either; retrain with a larger activation range (q_max) or more "
            "bits")
    warnings.warn(BiasSaturationWarning(
        f"layer {node}: channel(s) {shown} have an integer bias beyond int32 next to the "
        f"accumulator (|bias| > {room}); they output their clip value for every input, so the "
        f"bias is clamped to +-{room}, which changes no output in any backend. Such channels are "
        "constant (an untrained or degenerate layer): consider pruning them"), stacklevel=2)
    return bias.clamp(-room, room)


def layer_params(gm: fx.GraphModule, node: fx.Node, weight_grid: Mapping[str, tuple[float, int]],
                 layer_scales: Mapping[str, torch.Tensor]) -> LayerParams | None:
    """The integer-lowerable description of a conv2d/linear module node, else ``None``.

    ``weight_grid`` is ``strip_weight_quantizers``' record, ``layer_scales`` ``fold_scales``'.
    """
    grid = weight_grid.get(node.name)
    scale = layer_scales.get(node.name)
    if node.op != "call_module" or grid is None:
        return None
    mod = gm.get_submodule(str(node.target))
    shape = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    if isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros" and \
            not isinstance(mod.padding, str):
        return LayerParams("conv", node.name, str(node.target), grid[0], grid[1], scale)
    if isinstance(mod, nn.Linear) and shape is not None and _linear_input_ok(node, gm,
                                                                          len(shape.shape)):
        return LayerParams("linear", node.name, str(node.target), grid[0], grid[1], scale)
    return None


def _linear_input_ok(node: fx.Node, gm: fx.GraphModule, ndim: int) -> bool:
    """Whether a linear on an ``ndim``-D input lowers to an ``IntLinear``: ``(N, C)``, or
    ``(N, ..., C)`` tokens (channels on the last dim) unless a BatchNorm reads it: BN
    normalizes dim 1, which is not a tokens layer's channel dim, so it cannot be folded per
    output channel (that layer stays float)."""
    if ndim == 2:
        return True
    if ndim < 2:
        return False
    return not any(u.op == "call_module" and isinstance(
        gm.get_submodule(str(u.target)), nn.modules.batchnorm._BatchNorm) for u in node.users)
