"""TVM-facing (numpy only): a requantization in int32 that equals the int64 one for every input.

A written kernel's epilogue maps the int32 accumulator ``z`` of output channel ``c`` to a code

    f(z) = clip(floor((z * M + B) / 2^s), qmin, qmax)

with ``M = m * 2^acc_shift`` and ``B = bias * m + R`` (``R`` the rounding half; ``emit.py``). In
int64 that costs, per 8 AVX2 lanes, two sign extensions, two ``vpmuldq``, two 64-bit adds, the
high-word shuffle, a shift and the clip: measured 0.04 ms of a 0.14 ms resnet20 shortcut kernel
at batch 32, a tenth of a 3x3 layer (``benchmarks/latency``, the int32 epilogue section).

``f`` is a non-decreasing step function (``M > 0``): it is fixed by ``clip(f(z)) >= j  <=>  z >=
T(j)`` for the levels ``j`` in ``(qmin, qmax]``, with thresholds ``T(j) = ceil((j * 2^s - B) /
M)``. Every other function with the same thresholds gives the same codes. :func:`plan_int32`
finds, per channel, a clamp ``[lo, hi]`` (just below the first threshold, at the last one) and
``m32, r32, s32`` such that

    g(z) = clip((clamp(z, lo, hi) * m32 + r32) >> s32, qmin, qmax)

has exactly the thresholds of ``f``, with every intermediate value inside int32 for ``z`` in
``[lo, hi]``: a ``vpmaxsd``/``vpminsd`` pair, one ``vpmulld``, a ``vpaddd``, a ``vpsravd`` and the
clip per 8 lanes. The check is the construction itself (exact integer arithmetic on the
thresholds, no sampling): for a candidate ``(m32, s32)`` each threshold ``j`` confines ``r32``
to ``[j * 2^s32 - T(j) * m32, j * 2^s32 - (T(j) - 1) * m32)``; a plan exists when these
intervals meet and the clamp's ends stay inside int32. Where none is found (a channel with a
negative multiplier, thresholds too dense for 31 bits), :func:`plan_int32` returns ``None`` and
the kernel keeps the int64 epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Int32Requant", "plan_int32", "reference_requant"]

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
#: Largest ``s32`` tried: ``2^s32`` and every ``j * 2^s32`` stay far inside int64 for the check.
MAX_SHIFT = 30


@dataclass(frozen=True)
class Int32Requant:
    """Per-channel int32 epilogue parameters (all int32 arrays of one length):
    ``clip((clamp(z, lo, hi) * m + r) >> s, qmin, qmax)``."""

    lo: np.ndarray
    hi: np.ndarray
    m: np.ndarray
    r: np.ndarray
    s: np.ndarray

    def apply(self, z: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
        """The kernel's arithmetic in numpy (``z``: ``[..., C]`` int32 accumulators), int64
        result; every intermediate is checked to fit int32, as the plan guarantees."""
        a = np.clip(z.astype(np.int64), self.lo, self.hi)
        product = a * self.m
        total = product + self.r
        if product.min(initial=0) < INT32_MIN or product.max(initial=0) > INT32_MAX \
                or total.min(initial=0) < INT32_MIN or total.max(initial=0) > INT32_MAX:
            raise AssertionError("an int32 epilogue intermediate left int32")
        return np.clip(total >> self.s, qmin, qmax)


def reference_requant(z: np.ndarray, mult: np.ndarray, add: np.ndarray, shift: np.ndarray,
                      qmin: int, qmax: int) -> np.ndarray:
    """``clip(floor((z * M + B) / 2^s), qmin, qmax)`` in exact integers (Python ints), per
    channel of the last axis: the int64 epilogue's value, for tests."""
    def exact(a: object) -> np.ndarray:  # Python ints (no int64 wrap-around)
        return np.array(np.asarray(a).tolist(), dtype=object)

    out = (exact(z) * exact(mult) + exact(add)) >> exact(shift)
    return np.clip(out, qmin, qmax).astype(np.int64)


