"""Lane-wise integer chains (``IntAdd``, ``Requantize``, ``IntClip``) as one written kernel.

A residual block's tail in a converted net is a chain of per-tensor lane-wise integer ops, e.g.
``Requantize(shortcut) -> IntAdd(conv, .) -> IntClip -> Requantize`` (resnet20). Each op's
reference semantics (``djpq_compiler/ir``) is an int64 dyadic requantization
``floor((q * m + 2^(s-1)) / 2^s)``; emitted op by op and fused by TVM, every element pays several
int64 multiplies (emulated on AVX2). This module plans such a chain as one expression tree over
its external inputs (:class:`Leaf`, :class:`Requant`, :class:`Sum`, :class:`Clamp`) and builds
one scheduled PrimFunc for it (flat loop over all elements, vectorized, parallel over chunks),
reading and writing any layout (the ops are per tensor, so packed ``NCHW{L}c`` values are read
as they are; padding lanes hold codes in the value's range and map to codes in the result's).

**int32 wherever it is provably exact.** With ``m = mh * 2^u + ml`` (``0 <= ml < 2^u``,
``u <= s - 1``) the requantization is exactly

    ``floor((q * mh + 2^(s-1-u) + floor(q * ml / 2^u)) / 2^(s-u))``

(``q * m + 2^(s-1) = (q * mh + 2^(s-1-u)) * 2^u + q * ml`` and nested floors of power-of-two
divisions compose). With ``|q| <= Q`` from the operand's code range, every term fits int32 iff
``Q * ml <= 2^31 - 1`` and ``Q * mh + 2^(s-1-u) + Q <= 2^31 - 1``: :func:`split_multiplier`
picks such a ``u`` (preferring ``ml == 0``: no correction term). Where the code range has at
most :data:`EXHAUSTIVE_MAX` codes, the correction term ``floor(q * ml / 2^u)`` is dropped if an
exhaustive comparison with the reference over the whole range (after the op's clip) shows it
never changes the result. Sums are int32 when both operands are and the summed range fits.
Anything else (typically ``IntAdd``'s final rescale, ``sum * out_m`` with the 2^20 headroom of
``add_rescale``) stays int64, and the record says which steps did and why. Where the target
multiplies 64-bit lanes natively (AVX-512DQ), the kernel is built all-int64 instead, which
measured faster there (:func:`prefers_int32`; ``benchmarks/latency/PROFILE.md``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EXHAUSTIVE_MAX", "ChainRecord", "Clamp", "Expr", "Leaf", "Requant", "SplitMultiplier",
           "Sum", "build_chain_kernel", "chain_steps", "eltwise_table", "leaves_of",
           "reference_eval", "split_multiplier", "value_range"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Largest code range checked exhaustively when deciding to drop a correction term.
EXHAUSTIVE_MAX = 1 << 16


# ----------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Leaf:
    """External input ``index`` of the chain, codes in ``[lo, hi]``, container ``dtype``."""

    index: int
    lo: int
    hi: int
    dtype: str


@dataclass(frozen=True)
class Requant:
    """``clip(floor((child * m + 2^(shift-1)) / 2^shift), qmin, qmax)`` (no rounding term for
    ``shift == 0``; ``None`` bounds do not clip)."""

    child: Expr
    m: int
    shift: int
    qmin: int | None = None
    qmax: int | None = None

    def __post_init__(self) -> None:
        # value_range and the int32 proofs assume a monotone non-decreasing step
        if self.m < 0 or self.shift < 0:
            from djpq_compiler.errors import BackendError

            raise BackendError(f"lane-wise chain: requantization multiplier {self.m} / shift "
                               f"{self.shift} must be >= 0 (a converted model never has "
                               "others); this is a bug, please report it")


@dataclass(frozen=True)
class Sum:
    """``a + b`` (exact)."""

    a: Expr
    b: Expr


@dataclass(frozen=True)
class Clamp:
    """``min(max(child, lo), hi)`` with ``lo <= hi``."""

    child: Expr
    lo: int
    hi: int


Expr = Leaf | Requant | Sum | Clamp


def _rounding(shift: int) -> int:
    return 1 << (shift - 1) if shift > 0 else 0


def _requant_scalar(q: int, m: int, shift: int) -> int:
    return (q * m + _rounding(shift)) >> shift


def _clip(lo: int, hi: int, qmin: int | None, qmax: int | None) -> tuple[int, int]:
    if qmin is not None:
        lo, hi = max(lo, qmin), max(hi, qmin)
    if qmax is not None:
        lo, hi = min(lo, qmax), min(hi, qmax)
    return lo, hi


@functools.lru_cache(maxsize=4096)
def value_range(expr: Expr) -> tuple[int, int]:
    """Exact bounds of ``expr`` from its leaves' ranges (every op is monotone, ``m > 0``)."""
    if isinstance(expr, Leaf):
        return expr.lo, expr.hi
    if isinstance(expr, Requant):
        lo, hi = value_range(expr.child)
        return _clip(_requant_scalar(lo, expr.m, expr.shift),
                     _requant_scalar(hi, expr.m, expr.shift), expr.qmin, expr.qmax)
    if isinstance(expr, Sum):
        (a_lo, a_hi), (b_lo, b_hi) = value_range(expr.a), value_range(expr.b)
        return a_lo + b_lo, a_hi + b_hi
    lo, hi = value_range(expr.child)
    return _clip(lo, hi, expr.lo, expr.hi)


