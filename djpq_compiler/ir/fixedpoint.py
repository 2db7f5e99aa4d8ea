"""Fixed-point primitives: integer ranges, dyadic multipliers and requantization.

Everything here is the *definition* of the integer arithmetic that every backend reproduces
(see ``docs/integer_semantics.md``). Integer tensors are carried in ``torch.int64`` containers
whatever their logical bit-width; the logical range is enforced by explicit clips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from djpq_compiler.errors import ConfigError, QuantizationError

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "MAX_SHIFT",
    "abs_max",
    "MultiplierLike",
    "as_int_tensor",
    "channel_view",
    "dyadic_round",
    "multiplier_bits",
    "qrange",
    "quantize_multiplier",
    "quantize_multipliers",
    "requantize",
    "rescale",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
#: Largest right shift of a requantization; keeps the rounding term ``1 << (shift - 1)`` in int64.
MAX_SHIFT = 62

#: A multiplier or shift: a Python int (per tensor) or a 1-D integer tensor (per channel, dim 1).
MultiplierLike = int | torch.Tensor


def qrange(bits: int, signed: bool, narrow: bool | None = None) -> tuple[int, int]:
    """Return the integer range ``(qmin, qmax)`` of a ``bits``-wide quantized tensor.

    Convention: weights are signed and *narrow* (symmetric, ``-(2^(b-1)-1) .. 2^(b-1)-1``,
    which is what DQ's signed ``b = log2(q_max/d + 1) + 1`` describes); activations are unsigned
    and full range ``0 .. 2^b - 1``. ``narrow`` drops the lowest code: signed full range is
    ``-2^(b-1) .. 2^(b-1)-1``; unsigned narrow is ``1 .. 2^b - 1``.

    Args:
        bits: Bit-width, an int in ``2..16``.
        signed: Whether the range is signed.
        narrow: Drop the lowest code. Defaults to ``signed`` (narrow weights, full activations).

    Returns:
        The inclusive bounds ``(qmin, qmax)``.

    Raises:
        ConfigError: ``bits`` is not an int in ``2..16``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"bit-width must be an int in 2..16, got {bits!r}")
    narrow = signed if narrow is None else narrow
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    return qmin + int(narrow), qmax


def quantize_multiplier(real_multiplier: float, bits: int = 31) -> tuple[int, int]:
    """Approximate a positive real multiplier by the dyadic number ``m / 2^shift``.

    ``m`` is normalized to ``bits`` significant bits (``2^(bits-1) <= m < 2^bits``) and rounded to
    nearest (ties away from zero), so the relative error is at most ``2^-bits`` (``2^-31`` by
    default). Two edge cases reduce that precision: multipliers ``>= 2^bits / 2`` use ``shift = 0``
    and ``m = round(real)`` (error ``<= 0.5 / real``); tiny multipliers cap ``shift`` at
    :data:`MAX_SHIFT` and keep fewer significant bits (error ``<= 2^-63 / real``).

    Args:
        real_multiplier: The real multiplier, finite and ``> 0``.
        bits: Significant bits of ``m``, ``1..31`` (``m`` is always a positive int32).

    Returns:
        ``(m, shift)`` with ``0 < m < 2^31`` and ``0 <= shift <= MAX_SHIFT``.

    Raises:
        QuantizationError: The multiplier is not positive and finite, is ``>= 2^31 - 0.5``, or is
            so small (``< 2^-63``) that it rounds to zero.
        ConfigError: ``bits`` is not in ``1..31``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 31:
        raise ConfigError(f"multiplier bits must be an int in 1..31, got {bits!r}")
    real = float(real_multiplier)
    if not math.isfinite(real) or real <= 0.0:
        raise QuantizationError(
            f"requantization multiplier must be finite and > 0, got {real_multiplier!r}; "
            "check the scales of the quantizers involved (NaN/Inf/zero step size?)"
        )
    _, exponent = math.frexp(real)  # real = f * 2^exponent, 0.5 <= f < 1
    shift = min(max(bits - exponent, 0), MAX_SHIFT)
    m = _round_half_away(math.ldexp(real, shift))  # exact scaling by a power of two
    if m >= 2**bits and shift > 0:  # rounding carried into a new bit
        m, shift = (m + 1) // 2, shift - 1
    if m > INT32_MAX:
        raise QuantizationError(
            f"requantization multiplier {real!r} is too large for an int32 multiplier "
            "(must be < 2^31); the output scale is far smaller than the input scales"
        )
    if m == 0:
        raise QuantizationError(
            f"requantization multiplier {real!r} is below 2^-63 and rounds to zero; "
            "the output scale is far larger than the input scales"
        )
    return m, shift


def _round_half_away(value: float) -> int:
    """Round a float to the nearest int, ties away from zero (exact for any finite float)."""
    floor = math.floor(abs(value))
    return int(math.copysign(floor + (abs(value) - floor >= 0.5), value))


def quantize_multipliers(
    reals: Sequence[float] | torch.Tensor, bits: int = 31
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply :func:`quantize_multiplier` elementwise (per-channel requantization).

    Args:
        reals: 1-D sequence or tensor of positive finite multipliers.
        bits: Significant bits of each ``m``.

    Returns:
        ``(m, shift)`` as two 1-D ``int64`` tensors.
    """
    values = reals.detach().double().flatten().tolist() if torch.is_tensor(reals) else reals
    pairs = [quantize_multiplier(float(r), bits) for r in values]
    if not pairs:
        raise QuantizationError("cannot quantize an empty list of multipliers")
    ms, shifts = zip(*pairs, strict=True)
    return torch.tensor(ms, dtype=torch.int64), torch.tensor(shifts, dtype=torch.int64)


