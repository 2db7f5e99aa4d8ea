"""The DQ quantizer (Uhlich et al., "U3" parametrization): learnable step ``d`` and clip ``q_max``.

``Q(x) = d * round(clip(x, x_min, q_max) / d)`` with ``x_min = -q_max`` (signed) or ``0``
(unsigned), and the bit-width follows from ``(d, q_max)``: signed ``b = log2(q_max/d + 1) + 1``,
unsigned ``b = log2(q_max/d + 1)``. See REFERENCE.md §1. Gradients (:func:`dq_quantize`) are exactly
the reference ones: straight-through on ``round``; ``dQ/dx = 1`` inside ``[x_min, q_max]`` (closed
interval [choice]: the boundaries count as inside) and 0 outside; ``dQ/dd = (Q(x) - x)/d`` inside,
0 outside; ``dQ/dq_max = sign(x)`` outside (unsigned: 1 above ``q_max``, 0 below 0), 0 inside.

[choice] ``torch.round`` rounds half to even; the integer executor must use the same convention or
accept the 1-LSB tolerance of DESIGN.md invariant 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from djpq_compiler.errors import ConfigError, QuantizationError
from djpq_compiler.modules.fused import fused_kernels
from djpq_compiler.modules.saved import code_dtype, grid_codes_fit, mark_grid

if TYPE_CHECKING:
    from djpq_compiler.config import QuantSpec

__all__ = ["DQQuantizer", "Snapped", "dq_quantize", "levels"]

#: [choice] Read-out tolerance: ``b = 8 + 1e-6`` (float error after ``d = q_max/127``) reads out
#: as 8 bits, not 9.
BITS_TOL = 1e-4
#: [choice] Smallest calibrated range: an all-zero tensor (dead channel) gets ``q_max = 1e-8``.
MIN_RANGE = 1e-8


def levels(bits: torch.Tensor | float, signed: bool) -> torch.Tensor | float:
    """Positive grid levels for ``bits``: ``2^(b-1) - 1`` (signed) or ``2^b - 1`` (unsigned)."""
    return 2.0 ** (bits - 1) - 1 if signed else 2.0**bits - 1


Bound = float | torch.Tensor


def _bounds(
    x: torch.Tensor, d: torch.Tensor, q_max: torch.Tensor, signed: bool
) -> tuple[Bound, Bound, Bound]:
    """``(x_min, q_max, d)`` as Python floats where that is exact and fast, else as tensors.

    [choice] On CPU, a one-element ``d``/``q_max`` becomes a Python float: the elementwise
    kernels then take their scalar path, several times faster than broadcasting a 0-d tensor
    (measured 0.2 vs 1.7 ms for a clamp of 1.6 M floats). The float is the tensor's exact value
    and is cast back to the tensor's dtype by the kernel, so results are bitwise the same.
    """
    fast = (
        d.numel() == 1
        and q_max.numel() == 1
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
    )
    if fast:
        hi = float(q_max.detach().reshape(()).item())
        return (-hi if signed else 0.0), hi, float(d.detach().reshape(()).item())
    hi_t = q_max.detach()
    lo_t = -hi_t if signed else torch.zeros_like(hi_t)
    return lo_t, hi_t, d.detach()


def _clamp(
    x: torch.Tensor, lo: Bound, hi: Bound, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.clamp`` for float or tensor bounds (one call either way; typed per overload)."""
    if isinstance(lo, float) and isinstance(hi, float):
        return torch.clamp(x, lo, hi, out=out)
    lo_t = lo if isinstance(lo, torch.Tensor) else torch.as_tensor(lo)
    hi_t = hi if isinstance(hi, torch.Tensor) else torch.as_tensor(hi)
    return torch.clamp(x, lo_t, hi_t, out=out)