def leaves_of(expr: Expr) -> list[Leaf]:
    """The leaves of ``expr``, left to right."""
    if isinstance(expr, Leaf):
        return [expr]
    if isinstance(expr, Sum):
        return leaves_of(expr.a) + leaves_of(expr.b)
    return leaves_of(expr.child)


def reference_eval(expr: Expr, inputs: list[np.ndarray]) -> np.ndarray:
    """The reference semantics of ``expr`` in int64 numpy (for tests and the exhaustive check);
    ``inputs[i]`` feeds ``Leaf(i)``."""
    if isinstance(expr, Leaf):
        return np.asarray(inputs[expr.index], dtype=np.int64)
    if isinstance(expr, Requant):
        q = reference_eval(expr.child, inputs)
        out = (q * expr.m + _rounding(expr.shift)) >> expr.shift
        lo = np.iinfo(np.int64).min if expr.qmin is None else expr.qmin
        hi = np.iinfo(np.int64).max if expr.qmax is None else expr.qmax
        return np.clip(out, lo, hi)
    if isinstance(expr, Sum):
        return reference_eval(expr.a, inputs) + reference_eval(expr.b, inputs)
    return np.clip(reference_eval(expr.child, inputs), expr.lo, expr.hi)


# ------------------------------------------------------------------- int32 requantization


@dataclass(frozen=True)
class SplitMultiplier:
    """An exact int32 form of ``floor((q * m + 2^(s-1)) / 2^s)`` on ``q`` in a code range:
    ``(q * mh + add + [floor(q * ml / 2^u)]) >> (s - u)`` (see the module docstring).

    Attributes:
        mh, ml, u: ``m = mh * 2^u + ml``.
        add: ``2^(s-1-u)`` (0 for ``s == 0``).
        shift: ``s - u``.
        correction: Whether ``floor(q * ml / 2^u)`` is computed (else ``ml == 0`` or the
            exhaustive check proved it never matters).
        bound: The largest magnitude of any int32 intermediate.
        why: How exactness was established (for the record).
    """

    mh: int
    ml: int
    u: int
    add: int
    shift: int
    correction: bool
    bound: int
    why: str


