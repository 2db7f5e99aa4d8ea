# mypy: disable-error-code="valid-type"
"""TVM-facing: the tensor intrinsics the integer kernels are tensorized with (x86, aarch64, CUDA).

Registered once with ``tvm.s_tir.TensorIntrin.register`` (lazily: importing TVM is slow). All
but the grouped ``vpmaddubsw`` share one shape, built by :func:`_broadcast_intrin`: one pixel's
``k`` input channels broadcast to every output lane, times ``lanes`` output channels' weights;
``vpdpbusd`` and ``sdot`` are the same 4 x 8-bit dot product into int32 lanes (:func:`_dot4`).

* ``djpq_avx2_ubsw_p{P}`` (P = 1, 2, 4): ``C[8] += sum_{g<P, k<4} A[g, k] * B[g, :, k]`` with
  ``A`` u8 (4 input channels of one pixel, broadcast to the 8 output-channel lanes) and ``B`` s8.
  One ``vpmaddubsw`` per ``g`` gives pairwise int16 sums; the P results are added in int16 and
  widened once by ``vpmaddwd`` with ones. Exact only when no int16 sum saturates:
  ``2 * P * max|a| * max|w| <= 32767`` (checked by :mod:`.select` before this is chosen).
* ``djpq_avx2_wd``: ``C[8] += sum_{k<2} A[k] * B[:, k]`` with int16 ``A``/``B`` through one
  ``vpmaddwd``. Exact when ``2 * max|a| * max|w| <= 2^31 - 1`` (any <= 15-bit operands).
* ``djpq_avx512_vnni``: ``C[16] += sum_{k<4} A[k] * B[:, k]``, u8 x s8 through one
  ``vpdpbusd`` (AVX512-VNNI): the four products are summed without intermediate saturation, so
  it is exact whenever the int32 accumulator is (any u8 x s8, W8A8 included).
* ``djpq_neon_sdot`` (aarch64 ``dotprod``): ``C[4] += sum_{k<4} A[k] * B[:, k]``, s8 x s8
  through one ``sdot`` (``llvm.aarch64.neon.sdot``): four full-width products summed into each
  int32 lane, exact whenever the int32 accumulator is.
* ``djpq_cuda_dp4a`` (CUDA sm_61+): ``C[0] += sum_{k<4} A[k] * B[k]``, u8 x s8 through
  ``__dp4a`` into one int32 register, exact whenever the int32 accumulator is.

The description uses a ``local`` output buffer (the kernels accumulate in a ``cache_write``
buffer). With P = 1 the ``g`` axis is dropped entirely: extent-1 loops break the match.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..adapter import load_tvm

__all__ = ["UBSW_GROUPS", "intrin_name", "register_intrinsics"]

UBSW_GROUPS = (4, 2, 1)


def intrin_name(kind: str, groups: int = 1) -> str:
    """Registered name of an intrinsic: ``kind`` ``"ubsw"`` (with ``groups`` = P), ``"wd"`` or
    ``"vnni"``."""
    if kind == "ubsw":
        return f"djpq_avx2_ubsw_p{groups}"
    if kind == "sdot":
        return "djpq_neon_sdot"
    if kind == "dp4a":
        return "djpq_cuda_dp4a"
    if kind == "dp4a_reference":
        return "djpq_cuda_dp4a_reference"
    return "djpq_avx512_vnni" if kind == "vnni" else "djpq_avx2_wd"


def _splat(A: Any, index: list[int], dtype: str, k: int, lanes: int) -> Any:  # noqa: N803
    """The ``k`` elements of ``A`` at ``index`` (one pixel's input channels, 32 bits together)
    repeated ``lanes`` times, as a ``dtype x (k * lanes)`` vector."""
    tirx = load_tvm().tirx
    word = tirx.reinterpret("int32", A.vload(index, f"{dtype}x{k}"))
    return tirx.reinterpret(f"{dtype}x{k * lanes}", tirx.Broadcast(word, lanes))


def _ubsw_sum(A: Any, B: Any, groups: int) -> Any:  # noqa: N803 - buffer names as in TIR
    """Sum of ``groups`` vpmaddubsw results (int16x16) of A's 4-byte groups and B's 32 bytes."""
    tirx = load_tvm().tirx
    total = None
    for g in range(groups):
        a_idx, b_idx = ([g, 0], [g, 0, 0]) if groups > 1 else ([0], [0, 0])
        term = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw",
                                          _splat(A, a_idx, "uint8", 4, 8),
                                          B.vload(b_idx, "int8x32"))
        total = term if total is None else total + term
    return total


def _widen_add(C: Any, pairs: Any) -> Any:  # noqa: N803
    """``C + vpmaddwd(pairs, ones)``: int16x16 pair sums widened into C's 8 int32 lanes."""
    tirx = load_tvm().tirx
    ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
    return C.vload([0], "int32x8") + tirx.call_llvm_pure_intrin(
        "int32x8", "llvm.x86.avx2.pmadd.wd", pairs, ones)


#: ``(A, B, C) -> the new value of C[0:lanes]``: the body of a broadcast intrinsic.
Update = Callable[[Any, Any, Any], Any]


def _broadcast_intrin(lanes: int, k: int, a_dtype: str, b_dtype: str,
                      update: Update) -> tuple[Any, Any]:
    """``C[lanes] += sum_{j<k} A[j] * B[:, j]`` in int32: one pixel's ``k`` input channels
    (broadcast to every output lane) times ``lanes`` output channels' weights; ``(desc, impl)``
    with ``impl`` storing ``update(A, B, C)`` to ``C``. The P = 1 ``vpmaddubsw``, the
    ``vpmaddwd``, the ``vpdpbusd`` and the ``sdot`` intrinsics."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((k,), a_dtype, offset_factor=1),  # noqa: N803
             B: T.Buffer((lanes, k), b_dtype, offset_factor=1),  # noqa: N803
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:  # noqa: N803
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, k):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.cast(A[vj], "int32") * T.cast(B[vi, vj], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((k,), a_dtype, offset_factor=1),  # noqa: N803
             B: T.Buffer((lanes, k), b_dtype, offset_factor=1),  # noqa: N803
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:  # noqa: N803
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = update(A, B, C)

    return desc, impl


def _dot4(llvm_intrinsic: str, lanes: int, dtype: str) -> Update:
    """``C = intrinsic(C, A splat, B)``: an instruction that sums four full-width 8-bit products
    into each int32 lane of ``C`` (``vpdpbusd``, ``sdot``); ``dtype``: A's."""

    def update(A: Any, B: Any, C: Any) -> Any:  # noqa: N803
        tirx = load_tvm().tirx
        return tirx.call_llvm_pure_intrin(
            f"int32x{lanes}", llvm_intrinsic, C.vload([0], f"int32x{lanes}"),
            _splat(A, [0], dtype, 4, lanes), B.vload([0, 0], f"int8x{4 * lanes}"))

    return update


def _ubsw_p1() -> tuple[Any, Any]:
    return _broadcast_intrin(8, 4, "uint8", "int8",
                             lambda A, B, C: _widen_add(C, _ubsw_sum(A, B, 1)))


def _wd() -> tuple[Any, Any]:
    """``vpmaddwd`` of the broadcast int16 pair and B's 16 int16, accumulated as they are."""

    def update(A: Any, B: Any, C: Any) -> Any:  # noqa: N803
        tirx = load_tvm().tirx
        return C.vload([0], "int32x8") + tirx.call_llvm_pure_intrin(
            "int32x8", "llvm.x86.avx2.pmadd.wd", _splat(A, [0], "int16", 2, 8),
            B.vload([0, 0], "int16x16"))

    return _broadcast_intrin(8, 2, "int16", "int16", update)


def _vnni() -> tuple[Any, Any]:
    return _broadcast_intrin(16, 4, "uint8", "int8", _dot4("llvm.x86.avx512.vpdpbusd.512", 16,
                                                          "uint8"))


def _sdot() -> tuple[Any, Any]:
    return _broadcast_intrin(4, 4, "int8", "int8", _dot4("llvm.aarch64.neon.sdot.v4i32.v16i8", 4,
                                                        "int8"))


def _dp4a() -> tuple[Any, Any]:
    """CUDA ``dp4a`` (sm_61+): ``C[0] += sum_{k<4} A[k] * B[k]``, u8 x s8 into int32 through
    ``__dp4a(unsigned, int, int)`` (PTX ``dp4a.u32.s32``): the four products and their sum are
    formed at full width, so it is exact whenever the int32 accumulator is. ``A`` and ``B`` are
    4 contiguous bytes of global buffers (the pack's and the weights' innermost axis), ``C`` one
    int32 register."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1),  # noqa: N803
             B: T.Buffer((4,), "int8", offset_factor=1),  # noqa: N803
             C: T.Buffer((1,), "int32", offset_factor=1, scope="local")) -> None:  # noqa: N803
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for k in range(4):
                with T.sblock("update"):
                    vk = T.axis.remap("R", [k])
                    C[0] = C[0] + T.cast(A[vk], "int32") * T.cast(B[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),  # noqa: N803
             B: T.Buffer((4,), "int8", offset_factor=1),  # noqa: N803
             C: T.Buffer((1,), "int32", offset_factor=1, scope="local")) -> None:  # noqa: N803
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] = T.call_pure_extern("int32", "__dp4a", A.vload([0], "uint8x4"),
                                      B.vload([0], "int8x4"), C[0])

    return desc, impl


def _dp4a_reference() -> tuple[Any, Any]:
    """:func:`_dp4a`'s description with a plain-TIR body (four int32 products added to ``C``):
    what ``dp4a.u32.s32`` computes, runnable on a CPU (``cuda.schedule_dp4a(emulate=True)``)."""
    from tvm.script import tirx as T

    desc, _ = _dp4a()

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),  # noqa: N803
             B: T.Buffer((4,), "int8", offset_factor=1),  # noqa: N803
             C: T.Buffer((1,), "int32", offset_factor=1, scope="local")) -> None:  # noqa: N803
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] = C[0] + (T.cast(A[0], "int32") * T.cast(B[0], "int32")
                           + T.cast(A[1], "int32") * T.cast(B[1], "int32")
                           + T.cast(A[2], "int32") * T.cast(B[2], "int32")
                           + T.cast(A[3], "int32") * T.cast(B[3], "int32"))

    return desc, impl


def _ubsw_grouped(P: int) -> tuple[Any, Any]:  # noqa: N803
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((P, 4), "uint8", offset_factor=1),  # noqa: N803
             B: T.Buffer((P, 8, 4), "int8", offset_factor=1),  # noqa: N803
             C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:  # noqa: N803
        with T.sblock("root"):
            T.reads(C[0:8], A[0:P, 0:4], B[0:P, 0:8, 0:4])
            T.writes(C[0:8])
            for i, g, k in T.grid(8, P, 4):
                with T.sblock("update"):
                    vi, vg, vk = T.axis.remap("SRR", [i, g, k])
                    C[vi] = C[vi] + T.cast(A[vg, vk], "int32") * T.cast(B[vg, vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((P, 4), "uint8", offset_factor=1),  # noqa: N803
             B: T.Buffer((P, 8, 4), "int8", offset_factor=1),  # noqa: N803
             C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:  # noqa: N803
        with T.sblock("root"):
            T.reads(C[0:8], A[0:P, 0:4], B[0:P, 0:8, 0:4])
            T.writes(C[0:8])
            C[T.ramp(T.int32(0), 1, 8)] = _widen_add(C, _ubsw_sum(A, B, P))

    return desc, impl


def _builders() -> dict[str, Callable[[], tuple[Any, Any]]]:
    """Every intrinsic of this module: registered name -> ``(desc, impl)`` builder."""
    found: dict[str, Callable[[], tuple[Any, Any]]] = {intrin_name("ubsw", 1): _ubsw_p1}
    for groups in UBSW_GROUPS:
        if groups > 1:
            found[intrin_name("ubsw", groups)] = functools.partial(_ubsw_grouped, groups)
    found[intrin_name("wd")] = _wd
    found[intrin_name("vnni")] = _vnni
    found[intrin_name("sdot")] = _sdot
    found[intrin_name("dp4a")] = _dp4a
    found[intrin_name("dp4a_reference")] = _dp4a_reference
    return found


@functools.cache
def _register(name: str) -> None:
    """Parse and register intrinsic ``name`` with TVM (once per process)."""
    load_tvm().s_tir.TensorIntrin.register(name, *_builders()[name](), override=True)


def register_intrinsics(kind: str | None = None, groups: int = 1) -> None:
    """Register the intrinsic of ``kind``/``groups`` (:func:`intrin_name`) with TVM, or every
    intrinsic of this module when ``kind`` is ``None``; each once per process.

    Building an intrinsic's description runs the TVMScript parser (~0.07 s of CPU each, 12
    PrimFuncs in all), so a build registers only the ones its kernels tensorize with.

    Raises:
        KeyError: ``kind``/``groups`` names no intrinsic of this module.
    """
    names = list(_builders()) if kind is None else [intrin_name(kind, groups)]
    for name in names:
        _register(name)
