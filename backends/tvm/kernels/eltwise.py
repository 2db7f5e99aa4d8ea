# mypy: disable-error-code="valid-type"
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

**Tables where the arithmetic is the cost.** A chain is a function of its leaves' codes only, and
those ranges are small in a converted net (a residual tail reads a 9-bit conv output and a 4-bit
shortcut: 511 x 16 codes). A chain of two or more leaves (or one with an int64 step) whose
table is small enough for the target (:func:`chain_form`) is computed once per code combination
by :func:`reference_eval` at build time (:func:`tabulate`, so the table is exact by
construction) and the kernel is one lookup per element (:func:`build_table_kernel`: an AVX2
gather of 8 lanes where it applies). Each leaf's code is clamped to its range before indexing,
so padding lanes holding any code stay inside the table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EXHAUSTIVE_MAX", "TABLE_L1_BYTES", "TABLE_MAX_BYTES", "ChainRecord", "Clamp",
           "Expr", "Leaf", "Requant", "SplitMultiplier", "Sum", "build_chain_kernel",
           "build_table_kernel", "chain_form", "chain_steps", "eltwise_table", "leaves_of",
           "leaves_sorted", "reference_eval", "split_multiplier", "table_layout", "table_steps",
           "tabulate", "uses_gather", "value_range"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Largest code range checked exhaustively when deciding to drop a correction term.
EXHAUSTIVE_MAX = 1 << 16
#: Largest table (bytes: code combinations of a chain's leaves times the output container) a
#: chain is tabulated into. resnet20's stage-2 tail, two 9-bit leaves (261,121 one-byte entries,
#: L2-resident), still ran 2x faster as a table than in int32 arithmetic on AVX2.
TABLE_MAX_BYTES = 1 << 18
#: Largest table taken where int64 lanes multiply natively (AVX-512DQ): L1-resident ones only.
TABLE_L1_BYTES = 1 << 15


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


def leaves_sorted(expr: Expr) -> list[Leaf]:
    """The distinct leaves of ``expr`` by index (checked to be numbered ``0..k``)."""
    leaves = sorted({leaf.index: leaf for leaf in leaves_of(expr)}.values(),
                    key=lambda leaf: leaf.index)
    if [leaf.index for leaf in leaves] != list(range(len(leaves))):
        raise ValueError(f"chain leaves must be numbered 0..k, got {[x.index for x in leaves]}")
    return leaves


def table_layout(expr: Expr) -> tuple[int, tuple[int, ...]]:
    """The entries of ``expr``'s table and each leaf's stride in it (row-major over the leaves
    by index: the last leaf's code varies fastest)."""
    sizes = [leaf.hi - leaf.lo + 1 for leaf in leaves_sorted(expr)]
    strides = [int(np.prod(sizes[i + 1:], dtype=np.int64)) for i in range(len(sizes))]
    return int(np.prod(sizes, dtype=np.int64)), tuple(strides)


def tabulate(expr: Expr, out_dtype: str) -> np.ndarray:
    """``expr`` on every combination of its leaves' codes, by :func:`reference_eval`, flattened
    as :func:`table_layout` says, in ``out_dtype`` (which must hold :func:`value_range`), then
    zero padding up to :func:`_table_length` (never indexed: codes are clipped into range)."""
    leaves = leaves_sorted(expr)
    grids = np.meshgrid(*[np.arange(leaf.lo, leaf.hi + 1, dtype=np.int64) for leaf in leaves],
                        indexing="ij")
    values = reference_eval(expr, list(grids)).reshape(-1)
    info = np.iinfo(np.dtype(out_dtype))
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise ValueError(f"chain values [{values.min()}, {values.max()}] do not fit {out_dtype}")
    table = np.zeros(_table_length(values.size, out_dtype), dtype=out_dtype)
    table[:values.size] = values
    return table