def _dot(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum_to_size(like.shape)`` without the ``a * b`` temporary when ``like`` has one
    element (a per-tensor step or clip)."""
    if like.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(like.shape)
    return (a * b).sum_to_size(like.shape)


class _DQRound(torch.autograd.Function):
    """``d * round(clip(x, x_min, q_max) / d)`` with the DQ gradients of the module docstring.

    [choice] Written for few elementwise passes and few fresh full-size tensors (the quantizers
    dominate a prepared model's step on small convs, and on CPU a fresh full-size tensor costs
    more than a pass over it): forward is one clamp into the output, then in-place divide, round
    (the 1-byte grid codes are taken here when they fit) and multiply. Backward uses two
    full-size temporaries: ``clip(x)`` (later ``x/d``) and ``round(x/d)`` (later
    ``round(x/d) - x/d``), plus the input gradient, built in place from ``sign(x - clip(x))``
    (+1 above, -1 below, 0 inside), and reduces the per-tensor ``d``/``q_max`` gradients with
    ``dot``. Where the compiled kernels of :mod:`djpq_compiler.modules.fused` are available (a
    per-tensor step and clip on CPU, while training), forward and backward are one pass each
    instead. Saved: ``x`` only -- usually the storage the previous op (a ReLU) keeps anyway; a conv
    reading the output keeps its 1-byte codes (:mod:`djpq_compiler.modules.saved`). The grid is
    recomputed, not saved: a following in-place op (a ReLU with ``inplace=True``) may overwrite
    the returned tensor.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        d: torch.Tensor,
        q_max: torch.Tensor,
        signed: bool,
        recording: bool,
    ) -> torch.Tensor:
        lo, hi, step = _bounds(x, d, q_max, signed)
        fast = isinstance(step, float) and isinstance(hi, float) and isinstance(lo, float)
        want_codes = recording and fast and grid_codes_fit(
            x.numel(), x.dtype, float(hi) / float(step), signed)
        kernels = fused_kernels() if fast and recording else None
        if kernels is not None:  # one pass, bitwise the unfused ops below
            q, codes = kernels.dq_forward(x, lo, hi, step, want_codes, signed)
            codes = codes if want_codes else None
        else:
            q = _clamp(x, lo, hi)
            q.div_(step).round_()
            codes = q.to(code_dtype(signed)) if want_codes else None  # round(clip(x)/d)
            q.mul_(step)
        if codes is not None:
            mark_grid(q, codes, float(step))  # whoever saves q (a conv) keeps the codes instead
        # [choice] the codes are not saved for this backward: where no conv keeps them (an add
        # reads q) they would cost a quarter of x; backward rounds again instead
        ctx.save_for_backward(x, d, q_max)
        ctx.signed = signed
        return q

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, d, q_max = ctx.saved_tensors
        lo, hi, step = _bounds(x, d, q_max, ctx.signed)
        need_x, need_d, need_q = ctx.needs_input_grad[:3]
        fast = isinstance(step, float) and isinstance(hi, float) and isinstance(lo, float)
        kernels = fused_kernels() if fast else None
        if kernels is not None:  # one pass; the d/q_max sums accumulate in double
            g_in, gd, gq = kernels.dq_backward(x, grad, lo, hi, step, need_x, ctx.signed)
            return ((g_in if need_x else None),
                    (gd.to(d.dtype).reshape(d.shape) if need_d else None),
                    (gq.to(q_max.dtype).reshape(q_max.shape) if need_q else None), None, None)
        xc = _clamp(x, lo, hi)
        side = torch.sub(x, xc).sign_()  # +1 above q_max, -1 below x_min, 0 inside
        gq = None
        if need_q:
            if ctx.signed:
                gq = _dot(grad, side, q_max)
            else:  # the lower clip 0 does not depend on q_max: only "above" counts
                gq = _dot(grad, torch.clamp(side, min=0.0, out=xc), q_max)
                _clamp(x, lo, hi, out=xc)
        if not (need_x or need_d):
            return None, None, gq, None, None
        # grad * (1 - |side|): exactly grad inside, (signed) zero outside
        g_in = torch.addcmul(grad, grad, side.abs_(), value=-1.0, out=side)
        gd = None
        if need_d:
            s = xc.div_(step)
            # (Q(x) - x)/d = round(s) - s inside (masked by g_in outside)
            gd = _dot(g_in, torch.round(s).sub_(s), d)
        return (g_in if need_x else None), gd, gq, None, None


def dq_quantize(
    x: torch.Tensor, d: torch.Tensor, q_max: torch.Tensor, signed: bool
) -> torch.Tensor:
    """``d * round(clip(x, x_min, q_max) / d)`` with the DQ gradients (see the module docstring).

    ``d`` and ``q_max`` must be positive and broadcast against ``x``.
    """
    # codes only where autograd records (the forward itself runs with grad mode off)
    recording = torch.is_grad_enabled() and (x.requires_grad or d.requires_grad
                                             or q_max.requires_grad)
    out: torch.Tensor = _DQRound.apply(x, d, q_max, signed, recording)
    return out