def multiplier_bits(acc_bound: int) -> int:
    """Return the multiplier precision that keeps ``acc * m + round`` inside int64.

    With ``|acc| <= acc_bound < 2^a`` and ``m < 2^bits``, ``|acc * m| < 2^(a + bits)``; the
    rounding term is at most ``2^61``; so ``a + bits <= 62`` guarantees no overflow. Any
    accumulator that fits int32 (``a <= 31``) gets the full 31 bits.

    Args:
        acc_bound: Upper bound on ``|acc|`` (e.g. from ``accumulator_bound``).

    Returns:
        ``min(31, 62 - acc_bound.bit_length())``.

    Raises:
        QuantizationError: The bound leaves fewer than 8 bits of multiplier precision.
    """
    bits = min(31, 62 - int(acc_bound).bit_length())
    if bits < 8:
        raise QuantizationError(
            f"accumulator bound {acc_bound} is too wide for an int64 requantization "
            "(fewer than 8 multiplier bits left); use fewer bits or smaller layers"
        )
    return bits


def as_int_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``x`` as an ``int64`` tensor, rejecting floating-point or complex input.

    Raises:
        QuantizationError: ``x`` is not an integer tensor.
    """
    if not torch.is_tensor(x) or x.dtype.is_floating_point or x.dtype.is_complex:
        got = x.dtype if torch.is_tensor(x) else type(x).__name__
        raise QuantizationError(f"{name} must be an integer tensor, got {got}")
    if x.dtype == torch.bool:
        raise QuantizationError(f"{name} must be an integer tensor, got torch.bool")
    return x.to(torch.int64)


def channel_view(value: MultiplierLike, ref: torch.Tensor, name: str) -> torch.Tensor:
    """Broadcast a per-tensor int or a per-channel 1-D tensor along dim 1 of ``ref``.

    Raises:
        QuantizationError: ``value`` is not an int/integer tensor, or its length is not 1 or
            ``ref.shape[1]``.
    """
    if torch.is_tensor(value):
        value = as_int_tensor(value, name)
        if value.ndim == 0:
            return value
        if value.ndim != 1 or ref.ndim < 2 or value.shape[0] not in (1, ref.shape[1]):
            raise QuantizationError(
                f"per-channel {name} must be 1-D with one entry per channel of dim 1, got shape "
                f"{tuple(value.shape)} for a tensor of shape {tuple(ref.shape)}"
            )
        return value.reshape((1, -1) + (1,) * (ref.ndim - 2))
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuantizationError(f"{name} must be an int or an integer tensor, got {value!r}")
    return torch.tensor(value, dtype=torch.int64)


def _check_multiplier(m: torch.Tensor, shift: torch.Tensor) -> None:
    """Reject multipliers/shifts outside ``0 < m < 2^31`` and ``0 <= shift <= MAX_SHIFT``."""
    if m.numel() and (int(m.min()) <= 0 or int(m.max()) > INT32_MAX):
        raise QuantizationError(f"multiplier m must be in 1..2^31-1, got range "
                                f"[{int(m.min())}, {int(m.max())}]")
    if shift.numel() and (int(shift.min()) < 0 or int(shift.max()) > MAX_SHIFT):
        raise QuantizationError(f"shift must be in 0..{MAX_SHIFT}, got range "
                                f"[{int(shift.min())}, {int(shift.max())}]")


def abs_max(t: torch.Tensor) -> int:
    """``max|t|`` as a Python int without materialising ``|t|`` (one min/max pass)."""
    lo, hi = torch.aminmax(t)
    return max(-int(lo), int(hi))


def _check_no_overflow(acc: torch.Tensor, m: torch.Tensor, shift: torch.Tensor) -> None:
    """Raise if ``|acc| * m + 2^(shift-1)`` could leave int64 for any element."""
    if acc.numel() == 0:
        return
    acc_max = abs_max(acc)
    worst = acc_max * int(m.max()) + (1 << max(int(shift.max()) - 1, 0))
    if worst > INT64_MAX:
        raise QuantizationError(
            f"requantization overflows int64: max|acc| = {acc_max}, "
            f"max m = {int(m.max())}; choose the multiplier precision with "
            "multiplier_bits(accumulator_bound(...))"
        )


def requantize(
    acc: torch.Tensor,
    m: MultiplierLike,
    shift: MultiplierLike,
    zero_point: MultiplierLike = 0,
    qmin: int | None = None,
    qmax: int | None = None,
) -> torch.Tensor:
    """Requantize an integer accumulator with a dyadic multiplier (round half up).

    ``out = clip(((acc * m + (1 << (shift - 1))) >> shift) + zero_point, qmin, qmax)`` in int64,
    ``>>`` an arithmetic (flooring) shift, i.e. ``floor(acc * m / 2^shift + 1/2)``: the nearest
    integer to ``acc * m / 2^shift``, ties towards +inf. ``shift == 0`` has no rounding term.

    Args:
        acc: Integer accumulator (any integer dtype; computed in int64).
        m: Multiplier ``0 < m < 2^31``: an int or a 1-D tensor per channel along dim 1.
        shift: Right shift ``0..62``: an int or a 1-D tensor per channel along dim 1.
        zero_point: Output zero point, int or per-channel tensor.
        qmin: Lower clip bound, or ``None`` for no lower clip.
        qmax: Upper clip bound, or ``None`` for no upper clip.

    Returns:
        An ``int64`` tensor shaped like ``acc``.

    Raises:
        QuantizationError: Bad ``m``/``shift``, or ``|acc| * m + 2^(shift-1) >= 2^63``.
    """
    acc = as_int_tensor(acc, "acc")
    out = dyadic_round(acc, channel_view(m, acc, "m"), channel_view(shift, acc, "shift"))
    out = out + channel_view(zero_point, acc, "zero_point")
    if qmin is not None or qmax is not None:
        out = out.clamp(min=qmin, max=qmax)
    return out


def dyadic_round(acc: torch.Tensor, m: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``(acc * m + R) >> shift``, ``R = 2^(shift-1)`` (0 where ``shift == 0``), in int64: the
    nearest integer to ``acc * m / 2^shift``, ties towards +inf. ``m`` and ``shift`` are int64
    tensors broadcasting against ``acc`` (per tensor, per channel or per position).

    Raises:
        QuantizationError: Bad ``m``/``shift``, or the product could leave int64.
    """
    _check_multiplier(m, shift)
    _check_no_overflow(acc, m, shift)
    one = torch.ones((), dtype=torch.int64)
    rounding = torch.where(shift > 0, one << (shift - 1).clamp(min=0), 0)
    return (acc * m + rounding) >> shift


def rescale(
    q: torch.Tensor,
    m: MultiplierLike | None,
    shift: MultiplierLike,
    in_zero_point: int,
    out_zero_point: int,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Move a quantized tensor to another scale/zero point: ``requantize(q - z_in, ...) + z_out``.

    ``m=None`` means the scales are equal: ``clip(q - z_in + z_out, qmin, qmax)`` exactly (no
    multiplication; identical to ``m, shift = 2^30, 30``).

    Returns:
        An ``int64`` tensor in ``[qmin, qmax]``.
    """
    centered = as_int_tensor(q, "q") - in_zero_point
    if m is None:
        return (centered + out_zero_point).clamp(qmin, qmax)
    return requantize(centered, m, shift, out_zero_point, qmin, qmax)