def _candidates(q_max: int, m: int, shift: int) -> list[SplitMultiplier]:
    """Every split ``u`` whose int32 intermediates provably fit, largest ``u`` first."""
    if shift == 0:
        return ([SplitMultiplier(m, 0, 0, 0, 0, False, q_max * m, "no shift")]
                if q_max * m <= INT32_MAX else [])
    out = []
    for u in range(min(shift - 1, 31), -1, -1):
        mh, ml = m >> u, m & ((1 << u) - 1)
        add = 1 << (shift - 1 - u)
        low = q_max * ml
        high = q_max * mh + add + (q_max if ml else 0)
        if low <= INT32_MAX and high <= INT32_MAX:
            out.append(SplitMultiplier(mh, ml, u, add, shift - u, ml != 0, max(low, high),
                                       "m = mh*2^u exactly" if ml == 0 else "correction term"))
    return out


def _drops_correction(split: SplitMultiplier, lo: int, hi: int, m: int, shift: int,
                      qmin: int | None, qmax: int | None) -> bool:
    """Whether ``(q*mh + add) >> (s-u)`` equals the reference for every ``q`` in ``[lo, hi]``
    after the op's clip (checked exhaustively)."""
    if hi - lo + 1 > EXHAUSTIVE_MAX:
        return False
    q = np.arange(lo, hi + 1, dtype=np.int64)
    want = (q * m + _rounding(shift)) >> shift
    got = (q * split.mh + split.add) >> split.shift
    c_lo = np.iinfo(np.int64).min if qmin is None else qmin
    c_hi = np.iinfo(np.int64).max if qmax is None else qmax
    return bool(np.array_equal(np.clip(want, c_lo, c_hi), np.clip(got, c_lo, c_hi)))


@functools.lru_cache(maxsize=4096)
def split_multiplier(lo: int, hi: int, m: int, shift: int, qmin: int | None = None,
                     qmax: int | None = None) -> SplitMultiplier | None:
    """The cheapest exact int32 form of a requantization of codes in ``[lo, hi]``, or ``None``
    when none provably fits int32 (then the step runs in int64).

    Preference: no correction term (``ml == 0``, or dropped after the exhaustive check over the
    range, clip included), then the largest ``u`` with the correction term.
    """
    q_max = max(abs(lo), abs(hi))
    cands = _candidates(q_max, m, shift)
    if not cands:
        return None
    exact = [c for c in cands if not c.correction]
    if exact:
        return exact[0]
    for cand in reversed(cands):  # most precise mh first
        if _drops_correction(cand, lo, hi, m, shift, qmin, qmax):
            return SplitMultiplier(cand.mh, 0, cand.u, cand.add, cand.shift, False,
                                   q_max * cand.mh + cand.add,
                                   f"correction dropped: checked all {hi - lo + 1} codes")
    return cands[0]


# ---------------------------------------------------------------------- plan and record


def _step_text(expr: Requant, lo: int, hi: int, split: SplitMultiplier | None) -> str:
    if split is None:
        q = max(abs(lo), abs(hi))
        return (f"rq(m={expr.m},s={expr.shift}) int64: |q|<={q}, |q|*m={q * expr.m} "
                f"> 2^31-1 for every split")
    return (f"rq(m={expr.m},s={expr.shift}) int32 u={split.u}: |x|<={split.bound} "
            f"({split.why})")


def chain_steps(expr: Expr, int32: bool = True) -> list[str]:
    """One line per requantization of the chain: int32 (with its bound) or int64 (and why);
    ``int32=False``: the kernel was built all-int64 (:func:`prefers_int32`)."""
    if isinstance(expr, Leaf):
        return []
    if isinstance(expr, Sum):
        return chain_steps(expr.a, int32) + chain_steps(expr.b, int32)
    steps = chain_steps(expr.child, int32)
    if isinstance(expr, Requant):
        lo, hi = value_range(expr.child)
        if not int32:
            steps.append(f"rq(m={expr.m},s={expr.shift}) int64: the target multiplies int64 "
                         "lanes natively (avx512dq), measured faster than the int32 forms")
            return steps
        split = (split_multiplier(lo, hi, expr.m, expr.shift, expr.qmin, expr.qmax)
                 if _is_int32(expr.child) else None)
        steps.append(_step_text(expr, lo, hi, split))
    return steps