def _signed_pow(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sign(x) * |x|^p`` with a zero (not NaN/Inf) gradient at ``x = 0``."""
    tiny = torch.finfo(x.dtype).tiny
    return torch.sign(x) * x.abs().clamp_min(tiny) ** p


class Snapped(NamedTuple):
    """Read-out of a quantizer: ``q_max`` is exactly ``d * levels(bits)``."""

    d: torch.Tensor
    q_max: torch.Tensor
    bits: int


class DQQuantizer(nn.Module):
    """DQ fake-quantizer with learnable step ``d`` and clip ``q_max`` (and so bit-width).

    [choice] Both are parametrized in log space (``log_d``, ``log_q_max``), so they stay positive
    without projection, and ``d <= q_max`` is enforced in the forward pass as
    ``d_eff = min(d, q_max)`` (while ``d > q_max`` the gradient reaches ``q_max`` instead of ``d``).

    Modes: plain DQ (bits learned through ``d``); ``restricted`` (power-of-two bits: the continuous
    ``b`` is rounded up to the next of ``allowed_bits`` with a straight-through estimator and
    ``d = q_max / levels(b')``); ``fixed_bits`` (``b = init_bits`` fixed, ``d = q_max /
    levels(b)`` tied to the learned ``q_max``: W8A8 / W4A4 baselines); ``learn_t`` (learnable
    companding ``sign(x)|x|^t`` before the grid and its inverse after it [choice: the inverse maps
    back so the layer keeps its scale]; ``b = log2(q_max^t/d + 1) + 1``; off by default).

    Quantizers start life as observers (``calibrating=True``): the forward pass records the range
    and returns ``x`` unchanged until :meth:`finish_calibration` sets ``q_max`` and ``d``.

    Args:
        signed: Signed grid ``[-q_max, q_max]`` or unsigned ``[0, q_max]``.
        init_bits: Bit-width set by calibration (and the fixed bit-width with ``fixed_bits``).
        per_tensor: One ``(d, q_max)`` per tensor, else one per channel (needs ``n_channels``).
        learn_t: Learn the companding exponent ``t`` (init 1, log-parametrized).
        restricted: Restrict bits to ``allowed_bits``.
        allowed_bits: Sorted powers of two for ``restricted``.
        min_bits: Smallest read-out bit-width (at least 2 [choice]).
        max_bits: Largest read-out bit-width.
        bind_min_bits: Hold the training bit-width at ``>= min_bits`` too: the free step is
            capped at ``q_grid / levels(min_bits)`` (the same ``min`` as ``d <= q_max``, so the
            gradient then reaches ``q_max`` instead of ``d``); otherwise ``min_bits`` is a
            read-out floor only.
        fixed_bits: Do not learn the bit-width.
        n_channels: Channels for per-channel quantization.
        channel_dim: The channel dimension of the quantized tensor (0 for weights, 1 for NCHW).
        init_q_max: ``q_max`` before calibration.
        observer: ``"minmax"`` (running min/max over calls) or ``"percentile"`` (mean over calls
            of the per-call ``percentile`` of ``|x|`` (signed) or ``x`` (unsigned)).
        percentile: Percentile for ``observer="percentile"``.
        calibrating: Start as an observer.
    """

    log_q_max: nn.Parameter
    log_d: nn.Parameter | None
    log_t: nn.Parameter | None
    obs_min: torch.Tensor
    obs_max: torch.Tensor

    def __init__(
        self,
        signed: bool,
        init_bits: int = 8,
        per_tensor: bool = True,
        learn_t: bool = False,
        restricted: bool = False,
        allowed_bits: Sequence[int] = (2, 4, 8, 16),
        min_bits: int = 2,
        max_bits: int = 16,
        fixed_bits: bool = False,
        n_channels: int | None = None,
        channel_dim: int = 0,
        init_q_max: float = 1.0,
        observer: str = "minmax",
        percentile: float = 99.99,
        calibrating: bool = True,
        bind_min_bits: bool = False,
    ) -> None:
        super().__init__()
        _check_args(init_bits, min_bits, max_bits, allowed_bits, per_tensor, n_channels)
        _check_observer(observer, percentile, init_q_max)
        self.signed, self.init_bits, self.per_tensor = bool(signed), int(init_bits), per_tensor
        self.restricted, self.fixed_bits = bool(restricted), bool(fixed_bits)
        self.allowed_bits = tuple(int(b) for b in allowed_bits)
        self.min_bits, self.max_bits = int(min_bits), int(max_bits)
        self.bind_min_bits = bool(bind_min_bits)
        self.channel_dim, self.observer, self.percentile = channel_dim, observer, float(percentile)
        self.enabled, self.calibrating = True, bool(calibrating)
        shape = () if per_tensor else (int(n_channels),)  # type: ignore[arg-type]
        self.log_q_max = nn.Parameter(torch.full(shape, math.log(init_q_max)))
        d0 = init_q_max / float(levels(init_bits, self.signed))
        log_d = None if self.fixed_bits else nn.Parameter(torch.full(shape, math.log(d0)))
        self.register_parameter("log_d", log_d)
        self.register_parameter("log_t", nn.Parameter(torch.zeros(())) if learn_t else None)
        self.register_buffer("obs_min", torch.full(shape, math.inf), persistent=False)
        self.register_buffer("obs_max", torch.full(shape, -math.inf), persistent=False)
        self.obs_count = 0

    @classmethod
    def from_spec(
        cls,
        spec: QuantSpec,
        signed: bool | None = None,
        *,
        restricted: bool = False,
        allowed_bits: Sequence[int] = (2, 4, 8, 16),
        n_channels: int | None = None,
        channel_dim: int = 0,
    ) -> DQQuantizer:
        """Build from a :class:`~djpq_compiler.config.QuantSpec`; ``spec.signed`` wins over
        ``signed`` (the graph's guess) when set."""
        sign = spec.signed if spec.signed is not None else signed
        if sign is None:
            raise ConfigError("QuantSpec.signed is None (auto) and no signedness was inferred")
        return cls(
            sign,
            init_bits=spec.bits,
            per_tensor=not spec.per_channel,
            restricted=restricted,
            allowed_bits=allowed_bits,
            min_bits=spec.min_bits,
            max_bits=spec.max_bits,
            fixed_bits=not spec.learn_bits,
            n_channels=n_channels,
            channel_dim=channel_dim,
            bind_min_bits=spec.bind_min_bits,
        )

    # ------------------------------------------------------------------------------- params
    @property
    def learn_t(self) -> bool:
        return self.log_t is not None

    def t(self) -> torch.Tensor | None:
        """The companding exponent (``None`` unless ``learn_t``)."""
        return None if self.log_t is None else torch.exp(self.log_t)

    def q_max(self) -> torch.Tensor:
        """The clip value ``q_max`` in the input domain."""
        return torch.exp(self.log_q_max)

    def q_grid(self) -> torch.Tensor:
        """The clip value in the grid domain: ``q_max^t`` (``q_max`` without ``learn_t``)."""
        t = self.t()
        return self.q_max() if t is None else self.q_max() ** t

    def _free_d(self) -> torch.Tensor:
        if self.log_d is None:
            raise QuantizationError("a fixed-bit quantizer has no free step size")
        cap = self.q_grid()
        if self.bind_min_bits:  # the largest step that still gives min_bits
            cap = cap / levels(float(self.min_bits), self.signed)
        return torch.minimum(torch.exp(self.log_d), cap)

    def continuous_bits(self) -> torch.Tensor:
        """``log2(q_max^t/d + 1) (+ 1 if signed)`` before any rounding (fixed: ``init_bits``)."""
        if self.log_d is None:
            return torch.full_like(self.log_q_max, float(self.init_bits))
        b = torch.log2(self.q_grid() / self._free_d() + 1.0)
        return b + 1.0 if self.signed else b

    def bits(self) -> torch.Tensor:
        """The training bit-width (differentiable): continuous ``b``, or in restricted mode the
        next allowed value ``b'`` with a straight-through gradient to ``b``."""
        b = self.continuous_bits()
        if not self.restricted or self.fixed_bits:
            return b
        allowed = torch.tensor(self.allowed_bits, dtype=b.dtype, device=b.device)
        idx = torch.searchsorted(allowed, (b - BITS_TOL).detach().contiguous())
        hard = allowed[idx.clamp_max(len(self.allowed_bits) - 1)]
        return b + (hard - b).detach()

    def d(self) -> torch.Tensor:
        """The effective step size used by the forward pass."""
        if self.fixed_bits:
            return self.q_grid() / levels(float(self.init_bits), self.signed)
        if self.restricted:
            return self.q_grid() / levels(self.bits(), self.signed)
        return self._free_d()

    # ------------------------------------------------------------------------------ read-out
    def readout_bits(self) -> int:
        """Integer bit-width for deployment: ``ceil(b)`` clamped to ``[max(2, min_bits),
        max_bits]`` (restricted: the next allowed value). Per channel: the largest [choice]."""
        if self.fixed_bits:
            return self.init_bits
        with torch.no_grad():
            b = float(self.continuous_bits().max()) - BITS_TOL
        if self.restricted:
            return next((a for a in self.allowed_bits if a >= b), self.allowed_bits[-1])
        return int(min(max(math.ceil(b), self.min_bits, 2), self.max_bits))

    def snapped(self) -> Snapped:
        """``(d, q_max, bits)`` with ``q_max`` (grid domain) exactly ``d * levels(bits)``.

        Every mode keeps the learned ``q_max`` and sets ``d = q_max / levels(bits)`` (a slightly
        finer grid when ``bits = ceil(b)`` rounds up). With ``learn_t`` the returned ``q_max`` is
        in the input domain.
        """
        bits = self.readout_bits()
        n = float(levels(float(bits), self.signed))
        with torch.no_grad():
            # [choice] Every mode keeps the learned clipping range q_max and refines the step to
            # d = q_max / levels(ceil b). Keeping d and widening q_max instead (the other reading
            # of "snap q_max to a multiple of d") lets through the values the trained network
            # learned to clip: measured on resnet20 after a DJPQ fine-tune at ~3-4 bits, test
            # accuracy fell from 91.2 % (continuous bits) to 80.4 % with that choice.
            q_grid = self.q_grid().clone()
            d = q_grid / n
            t = self.t()
            q_max = q_grid if t is None else q_grid ** (1.0 / t)
        return Snapped(d, q_max, bits)

    def snap_(self) -> None:
        """Set the parameters to their read-out values in place, so that the forward pass
        computes exactly the deployed grid (:meth:`snapped`): what ``convert`` integerizes."""
        s = self.snapped()
        with torch.no_grad():
            self.log_q_max.copy_(torch.log(s.q_max))
            if self.log_d is not None and not self.restricted:
                self.log_d.copy_(torch.log(s.d))

    # ------------------------------------------------------------------------------- forward
    def _shaped(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.per_tensor:
            return p
        if x.ndim <= self.channel_dim or x.shape[self.channel_dim] != p.shape[0]:
            raise QuantizationError(
                f"per-channel quantizer for {p.shape[0]} channels on dim {self.channel_dim} got a "
                f"tensor of shape {tuple(x.shape)}"
            )
        shape = [1] * x.ndim
        shape[self.channel_dim] = p.shape[0]
        return p.reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (regardless of ``calibrating``); the result has ``x``'s dtype."""
        d, q_grid = self._shaped(self.d(), x), self._shaped(self.q_grid(), x)
        t = self.t()
        if t is None:
            return dq_quantize(x, d, q_grid, self.signed).to(x.dtype)
        q = dq_quantize(_signed_pow(x, t), d, q_grid, self.signed)
        return _signed_pow(q, 1.0 / t).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity when disabled or calibrating (recording the range), else :meth:`quantize`."""
        if not self.enabled:
            return x
        if self.calibrating:
            self.observe(x)
            return x
        return self.quantize(x)

    # --------------------------------------------------------------------------- calibration
    def start_calibration(self) -> None:
        """Forget observed statistics and switch to observing."""
        self.obs_min.fill_(math.inf)
        self.obs_max.fill_(-math.inf)
        self.obs_count = 0
        self.calibrating = True

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record the range of ``x`` (only while ``calibrating``)."""
        if not self.calibrating:
            raise QuantizationError(
                "observe() called on a quantizer that is not calibrating; "
                "call start_calibration() first"
            )
        rows = x.detach().float()
        rows = rows.reshape(1, -1) if self.per_tensor else rows.movedim(self.channel_dim, 0)
        rows = rows.reshape(rows.shape[0], -1)
        if rows.shape[1] == 0:
            return
        shape = self.obs_min.shape
        self.obs_min.copy_(torch.minimum(self.obs_min, rows.amin(1).reshape(shape)))
        if self.observer == "minmax":
            hi = rows.abs().amax(1) if self.signed else rows.amax(1)
            self.obs_max.copy_(torch.maximum(self.obs_max, hi.reshape(shape)))
        else:
            vals = rows.abs() if self.signed else rows
            k = max(1, math.ceil(self.percentile / 100.0 * vals.shape[1]))
            hi = vals.kthvalue(k, dim=1).values.reshape(shape)
            prev = torch.where(torch.isfinite(self.obs_max), self.obs_max, hi)
            self.obs_max.copy_((prev * self.obs_count + hi) / (self.obs_count + 1))
        self.obs_count += 1

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Set ``q_max`` from the observed range and ``d = q_max^t / levels(init_bits)``; stop
        observing. ``obs_max`` holds ``max|x|`` (signed) or ``max x`` (unsigned)."""
        if self.obs_count == 0:
            raise QuantizationError(
                "finish_calibration(): the quantizer observed no data; "
                "run calibration batches through the model first"
            )
        rng = self.obs_max.clamp_min(MIN_RANGE)
        if not bool(torch.isfinite(rng).all()):
            raise QuantizationError(
                "finish_calibration(): the observed range is not finite "
                "(NaN/Inf in the calibration activations)"
            )
        self.log_q_max.copy_(torch.log(rng))
        if self.log_d is not None:
            n = float(levels(float(self.init_bits), self.signed))
            self.log_d.copy_(torch.log(self.q_grid() / n))
        self.calibrating = False

    def check_finite(self, name: str) -> None:
        """Raise :class:`QuantizationError` naming this quantizer on NaN/Inf/zero parameters."""
        for pname, param in self.named_parameters(recurse=False):
            # a raw parameter at +Inf can hide behind a clamp (d = min(exp(log_d), q_max))
            if not bool(torch.isfinite(param.detach()).all()):
                raise QuantizationError(
                    f"quantizer '{name}': parameter {pname} is not finite "
                    f"({param.detach().flatten()[:8].tolist()}); training diverged — lower the "
                    "learning rate of the quantizer parameters"
                )
        with torch.no_grad():
            values = {"q_max": self.q_max(), "d": self.d()}
            if self.log_t is not None:
                values["t"] = torch.exp(self.log_t)
        for pname, value in values.items():
            if not bool((torch.isfinite(value) & (value > 0)).all()):
                raise QuantizationError(
                    f"quantizer '{name}': {pname} is not finite and positive ({value.tolist()}); "
                    "training diverged — lower the learning rate of the quantizer parameters"
                )

    def extra_repr(self) -> str:
        mode = "fixed" if self.fixed_bits else "restricted" if self.restricted else "learned"
        return (
            f"signed={self.signed}, init_bits={self.init_bits}, bits={mode}, "
            f"per_tensor={self.per_tensor}, learn_t={self.learn_t}, calibrating={self.calibrating}"
        )


def _check_args(
    init_bits: int,
    min_bits: int,
    max_bits: int,
    allowed_bits: Sequence[int],
    per_tensor: bool,
    n_channels: int | None,
) -> None:
    if not 2 <= min_bits <= max_bits <= 32:
        raise ConfigError(
            f"need 2 <= min_bits <= max_bits <= 32, got min_bits={min_bits}, max_bits={max_bits}"
        )
    if not 2 <= init_bits <= 32:
        raise ConfigError(f"init_bits must lie in [2, 32], got {init_bits}")
    allowed = tuple(allowed_bits)
    if (
        not allowed
        or any(b < 2 or b & (b - 1) for b in allowed)
        or list(allowed) != sorted(set(allowed))
    ):
        raise ConfigError(
            f"allowed_bits must be strictly increasing powers of two >= 2, got {allowed}"
        )
    if not per_tensor and (n_channels is None or n_channels < 1):
        raise ConfigError(f"per-channel quantization needs n_channels >= 1, got {n_channels}")


def _check_observer(observer: str, percentile: float, init_q_max: float) -> None:
    if observer not in ("minmax", "percentile"):
        raise ConfigError(f"observer must be 'minmax' or 'percentile', got {observer!r}")
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile must lie in (0, 100], got {percentile}")
    if not (math.isfinite(init_q_max) and init_q_max > 0):
        raise ConfigError(f"init_q_max must be finite and > 0, got {init_q_max}")
