"""TVM-facing: the written CUDA integer conv2d kernel, its inner product on ``dp4a``.

The kernel computes exactly what the CPU kernels compute: its TE definition *is*
:mod:`.conv2d`'s dense one (``pack`` with the activation offset and zero padding, ``conv`` over
``[N, ICB, Hp, Wp, 4]`` u8 operands and ``[OCB, ICB, KH, KW, 8, 4]`` s8 weights, the fused
``epilogue`` with bias and dyadic requantization, ``unpack`` to NCHW), for a
:class:`~.conv2d.ConvKernelSpec` of kind ``"dp4a"`` with a ``(1, 1)`` tile. Only the schedule is
CUDA's (:func:`schedule_dp4a`):

1. ``pack``: one thread per packed element (its own kernel launch).
2. ``conv``: one thread per element ``(n, ob, y, x, o)`` of the ``[N, OCB, OH, OW, 8]``
   accumulator (eight consecutive threads share one pixel's activations and read consecutive
   weights), accumulated in one register (``local``) over ``(ICB, KH, KW)`` with one ``dp4a``
   per 4 input channels (:mod:`.intrin`, ``djpq_cuda_dp4a``, matched by ``tensorize`` against
   the 4-product sum it replaces); the thread then applies the epilogue (bias,
   requantization) and stores the code.
3. ``unpack`` to NCHW: one thread per output element.

:func:`build_dp4a_kernel` returns the scheduled PrimFunc. ``schedule_dp4a(..., emulate=True)``
gives the same schedule with serial loops in place of the block/thread bindings and the ``dp4a``
call replaced by its definition (four int32 products): it builds for ``llvm`` and runs here, and
the tests compare it bit-exact with the reference executor. Checked on the CPU: the definition,
the schedule's loop structure and indexing, the tensorized inner product's operands. Not
checked without a GPU: the thread binding itself, ``__dp4a`` and the CUDA code generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..adapter import load_tvm
from . import conv2d
from .conv2d import ConvKernelSpec
from .intrin import intrin_name, register_intrinsics

__all__ = ["DP4A_TILES", "THREADS", "build_dp4a_kernel", "emulated", "schedule_dp4a"]

#: ``(tile_w, tile_oc)`` of the dp4a kernel's definition: no padded columns, one block of 8.
DP4A_TILES = (1, 1)
#: CUDA threads per block (at most, for the conv stage: see :func:`_bind_loops`).
THREADS = 128


def _bind_loops(sch: Any, loops: list[Any], bind: bool, exact: bool = False) -> Any:
    """Fuse ``loops`` and split them into blocks of threads, bound to ``blockIdx.x`` x
    ``threadIdx.x`` (``bind``; else left serial); returns the thread loop.

    ``exact``: threads per block divide the loops' extent (the largest power of two up to
    :data:`THREADS` that does), so that no thread is masked off: ``tensorize`` does not match a
    block under such a predicate."""
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    threads = THREADS
    if exact:
        extent = int(sch.get(fused).extent)
        while extent % threads:
            threads //= 2
    outer, inner = sch.split(fused, [None, threads])
    if bind:
        sch.bind(outer, "blockIdx.x")
        sch.bind(inner, "threadIdx.x")
    return inner


def schedule_dp4a(func: Any, spec: ConvKernelSpec, emulate: bool = False) -> Any:
    """The CUDA schedule of :mod:`.conv2d`'s dense definition (see the module doc).

    ``emulate``: the same schedule with its block/thread loops left serial and the inner product
    tensorized with ``djpq_cuda_dp4a_reference`` (the same description, its body four int32
    products): a PrimFunc with the CUDA kernel's loop structure and indexing that builds for
    ``llvm`` and runs on a CPU.
    """
    tvm = load_tvm()
    bind = not emulate
    sch = tvm.s_tir.Schedule(func)
    conv = sch.get_sblock("conv")
    writeback = sch.cache_write(conv, 0, "local")
    _bind_loops(sch, sch.get_loops(sch.get_sblock("pack")), bind)  # one thread per element
    loops = sch.get_loops(conv)
    # n, ob, y, xx, o: one accumulator element per thread (extent a multiple of 8: o)
    inner = _bind_loops(sch, loops[:5], bind, exact=True)
    sch.reverse_compute_at(writeback, inner)
    sch.reverse_compute_inline(sch.get_sblock("epilogue"))
    sch.decompose_reduction(conv, loops[5])  # rb: init the register before the reduction
    kind = "dp4a_reference" if emulate else "dp4a"
    register_intrinsics(kind)
    sch.tensorize(sch.get_loops(conv)[-1], intrin_name(kind))  # rl: 4 input channels
    _bind_loops(sch, sch.get_loops(sch.get_sblock("unpack")), bind)
    return sch.mod["main"]


#: Inside :func:`emulated`: every dp4a kernel gets ``schedule_dp4a(..., emulate=True)``.
_EMULATED = False


@contextlib.contextmanager
def emulated() -> Iterator[None]:
    """Kernels built inside get the CUDA schedule emulated (``schedule_dp4a(emulate=True)``), so
    that a module lowered for CUDA builds for and runs on this CPU (``build(...,
    "cuda-emulated")``). ``emit``'s per-process memo of kernels is emptied on entry and exit: no
    emulated kernel leaks into a real CUDA build, nor the reverse. A process-wide switch: a
    CUDA build lowered in another thread meanwhile would get emulated kernels too."""
    from .emit import _kernel

    global _EMULATED
    saved = _EMULATED
    _EMULATED = True
    _kernel.cache_clear()
    try:
        yield
    finally:
        _EMULATED = saved
        _kernel.cache_clear()


def build_dp4a_kernel(spec: ConvKernelSpec, schedule: bool = True) -> tuple[Any, tuple[int, int]]:
    """The dp4a conv kernel of ``spec`` (kind ``"dp4a"``) and its ``(tile_w, tile_oc)``.

    Parameters of the PrimFunc: as :func:`.conv2d.build_conv_kernel` (activations, weights
    packed by :func:`.conv2d.pack_weight` with ``tile_oc`` 1, int32 bias, requantization
    multipliers, rounding terms and shifts, output). ``schedule=False``: the same definition
    without the CUDA schedule (runs on any target; for checking the arithmetic on a CPU).
    """
    if spec.kind != "dp4a" or spec.groups != 1 or spec.in_lanes or spec.out_lanes:
        raise ValueError(f"dp4a kernels take dense NCHW specs of kind 'dp4a', got {spec}")
    tile_w, tile_oc = DP4A_TILES
    func = conv2d._compute(spec, tile_w, tile_oc)
    if schedule:
        func = schedule_dp4a(func, spec, _EMULATED)
    return func, DP4A_TILES