def _has_int64_step(expr: Expr) -> bool:
    """Whether the int32 arithmetic form of ``expr`` still computes a step in int64."""
    if isinstance(expr, Leaf):
        return False
    if isinstance(expr, Sum):
        return (_has_int64_step(expr.a) or _has_int64_step(expr.b)
                or not _is_int32(expr))
    if isinstance(expr, Requant):
        lo, hi = value_range(expr.child)
        if not _is_int32(expr.child) or split_multiplier(lo, hi, expr.m, expr.shift, expr.qmin,
                                                          expr.qmax) is None:
            return True
    return _has_int64_step(expr.child)


def chain_form(expr: Expr, out_dtype: str, int32: bool, gather: bool = False) -> str:
    """How the kernel of ``expr`` computes it: ``"table"`` (:func:`build_table_kernel`) or
    ``"int32"`` / ``"int64"`` arithmetic (:func:`build_chain_kernel`; ``int32`` is
    :func:`prefers_int32` of the target, ``gather`` :func:`uses_gather`).

    A table is considered for a chain that reads two or more leaves or still has an int64 step,
    and whose table fits :data:`TABLE_MAX_BYTES`. It is taken where the target emulates 64-bit
    lane multiplies (``int32``), and where it multiplies them natively (AVX-512DQ) only when the
    lookup is a gather and the table fits :data:`TABLE_L1_BYTES`. Measured, one thread, thread
    CPU time (``benchmarks/latency/eltwise_kernels.py``, resnet20 at batch 32,
    ``benchmarks/latency/RESULTS.md``): on AVX2 every two-leaf tail 2.1-4.2x faster as a gathered
    table than in int32 arithmetic (0.60 vs 1.94 ms for the model's chains), the 255 KiB table
    included; on this AVX-512 host the 8-16 K-entry tables 1.7-2.0x faster than int64
    arithmetic and the 127-255 KiB ones level with it or slower. A one-leaf int32
    requantization (the pooled value's) is as fast or faster in arithmetic."""
    entries, _ = table_layout(expr)
    nbytes = entries * np.dtype(out_dtype).itemsize
    wants = len(leaves_sorted(expr)) > 1 or _has_int64_step(expr)
    if wants and nbytes <= TABLE_MAX_BYTES and (int32 or (gather and nbytes <= TABLE_L1_BYTES)):
        return "table"
    return "int32" if int32 else "int64"


def table_steps(expr: Expr, out_dtype: str) -> list[str]:
    """The record of a tabulated chain: its table's size and what it replaces."""
    sizes = " x ".join(str(leaf.hi - leaf.lo + 1) for leaf in leaves_sorted(expr))
    entries, _ = table_layout(expr)
    replaced = chain_steps(expr)
    int64 = sum(" int64" in s for s in replaced)
    return [f"table: {entries:,} entries ({sizes} codes) of {out_dtype}, each the reference "
            f"arithmetic's result; replaces {len(replaced)} requantizations "
            f"({int64} in int64) with one lookup"]


@dataclass(frozen=True)
class ChainRecord:
    """What one fused lane-wise kernel computes and how (one per emitted chain).

    Attributes:
        name: The PrimFunc's name.
        ops: The fx nodes fused into it, in graph order.
        layout: The layout it read and wrote (``"NCHW"`` or ``"NCHW16c"``).
        shape: The shape of its inputs and output.
        steps: :func:`chain_steps` (or :func:`table_steps`).
        tree: The chain itself.
        form: How the kernel computes it, :func:`chain_form`: ``"table"``, ``"int32"`` or
            ``"int64"``.
    """

    name: str
    ops: tuple[str, ...]
    layout: str
    shape: tuple[int, ...]
    steps: tuple[str, ...]
    tree: Expr | None = None
    form: str = "int32"

    @property
    def elements(self) -> int:
        """Elements per call."""
        return int(np.prod(self.shape))

    @property
    def int64_steps(self) -> int:
        return sum(" int64" in s for s in self.steps)

    @property
    def table(self) -> bool:
        """Whether the kernel looks the chain up in a table (:func:`chain_form`)."""
        return self.form == "table"