def prefers_int32(target: Any) -> bool:
    """Whether the chain kernels take their int32 forms on ``target``: everywhere but where the
    CPU multiplies 64-bit lanes natively (AVX-512DQ ``vpmullq``), where the all-int64 kernel
    measured ~10 % faster than the int32 one (the split forms need more multiplies and
    int32/int64 conversions around ``IntAdd``'s int64 step); on AVX2 the int32 kernel is ~27 %
    faster (int64 products are emulated). ``benchmarks/latency/eltwise_kernels.py``."""
    from tvm.target import codegen

    return not bool(codegen.target_has_features("avx512dq", target))


@dataclass(frozen=True)
class ChainRecord:
    """What one fused lane-wise kernel computes and how (one per emitted chain).

    Attributes:
        name: The PrimFunc's name.
        ops: The fx nodes fused into it, in graph order.
        layout: The layout it read and wrote (``"NCHW"`` or ``"NCHW16c"``).
        shape: The shape of its inputs and output.
        steps: :func:`chain_steps`.
        tree: The chain itself.
    """

    name: str
    ops: tuple[str, ...]
    layout: str
    shape: tuple[int, ...]
    steps: tuple[str, ...]
    tree: Expr | None = None

    @property
    def elements(self) -> int:
        """Elements per call."""
        return int(np.prod(self.shape))

    @property
    def int64_steps(self) -> int:
        return sum(" int64" in s for s in self.steps)


def eltwise_table(records: list[ChainRecord]) -> str:
    """Plain-text table of the fused lane-wise kernels (the conv kernels' ``kernel_table``
    counterpart)."""
    if not records:
        return "no fused lane-wise kernels"
    lines = []
    for r in records:
        lines.append(f"{r.name}  {r.layout}  {r.elements:,} elements  ops: {', '.join(r.ops)}")
        lines += [f"    {s}" for s in r.steps]
    int32 = sum(len(r.steps) - r.int64_steps for r in records)
    total = sum(len(r.steps) for r in records) or 1
    lines.append(f"{int32} of {total} requantizations in int32")
    return "\n".join(lines)


# ------------------------------------------------------------------- TVM-facing: the kernel


def _is_int32(expr: Expr, int32: bool = True) -> bool:
    """Whether ``expr`` is computed in int32 by :func:`_emit` (else int64; always int64 but for
    the leaves and the clipped results with ``int32=False``)."""
    lo, hi = value_range(expr)
    if not (INT32_MIN <= lo and hi <= INT32_MAX):
        return False
    if not int32:
        return isinstance(expr, Leaf) and expr.dtype != "int64"
    if isinstance(expr, Leaf):
        return expr.dtype != "int64"
    if isinstance(expr, Sum):
        return _is_int32(expr.a) and _is_int32(expr.b)
    if isinstance(expr, Clamp):
        return True  # clamped to int32 bounds: cast back if its child was int64
    return True  # a Requant whose range fits int32 is cast back after an int64 step


def _dtype(x: Any) -> str:
    """The dtype of a TIR expression (``.ty`` in TVM 0.27)."""
    return str(x.ty.dtype)


def _emit(expr: Expr, tensors: list[Any], index: tuple[Any, ...], int32: bool = True) -> Any:
    """The TIR expression of ``expr`` at ``index``: int32 where :func:`_is_int32`, with the
    int32 split of each requantization where :func:`split_multiplier` finds one (``int32``
    False: every step in int64, the reference's arithmetic, for comparisons)."""
    from tvm import tirx

    if isinstance(expr, Leaf):
        dtype = "int32" if _is_int32(expr, int32) else "int64"
        return tensors[expr.index][index].astype(dtype)
    if isinstance(expr, Sum):
        a, b = _emit(expr.a, tensors, index, int32), _emit(expr.b, tensors, index, int32)
        dtype = "int32" if _is_int32(expr, int32) else "int64"
        return a.astype(dtype) + b.astype(dtype)
    if isinstance(expr, Clamp):
        x = _emit(expr.child, tensors, index, int32)
        x = tirx.max(tirx.min(x, tirx.const(expr.hi, _dtype(x))), tirx.const(expr.lo, _dtype(x)))
        return x.astype("int32") if _is_int32(expr, int32) else x
    return _emit_requant(expr, _emit(expr.child, tensors, index, int32), int32)


