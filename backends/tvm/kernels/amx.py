"""TVM-facing: the written AMX (``tdpbusd``) integer conv2d kernel for x86 CPUs with AMX-INT8.

``tdpbusd`` multiplies a tile of 16 rows x 64 unsigned bytes (16 output pixels x 64 input
channels) by a tile of 16 rows x 64 signed bytes (16 groups of 4 input channels x 16 output
channels, 4 bytes each) and adds each row's products, four at a time, to a 16 x 16 int32 tile
without intermediate rounding or saturation: the same u8 x s8 -> int32 arithmetic as
``vpdpbusd``, so it is exact whenever the int32 accumulator is (``select.py``, ``amx_int8``).

The kernel is one PrimFunc (built with TVM's IR builder, not tensorized: the accumulators stay in
tile registers across the whole reduction) in three stages:

1. ``pack``: NCHW or packed ``NCHW{L}c`` activations (any int container) to ``[N, ICB, PH, Hq,
   Wq, 64]`` uint8 with the input channels padded to 64, the zero padding applied, and the offset
   ``act_offset`` added (as in ``conv2d._packed_value``). ``PH`` are the *phases* the taps read:
   for stride ``s`` the padded input is split into ``s x s`` sub-grids (pixel ``(y*s + py, x*s +
   px)`` of phase ``(py, px)`` sits at ``(y, x)``), so that every tap reads one phase at a fixed
   offset with unit stride. A 1x1 stride-2 conv packs one phase (the subsampled input).
2. ``conv``: output pixels are numbered ``q = y * Wq + x`` over the phase grid's width ``Wq``
   (``x >= OW`` are computed and dropped: ``Wq - OW`` is the widest tap offset, 2 columns for a
   3x3), so the 16 pixels of a tile row are 16 consecutive 64-byte rows of the pack and tap
   ``(ry, rx)`` reads them at ``q + (ry*dh // sh) * Wq + rx*dw // sw``: one ``tileloadd`` with
   a 64-byte stride. Each parallel iteration holds ``tile_m x tile_n`` accumulator tiles (up to
   2 x 2: 32 pixels x 32 output channels, plus ``tile_m`` activation and ``tile_n`` weight
   tiles: at most the 8 tile registers) and runs the whole reduction (input-channel blocks x
   taps) before one ``tilestored`` into a 4 KB scratch.
3. ``epilogue``: from the scratch, the bias and requantization of ``conv2d._finish`` (same
   parameters, same ``bias_in_round`` / ``split_shift`` forms) and the store to NCHW or to the
   packed ``NCHW16c`` output (16 lanes, the epilogue's channel blocks, padding lanes included:
   zero weights, bias and multipliers make them ``clip(0)``), vectorized over 16 lanes.

Linux gives a process the AMX tile state only after ``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``; without it the first tile instruction raises SIGILL. :func:`request_amx`
asks for it (process-wide, every thread) and is called before a kernel is built.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import load_tvm
from .conv2d import ConvKernelSpec, epilogue_params, epilogue_value, runs_parallel

__all__ = ["AmxPlan", "amx_plan", "build_amx_kernel", "cpu_has_amx", "pack_weight_amx",
           "request_amx"]

#: Bytes of one tile row: 64 input channels (u8) or 16 output channels x 4 (s8).
K_BLOCK = 64
#: Rows of a tile: output pixels (A, C tiles) or groups of 4 input channels (B tiles).
ROWS = 16
#: int32 output channels per accumulator tile (and lanes of the packed output).
OC_LANES = 16

_SYS_ARCH_PRCTL = 158  # x86_64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def cpu_has_amx() -> bool:
    """Whether this CPU reports AMX tiles and AMX-INT8 (``/proc/cpuinfo`` flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {"amx_tile", "amx_int8"} <= flags


@functools.cache
def request_amx() -> bool:
    """Ask Linux for this process's AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``); True when granted. Process-wide and idempotent; must run before the
    first tile instruction of any thread (else SIGILL)."""
    if not cpu_has_amx():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)) == 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class AmxPlan:
    """The geometry of one AMX kernel (a pure function of its spec, :func:`amx_plan`).

    ``phases``: the ``(py, px)`` sub-grids the taps read; ``taps``: per tap ``(phase index,
    offset in pack rows)``; ``wq``/``hq``: the phase grid's width and allocated height;
    ``tile_m``/``tile_n``: activation / weight tiles per iteration; ``m_tiles``: iterations over
    the ``OH * Wq`` numbered pixels; ``in_blocks``/``out_blocks``: 64-channel input blocks and
    16-channel output blocks (a multiple of ``tile_n``)."""

    phases: tuple[tuple[int, int], ...]
    taps: tuple[tuple[int, int], ...]
    wq: int
    hq: int
    tile_m: int
    tile_n: int
    m_tiles: int
    in_blocks: int
    out_blocks: int

    @property
    def pixels(self) -> int:
        """Numbered pixels per iteration (``16 * tile_m``)."""
        return ROWS * self.tile_m