def eltwise_table(records: list[ChainRecord]) -> str:
    """Plain-text table of the fused lane-wise kernels (the conv kernels' ``kernel_table``
    counterpart)."""
    if not records:
        return "no fused lane-wise kernels"
    lines = []
    for r in records:
        lines.append(f"{r.name}  {r.layout}  {r.elements:,} elements  ops: {', '.join(r.ops)}")
        lines += [f"    {s}" for s in r.steps]
    arith = [r for r in records if not r.table]
    summary = []
    if len(arith) < len(records):
        summary.append(f"{len(records) - len(arith)} of {len(records)} chains as tables")
    if arith:
        int32 = sum(len(r.steps) - r.int64_steps for r in arith)
        total = sum(len(r.steps) for r in arith)
        summary.append(f"{int32} of {total} requantizations in int32"
                       + (" (the arithmetic chains)" if len(arith) < len(records) else ""))
    lines.append("; ".join(summary))
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
    from tvm import te

    leaves = leaves_sorted(expr)
    tensors = [te.placeholder(shape, leaf.dtype, name=f"x{leaf.index}") for leaf in leaves]
    out = te.compute(shape, lambda *i: _emit(expr, tensors, i, int32).astype(out_dtype),
                     name="chain")
    return _schedule_lanewise(te.create_prim_func(tensors + [out]), shape, target)


#: Leaf containers the AVX2 gather kernel reads (widened to int32 lanes).
_GATHER_LEAF_DTYPES = frozenset({"int8", "uint8", "int16", "uint16", "int32"})
#: Lanes of one ``vpgatherdd``.
_GATHER_LANES = 8