def _emit_requant(expr: Requant, x: Any, int32: bool = True) -> Any:
    from tvm import tirx

    lo, hi = value_range(expr.child)
    split = (split_multiplier(lo, hi, expr.m, expr.shift, expr.qmin, expr.qmax)
             if int32 and _dtype(x) == "int32" else None)
    if split is not None:
        i32 = functools.partial(tirx.const, dtype="int32")
        out = x * i32(split.mh) + i32(split.add)
        if split.correction:
            out = out + ((x * i32(split.ml)) >> i32(split.u))
        out = out >> i32(split.shift) if split.shift else out
    else:
        i64 = functools.partial(tirx.const, dtype="int64")
        out = (x.astype("int64") * i64(expr.m) + i64(_rounding(expr.shift))) >> i64(expr.shift)
    if expr.qmax is not None:
        out = tirx.min(out, tirx.const(expr.qmax, _dtype(out)))
    if expr.qmin is not None:
        out = tirx.max(out, tirx.const(expr.qmin, _dtype(out)))
    return out.astype("int32") if _is_int32(expr, int32) else out


def _vector_width(size: int, widest: int = 64) -> int:
    width = widest
    while width > 1 and size % width:
        width //= 2
    return width


#: Elements below which the chain's loop is not parallelized (a thread-pool launch costs more).
PARALLEL_MIN_ELEMENTS = 1 << 14


def build_chain_kernel(expr: Expr, shape: tuple[int, ...], out_dtype: str, target: Any,
                       int32: bool = True) -> Any:
    """The scheduled, flattened PrimFunc computing ``expr`` lane-wise over tensors of ``shape``.

    One loop over every element (the ops are per tensor, so any layout is read as it is),
    vectorized by the largest power of two (<= 64) dividing the innermost extent -- the lanes
    of a packed value -- and parallel over the rest. (A width that does not divide the innermost
    extent would leave per-lane index arithmetic that :func:`~..adapter.flatten_scheduled`
    cannot simplify: gathers instead of vector loads. A flat ``(size,)`` view would avoid that,
    but a Relax reshape around the kernel is a copy in this pipeline.)

    Args:
        expr: The chain; its leaves' dtypes are the inputs' containers.
        shape: The common shape of every input and of the output.
        out_dtype: The output container.
        target: The TVM target (for :func:`~..adapter.flatten_scheduled`).
        int32: ``False`` computes every step in int64 (same schedule; for comparisons).

    Returns:
        A PrimFunc ``(x_0, ..., x_k, out)``, marked scheduled.
    """
    from tvm import s_tir, te

    from ..adapter import flatten_scheduled

    leaves = sorted({leaf.index: leaf for leaf in leaves_of(expr)}.values(),
                    key=lambda leaf: leaf.index)
    if [leaf.index for leaf in leaves] != list(range(len(leaves))):
        raise ValueError(f"chain leaves must be numbered 0..k, got {[x.index for x in leaves]}")
    tensors = [te.placeholder(shape, leaf.dtype, name=f"x{leaf.index}") for leaf in leaves]
    out = te.compute(shape, lambda *i: _emit(expr, tensors, i, int32).astype(out_dtype),
                     name="chain")
    sch = s_tir.Schedule(te.create_prim_func(tensors + [out]))
    loops = sch.get_loops(sch.get_sblock("chain"))
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    size = int(np.prod(shape))
    width = _vector_width(int(shape[-1]) if shape else 1)
    if width > 1:
        outer, inner = sch.split(fused, factors=[None, width])
        sch.vectorize(inner)
    else:
        outer = fused
    if size >= PARALLEL_MIN_ELEMENTS and size // width > 1:
        sch.parallel(outer)
    func = flatten_scheduled(sch.mod["main"], target)
    return func.with_attr("tirx.is_scheduled", True)