def amx_plan(spec: ConvKernelSpec) -> AmxPlan:
    """Phases, tap offsets and tiling of the AMX kernel of ``spec``."""
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation
    oh, ow = spec.out_size
    phases: list[tuple[int, int]] = []
    raw = []
    for ry in range(kh):
        for rx in range(kw):
            phase = ((ry * dh) % sh, (rx * dw) % sw)
            if phase not in phases:
                phases.append(phase)
            raw.append((phases.index(phase), (ry * dh) // sh, (rx * dw) // sw))
    wq = ow + max(c for _, _, c in raw)
    taps = tuple((p, r * wq + c) for p, r, c in raw)
    tile_n = 2 if spec.out_channels > OC_LANES else 1
    numbered = oh * wq
    if numbered <= ROWS:
        tile_m = 1
    else:
        tile_m = 2 if tile_n == 2 else 3
    m_tiles = -(-numbered // (ROWS * tile_m))
    needed = m_tiles * ROWS * tile_m + max(off for _, off in taps)
    hq = -(-needed // wq)
    out_blocks = -(-spec.out_channels // (OC_LANES * tile_n)) * tile_n
    return AmxPlan(tuple(phases), taps, wq, hq, tile_m, tile_n, m_tiles,
                   -(-spec.in_channels // K_BLOCK), out_blocks)


def pack_weight_amx(weight: np.ndarray, spec: ConvKernelSpec, tile_oc: int) -> np.ndarray:
    """OIHW integer weights to ``[OCB, ICB, KH, KW, 16, 16, 4]`` int8 (zero padded): per
    (output block, input block, tap) one B tile, row ``k // 4``, column ``o * 4 + k % 4``."""
    plan = amx_plan(spec)
    assert tile_oc == plan.tile_n
    oc, ic, kh, kw = weight.shape
    full = np.zeros((plan.out_blocks * OC_LANES, plan.in_blocks * K_BLOCK, kh, kw), np.int8)
    full[:oc, :ic] = weight
    # [OCB, 16 (o), ICB, 16 (k/4), 4 (k%4), KH, KW] -> [OCB, ICB, KH, KW, k/4, o, k%4]
    packed = full.reshape(plan.out_blocks, OC_LANES, plan.in_blocks, ROWS, 4, kh, kw)
    return np.ascontiguousarray(packed.transpose(0, 2, 5, 6, 3, 1, 4))


def _tile_config(T: Any, cfg: Any, tiles: int) -> None:  # noqa: N803
    """Fill the 64-byte tile configuration (palette 1; tiles ``0..tiles-1`` of 16 rows x 64
    bytes) and load it."""
    for i in range(64):
        T.buffer_store(cfg, T.uint8(0), [i])
    T.buffer_store(cfg, T.uint8(1), [0])
    for t in range(tiles):
        T.buffer_store(cfg, T.uint8(K_BLOCK), [16 + 2 * t])  # colsb, u16 little-endian
        T.buffer_store(cfg, T.uint8(ROWS), [48 + t])  # rows
    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", cfg.access_ptr("r")))


def _tile(T: Any, name: str, *args: Any) -> None:  # noqa: N803
    T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _pack_value(spec: ConvKernelSpec, x: Any, n: Any, c: Any, yy: Any, xx: Any) -> Any:
    """Operand of channel ``c`` at input position ``(yy, xx)`` (padding coordinates removed):
    the code plus ``act_offset``, the offset alone outside the image or past the last channel;
    indices clamped so that every load stays in bounds."""
    tirx = load_tvm().tirx
    c_, h, w = spec.in_channels, spec.height, spec.width
    inside = tirx.all(c < c_, yy >= 0, yy < h, xx >= 0, xx < w)
    row, col = tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)
    if spec.in_lanes:
        lanes = spec.in_lanes
        cc = tirx.min(c, -(-c_ // lanes) * lanes - 1)
        value = x[n, cc // lanes, row, col, cc % lanes].astype("int32")
    else:
        value = x[n, tirx.min(c, c_ - 1), row, col].astype("int32")
    return (tirx.if_then_else(inside, value, 0) + spec.act_offset).astype("uint8")


def _pack_lane_block(spec: ConvKernelSpec, x: Any, n: Any, blk: Any, yy: Any, xx: Any,
                     lane: Any) -> Any:
    """Packed input whose lane count divides 64: lane ``lane`` of input block ``blk`` (one
    vector per pixel: the condition is uniform over the lanes; the input's padding lanes are
    read as they are, codes in the value's range, and meet zero weights)."""
    tirx = load_tvm().tirx
    h, w, blocks = spec.height, spec.width, -(-spec.in_channels // spec.in_lanes)
    inside = tirx.all(blk < blocks, yy >= 0, yy < h, xx >= 0, xx < w)
    row, col = tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)
    value = x[n, tirx.min(blk, blocks - 1), row, col, lane].astype("int32")
    return (tirx.if_then_else(inside, value, 0) + spec.act_offset).astype("uint8")


def _emit_pack(T: Any, spec: ConvKernelSpec, plan: AmxPlan, x: Any, pack: Any) -> None:  # noqa: N803
    """The pack stage: one iteration per (image, input block, phase), parallel where the
    kernel's work pays for the thread pool (:func:`.conv2d.runs_parallel`)."""
    (sh, sw), (ph, pw) = spec.stride, spec.padding
    nph = len(plan.phases)
    lanes = spec.in_lanes
    by_blocks = lanes > 0 and K_BLOCK % lanes == 0
    outer = T.parallel if runs_parallel(spec) else T.serial
    with outer(0, spec.batch * plan.in_blocks * nph) as t:
        n = t // (plan.in_blocks * nph)
        b = (t // nph) % plan.in_blocks
        p = t % nph
        if nph == 1:
            py, px = plan.phases[0]
        else:
            py, px = _select_phase(plan.phases, p, 0), _select_phase(plan.phases, p, 1)
        if by_blocks:
            with T.serial(0, plan.hq) as r, T.serial(0, plan.wq) as col:
                yy, xx = r * sh + py - ph, col * sw + px - pw
                with T.serial(0, K_BLOCK // lanes) as j, T.vectorized(0, lanes) as lane:
                    T.buffer_store(pack, _pack_lane_block(
                        spec, x, n, b * (K_BLOCK // lanes) + j, yy, xx, lane),
                        [n, b, p, r, col, j * lanes + lane])
        elif not lanes:
            _emit_pack_rows(T, spec, plan, x, pack, n, b, p, py, px)
        else:  # packed input whose lanes do not divide 64: per channel, tested and clamped
            with T.serial(0, plan.hq) as r, T.serial(0, plan.wq) as col, \
                    T.serial(0, K_BLOCK) as c:
                yy, xx = r * sh + py - ph, col * sw + px - pw
                T.buffer_store(pack, _pack_value(spec, x, n, b * K_BLOCK + c, yy, xx),
                               [n, b, p, r, col, c])


def _emit_pack_rows(T: Any, spec: ConvKernelSpec, plan: AmxPlan, x: Any, pack: Any,  # noqa: N803
                    n: Any, b: Any, p: Any, py: Any, px: Any) -> None:
    """NCHW input, phase ``(py, px)``: per row, the columns inside the image are a plain
    strided copy (no test, no clamp: the loop bounds are the image's), the border columns and
    the rows outside the image get the offset alone (the zero code). The lanes of channels past
    ``C`` are not written: any byte there meets a zero weight and adds exactly 0 to the int32
    sums, so a 16-channel layer packs 16 of its 64 lanes."""
    tirx = load_tvm().tirx
    (sh, sw), (ph, pw) = spec.stride, spec.padding
    off = tirx.const(spec.act_offset, "int32")
    # first column with xx = col * sw + px - pw >= 0, and one past the last with xx < W
    # (floor divisions: exact for the phase's px, a constant or a Select of constants)
    lo = tirx.max(0, tirx.floordiv(pw - px + sw - 1, sw))
    hi = tirx.min(plan.wq, tirx.floordiv(spec.width - 1 + pw - px, sw) + 1)
    hi = tirx.max(hi, lo)
    # lanes past C are left unwritten: whatever bytes they hold meet zero weights (exact)
    # pixel outer, channel inner: each 64-byte row of the pack is written whole (channel outer
    # streamed every row of the pack through L1 once per channel, ~3x slower)
    chans = tirx.min(K_BLOCK, spec.in_channels - b * K_BLOCK)
    with T.serial(0, plan.hq) as r:
        yy = r * sh + py - ph
        with T.If(tirx.all(yy >= 0, yy < spec.height)):
            with T.Then():
                with T.serial(0, lo) as col, T.serial(0, chans) as c:
                    T.buffer_store(pack, off.astype("uint8"), [n, b, p, r, col, c])
                with T.serial(lo, hi) as col, T.serial(0, chans) as c:
                    value = x[n, b * K_BLOCK + c, yy, col * sw + px - pw].astype("int32")
                    T.buffer_store(pack, (value + off).astype("uint8"), [n, b, p, r, col, c])
                with T.serial(hi, plan.wq) as col, T.serial(0, chans) as c:
                    T.buffer_store(pack, off.astype("uint8"), [n, b, p, r, col, c])
            with T.Else(), T.serial(0, plan.wq) as col, T.serial(0, chans) as c:
                T.buffer_store(pack, off.astype("uint8"), [n, b, p, r, col, c])


def _select_phase(phases: tuple[tuple[int, int], ...], p: Any, axis: int) -> Any:
    """``phases[p][axis]`` as an expression of the loop variable ``p``."""
    tirx = load_tvm().tirx
    value: Any = tirx.const(phases[-1][axis], "int32")
    for i in range(len(phases) - 2, -1, -1):
        value = tirx.Select(p == i, tirx.const(phases[i][axis], "int32"), value)
    return value


def _emit_conv(T: Any, spec: ConvKernelSpec, plan: AmxPlan, pack: Any, wt: Any,  # noqa: N803
               params: dict[str, Any], out: Any) -> None:
    """Tiles + reduction + epilogue, one iteration per (image, output tile pair, pixel tile
    group), parallel as the pack's (:func:`.conv2d.runs_parallel`)."""
    tm, tn = plan.tile_m, plan.tile_n
    c_tiles = tm * tn
    a_tile = [c_tiles + i for i in range(tm)]
    b_tile = [c_tiles + tm + j for j in range(tn)]
    oh, ow = spec.out_size
    kh, kw = spec.kernel
    nph = len(plan.phases)
    ob_iters = plan.out_blocks // tn
    pack_rows = plan.hq * plan.wq
    packed_out = spec.out_lanes > 0
    real_blocks = -(-spec.out_channels // OC_LANES)
    outer = T.parallel if runs_parallel(spec) else T.serial
    with outer(0, spec.batch * ob_iters * plan.m_tiles) as t:
        n = t // (ob_iters * plan.m_tiles)
        obp = (t // plan.m_tiles) % ob_iters
        mt = t % plan.m_tiles
        q0 = mt * plan.pixels
        cfg = T.alloc_buffer((64,), "uint8")
        # bytes with an int32 view: the tile store's pointer is then to the allocation's own
        # dtype (TVM's storage rewrite may merge same-scope allocations into one byte buffer)
        scratch_bytes = T.alloc_buffer((plan.pixels * tn * OC_LANES * 4,), "uint8")
        scratch = T.decl_buffer((plan.pixels, tn * OC_LANES), "int32", data=scratch_bytes.data)
        res: Any = None
        if not packed_out:  # NCHW: results, pixels' output offsets, the output as flat
            res = T.alloc_buffer((plan.pixels, tn * OC_LANES), spec.out_dtype)
            pos = T.alloc_buffer((plan.pixels,), "int32")
            flat = T.decl_buffer((spec.batch * spec.out_channels * oh * ow,), spec.out_dtype,
                                 data=out.data)
        _tile_config(T, cfg, c_tiles + tm + tn)
        for i in range(c_tiles):
            _tile(T, "tilezero", T.int8(i))
        with T.serial(0, plan.in_blocks) as b:
            for tap, (phase, offset) in enumerate(plan.taps):
                ry, rx = divmod(tap, kw)
                base = ((n * plan.in_blocks + b) * nph + phase) * pack_rows + q0 + offset
                for i in range(tm):
                    _tile(T, "tileloadd64", T.int8(a_tile[i]),
                          pack.access_ptr("r", offset=(base + i * ROWS) * K_BLOCK),
                          T.int64(K_BLOCK))
                for j in range(tn):
                    w_off = ((((obp * tn + j) * plan.in_blocks + b) * kh + ry) * kw + rx)
                    _tile(T, "tileloadd64", T.int8(b_tile[j]),
                          wt.access_ptr("r", offset=w_off * ROWS * K_BLOCK), T.int64(K_BLOCK))
                for i in range(tm):
                    for j in range(tn):
                        _tile(T, "tdpbusd", T.int8(i * tn + j), T.int8(a_tile[i]),
                              T.int8(b_tile[j]))
        for i in range(tm):
            for j in range(tn):
                _tile(T, "tilestored64", T.int8(i * tn + j),
                      scratch_bytes.access_ptr("w", offset=(i * ROWS * tn + j) * OC_LANES * 4),
                      T.int64(tn * OC_LANES * 4))
        with T.serial(0, plan.pixels) as i:
            q = q0 + i
            y, xx = q // plan.wq, q % plan.wq
            with T.If(T.And(y < oh, xx < ow)), T.Then():
                for j in range(tn):
                    blk = obp * tn + j
                    if packed_out:
                        with T.If(blk < real_blocks), T.Then(), \
                                T.vectorized(0, OC_LANES) as lane:
                            value = epilogue_value(spec, scratch[i, j * OC_LANES + lane],
                                                    blk * OC_LANES + lane, params)
                            T.buffer_store(out, value, [n, blk, y, xx, lane])
                    else:  # vectorized epilogue into ``res``, scattered to NCHW below
                        with T.vectorized(0, OC_LANES) as lane:
                            value = epilogue_value(spec, scratch[i, j * OC_LANES + lane],
                                                    blk * OC_LANES + lane, params)
                            T.buffer_store(res, value, [i, j * OC_LANES + lane])
        if not packed_out:  # channels outer, pixels' output offsets (or -1) computed once
            with T.serial(0, plan.pixels) as i:
                q = q0 + i
                y, xx = q // plan.wq, q % plan.wq
                T.buffer_store(pos, T.Select(T.And(y < oh, xx < ow), y * ow + xx, -1), [i])
            chans = min(tn * OC_LANES, spec.out_channels) if ob_iters == 1 else \
                T.min(tn * OC_LANES, spec.out_channels - obp * tn * OC_LANES)
            with T.serial(0, plan.pixels) as i, T.If(pos[i] >= 0), T.Then(), \
                    T.serial(0, chans) as jc:
                c = obp * tn * OC_LANES + jc
                T.buffer_store(flat, res[i, jc], [(n * spec.out_channels + c) * oh * ow
                                                  + pos[i]])
        _tile(T, "tilerelease")


def build_amx_kernel(spec: ConvKernelSpec) -> tuple[Any, tuple[int, int]]:
    """The PrimFunc of ``spec`` and ``(tile_w, tile_oc)`` = ``(16 * tile_m, tile_n)``.

    Parameters in the order of ``conv2d.build_conv_kernel``: activations, packed weights
    (:func:`pack_weight_amx`), int32 bias padded to the output blocks, then for a requantizing
    kernel ``m``, rounding term and ``shift``, and the output (NCHW or ``NCHW16c``)."""
    if spec.kind != "amx" or spec.depthwise or spec.im2col:
        raise ValueError(f"not an AMX dense conv spec: {spec}")
    request_amx()
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    plan = amx_plan(spec)
    oh, ow = spec.out_size
    size = plan.out_blocks * OC_LANES
    pack_bytes = spec.batch * plan.in_blocks * len(plan.phases) * plan.hq * plan.wq * K_BLOCK
    out_elems = spec.batch * plan.out_blocks * OC_LANES * oh * ow
    if max(pack_bytes, out_elems) > 2**31 - 1:  # the kernel's offsets are int32
        from djpq_compiler.errors import BackendError

        raise BackendError(f"AMX conv kernel of {spec.in_channels} -> {spec.out_channels} "
                           f"channels at batch {spec.batch}, {spec.height}x{spec.width}: its "
                           f"pack ({pack_bytes} bytes) or output ({out_elems} elements) passes "
                           "2^31 (int32 offsets); build with a smaller batch")
    kh, kw = spec.kernel
    if spec.in_lanes:
        x_shape: tuple[int, ...] = (spec.batch, -(-spec.in_channels // spec.in_lanes),
                                    spec.height, spec.width, spec.in_lanes)
    else:
        x_shape = (spec.batch, spec.in_channels, spec.height, spec.width)
    if spec.out_lanes:
        if spec.out_lanes != OC_LANES:
            raise ValueError(f"packed output needs {OC_LANES} lanes, got {spec.out_lanes}")
        out_shape: tuple[int, ...] = (spec.batch, -(-spec.out_channels // OC_LANES), oh, ow,
                                      OC_LANES)
    else:
        out_shape = (spec.batch, spec.out_channels, oh, ow)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("main")
            x = T.arg("x", T.buffer(x_shape, spec.in_dtype))
            wt = T.arg("w", T.buffer((plan.out_blocks, plan.in_blocks, kh, kw, ROWS, OC_LANES,
                                      4), "int8"))
            params = {"bias": T.arg("bias", T.buffer((size,), "int32"))}
            for name, dtype in epilogue_params(spec):
                params[name] = T.arg(name, T.buffer((size,), dtype))
            out = T.arg("out", T.buffer(out_shape, spec.out_dtype))
            T.func_attr({"tirx.noalias": True})
            pack = T.alloc_buffer((spec.batch, plan.in_blocks, len(plan.phases), plan.hq,
                                   plan.wq, K_BLOCK), "uint8")
            _emit_pack(T, spec, plan, x, pack)
            _emit_conv(T, spec, plan, pack, wt, params, out)
    return ib.get(), (plan.pixels, plan.tile_n)