def _table_length(entries: int, out_dtype: str) -> int:
    """Entries of the table argument: :func:`tabulate`'s plus zero padding so that a 4-byte
    gather at the last entry stays inside the buffer."""
    itemsize = np.dtype(out_dtype).itemsize
    return entries + -(-(4 - itemsize) // itemsize) if itemsize < 4 else entries


def uses_gather(expr: Expr, shape: tuple[int, ...], out_dtype: str, target: Any) -> bool:
    """Whether :func:`build_table_kernel` looks ``expr`` up with AVX2 ``vpgatherdd``: an x86
    target with AVX2, two leaves in <= 32-bit containers, a <= 32-bit result, and an innermost
    extent of whole 8-lane vectors (a packed ``NCHW8c`` value). Else the lookup is one scalar
    load per lane."""
    from tvm.target import codegen

    leaves = leaves_sorted(expr)
    arm = "aarch64" in str(target.attrs.get("mtriple", ""))
    return (str(target.kind.name) == "llvm" and not arm
            and bool(codegen.target_has_features("avx2", target)) and len(leaves) == 2
            and all(leaf.dtype in _GATHER_LEAF_DTYPES for leaf in leaves)
            and np.dtype(out_dtype).itemsize <= 4
            and bool(shape) and shape[-1] % _GATHER_LANES == 0)


def build_table_kernel(expr: Expr, shape: tuple[int, ...], out_dtype: str, target: Any) -> Any:
    """The scheduled PrimFunc ``(x_0, ..., x_k, table, out)`` looking ``expr`` up in its table
    (:func:`tabulate`, passed as the argument ``table``): ``out = table[sum_j (clip(x_j, lo_j,
    hi_j) - lo_j) * stride_j]``. The clip keeps any code (a packed value's padding lanes) inside
    the table. Eight lanes per AVX2 ``vpgatherdd`` where :func:`uses_gather` (measured ~1.8x
    faster than scalar loads on resnet20's tails); else the loop structure of
    :func:`build_chain_kernel` with one scalar load per lane."""
    from tvm import te, tirx

    leaves = leaves_sorted(expr)
    entries, strides = table_layout(expr)
    if entries > 2**31 - 1:
        raise ValueError(f"a table of {entries} entries cannot be indexed in int32")
    if uses_gather(expr, shape, out_dtype, target):
        return _gather_kernel(leaves, strides, _table_length(entries, out_dtype), shape,
                              out_dtype)
    tensors = [te.placeholder(shape, leaf.dtype, name=f"x{leaf.index}") for leaf in leaves]
    table = te.placeholder((_table_length(entries, out_dtype),), out_dtype, name="table")

    def lookup(*i: Any) -> Any:
        index = tirx.const(0, "int32")
        for leaf, stride, x in zip(leaves, strides, tensors, strict=True):
            code = x[i].astype("int32") if leaf.dtype != "int64" else x[i]
            code = tirx.max(tirx.min(code, tirx.const(leaf.hi, _dtype(code))),
                            tirx.const(leaf.lo, _dtype(code)))
            index = index + ((code - tirx.const(leaf.lo, _dtype(code))).astype("int32")
                             * tirx.const(stride, "int32"))
        return table[index]

    out = te.compute(shape, lookup, name="chain")
    return _schedule_lanewise(te.create_prim_func(tensors + [table, out]), shape, target)


def _gather_kernel(leaves: list[Leaf], strides: tuple[int, ...], length: int,
                   shape: tuple[int, ...], out_dtype: str) -> Any:
    """:func:`build_table_kernel` for two leaves on AVX2: per 8 lanes, both codes widened to
    int32, clipped into their leaves' ranges, combined into the entry index, and the entries
    fetched by ``llvm.x86.avx2.gather.d.d.256`` (4 bytes at ``table + index * itemsize``, the
    low ``itemsize`` bytes kept: the table is padded for the last entry, :func:`_table_length`)."""
    from tvm.script import tirx as T

    size = int(np.prod(shape))
    vectors = size // _GATHER_LANES
    itemsize = np.dtype(out_dtype).itemsize
    (a, b), (stride_a, stride_b) = leaves, strides
    lanes = _GATHER_LANES
    vec_out = f"{out_dtype}x{lanes}"
    # one parallel task per chunk of vectors (a thread-pool launch costs more on small values)
    chunk = vectors if size < PARALLEL_MIN_ELEMENTS else max(1, PARALLEL_MIN_ELEMENTS // lanes)
    chunks = -(-vectors // chunk)

    def code(flat: Any, leaf: Leaf, base: Any) -> Any:
        """The lanes' codes from ``base``, clipped into the leaf's range, minus its low end."""
        v = T.Cast(f"int32x{lanes}", flat[T.ramp(base, 1, lanes)])
        lo, hi = T.Broadcast(T.int32(leaf.lo), lanes), T.Broadcast(T.int32(leaf.hi), lanes)
        return T.max(T.min(v, hi), lo) - lo

    def lookup(f0: Any, f1: Any, table: Any, base: Any) -> Any:
        index = (code(f0, a, base) * T.Broadcast(T.int32(stride_a), lanes)
                 + code(f1, b, base) * T.Broadcast(T.int32(stride_b), lanes))
        got = T.call_llvm_pure_intrin(
            f"int32x{lanes}", "llvm.x86.avx2.gather.d.d.256", T.Broadcast(T.int32(0), lanes),
            T.address_of(table[0]), index, T.Broadcast(T.int32(-1), lanes), T.int8(itemsize))
        return T.Cast(vec_out, got)  # truncation keeps the entry's low bytes

    @T.prim_func
    def kernel(x0: T.Buffer(shape, a.dtype), x1: T.Buffer(shape, b.dtype),
               table: T.Buffer((length,), out_dtype), out: T.Buffer(shape, out_dtype)) -> None:
        T.func_attr({"tirx.noalias": True})
        f0 = T.decl_buffer((size,), a.dtype, data=x0.data)
        f1 = T.decl_buffer((size,), b.dtype, data=x1.data)
        fo = T.decl_buffer((size,), out_dtype, data=out.data)
        for c in T.parallel(chunks):
            for j in T.serial(T.min(chunk, vectors - c * chunk)):
                fo[T.ramp((c * chunk + j) * lanes, 1, lanes)] = lookup(
                    f0, f1, table, (c * chunk + j) * lanes)

    return kernel.with_attr("tirx.is_scheduled", True)


def _schedule_lanewise(func: Any, shape: tuple[int, ...], target: Any) -> Any:
    """One flat loop over the ``chain`` block: vectorized by the widest power of two dividing
    the innermost extent, parallel over the rest when large enough; flattened for ``target``."""
    from tvm import s_tir

    from ..adapter import flatten_scheduled

    sch = s_tir.Schedule(func)
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