def _thresholds(mult: int, add: int, shift: int, qmin: int,
                qmax: int) -> tuple[int, int, np.ndarray] | None:
    """``(first, last, T)``: the levels ``first < j <= last`` whose thresholds lie inside int32
    (``T`` as int64, ascending), ``first``/``last`` the levels every/no int32 input reaches;
    ``None`` for a negative multiplier (a non-increasing ``f``: not planned)."""
    if mult < 0:
        return None
    levels = np.arange(qmin + 1, qmax + 1, dtype=object)
    if mult == 0 or not levels.size:  # a constant channel
        level = min(max(add >> shift, qmin), qmax)
        return level, level, np.zeros(0, np.int64)
    t = -((add - levels * (1 << shift)) // mult)  # ceil((j * 2^s - B) / M), exact
    first, last = qmin, qmax
    reached = t <= INT32_MIN  # every int32 input is at level >= j
    if reached.any():
        first = qmin + int(np.flatnonzero(reached)[-1]) + 1
    unreached = t > INT32_MAX  # no int32 input reaches level j
    if unreached.any():
        last = qmin + int(np.flatnonzero(unreached)[0])
    return first, last, np.asarray(t[first - qmin:last - qmin], dtype=np.int64)


def _channel(mult: int, add: int, shift: int, qmin: int,
             qmax: int) -> tuple[int, int, int, int, int] | None:
    """``(lo, hi, m32, r32, s32)`` of one channel, or ``None``."""
    found = _thresholds(mult, add, shift, qmin, qmax)
    if found is None:
        return None
    first, last, t = found
    if first == last:  # constant: r32 >> 0 is the level, clamp irrelevant
        return 0, 0, 0, first, 0
    lo, hi = int(t[0]) - 1, int(t[-1])
    levels = np.arange(first + 1, last + 1, dtype=np.int64)
    reach = max(abs(lo), abs(hi), 1)
    # the largest s32 whose multiplier keeps |z * m32| below 2^31 on [lo, hi], then smaller ones
    top = min(MAX_SHIFT, shift + (INT32_MAX // (reach * 2)).bit_length() - mult.bit_length())
    for s32 in range(max(top, 0), -1, -1):
        exact = mult << (s32 - shift) if s32 >= shift else None
        if exact is not None:
            candidates = [exact]
        else:
            down = mult >> (shift - s32)
            candidates = [down, down + 1]
        for m32 in candidates:
            if m32 <= 0 or reach * m32 > INT32_MAX:
                continue
            step = levels << s32
            r_lo = int((step - t * m32).max())
            r_hi = int((step - (t - 1) * m32).min()) - 1
            if first > qmin:  # the level below first must not appear at lo
                r_lo = max(r_lo, (first << s32) - lo * m32)
            if last < qmax:  # nor the level above last at hi
                r_hi = min(r_hi, ((last + 1) << s32) - hi * m32 - 1)
            if r_lo > r_hi:
                continue
            natural = add >> (shift - s32) if s32 <= shift else add << (s32 - shift)
            r32 = min(max(natural, r_lo), r_hi)
            ends = (lo * m32 + r32, hi * m32 + r32)
            if INT32_MIN <= min(ends) and max(ends) <= INT32_MAX:
                return lo, hi, m32, r32, s32
    return None


def plan_int32(mult: np.ndarray, add: np.ndarray, shift: np.ndarray, qmin: int,
               qmax: int) -> Int32Requant | None:
    """The int32 epilogue of a layer whose int64 one is ``clip(floor((z * mult + add) /
    2^shift), qmin, qmax)`` per channel (``mult``, ``add``, ``shift``: per-channel integer
    arrays of equal length; any magnitudes), or ``None`` if some channel has none."""
    rows = []
    for mu, ad, sh in zip(np.asarray(mult).reshape(-1).tolist(),
                          np.asarray(add).reshape(-1).tolist(),
                          np.asarray(shift).reshape(-1).tolist(), strict=True):
        if sh < 0:
            return None
        row = _channel(int(mu), int(ad), int(sh), int(qmin), int(qmax))
        if row is None:
            return None
        rows.append(row)
    cols = np.asarray(rows, dtype=np.int64).reshape(-1, 5).T
    lo, hi, m, r, s = (c.astype(np.int32) for c in cols)
    return Int32Requant(lo, hi, m, r, s)
