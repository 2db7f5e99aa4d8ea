# mypy: disable-error-code="valid-type,name-defined"
"""TVM-facing: a conv kernel with output *pixels* in the vector lanes, for narrow layers.

The channels-in-lanes kernels (:mod:`.conv2d`) pad the output channels to blocks of 8 (AVX2)
and the input channels to groups of ``4 * P``: a pruned 13 -> 9 3x3 layer (resnet20's first
stage) computes 16 x 16 products per tap for 13 x 9 real ones, 2.2x its work. Here the lanes run
over 16 output pixels of one output channel instead; the channels are plain loops, so neither
is padded (``avx2_px16``, :mod:`.select`).

Stride-1 convs only: the input is packed per image into rows of the padded width ``Wp = W +
2 * pw``, flattened (``[N, C, R * Wp]`` int16, the activation offset added, the spatial padding
filled with the offset), and output pixel ``q = y * Wp + x`` (``x < Wp``: the ``Wp - OW``
columns past the row are computed and dropped) reads tap ``(ky, kx)`` at ``q + ky * dh * Wp +
kx * dw``: a contiguous 16-lane load per tap and channel, whatever the padding and dilation.

Arithmetic: u8 operands (``[0, span]`` after the offset, ``span <= 255``) packed as channel
pairs per pixel (``[C/2, pixel, 2]``), s8 weights; one ``vpmaddubsw`` multiplies 16 pixels'
channel pair by one output channel's weight pair (pre-broadcast in memory: a 32-byte load, no
shuffle) and sums each pair in int16; ``vpaddw`` adds it to the int16 accumulator (32 MACs per
two instructions); widened to int32 once per output in the epilogue. Exact iff every partial
sum fits int16: ``span * max_o sum_{c,ky,kx} |w_o| <= 32767`` bounds each pair sum (no
saturation) and each partial sum (the wrapping adds never wrap); checked by the selection. A
plain int16 version (``vpmullw`` + ``vpaddw`` with broadcast weights) ran 23 GMAC/s on the
13 -> 9 shape at batch 1, this one 70-78.

Layouts: the input is read NCHW or packed ``[N, ceil(C/L), H, W, L]``; the output is written
NCHW or packed with any ``L`` (padding lanes get ``clip(0)``, a defined code, as the other
kernels' zero-weight lanes do), so layout planning is unchanged. The pack and the final store
are this kernel's layout conversions (channels in lanes <-> pixels in lanes), per image, inside
the kernel and included in every time measured (``benchmarks/latency/narrow_packed_ab.json``):
on ``NCHW8c`` (AVX2) one 128-byte load of 16 pixels x 8 lanes and a shuffle per channel pair,
and one shuffle of 8 channel rows x 16 pixels per 128-byte packed store (rows narrower than 16
pixels, other lane counts and NCHW input: scalar copies).

Epilogue as in :mod:`.conv2d` (``epilogue_value``): in int32 where a :mod:`.requant32` plan
exists, else ``acc * 2^k`` then ``acc * m + rnd`` in int64 with the bias in the rounding term
(``bias_in_round``) or added in int32, split shift where every shift >= 32, clip, cast; or the
int32 accumulator plus bias for float-output layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .conv2d import ConvKernelSpec, all_params_dtypes, epilogue_value, io_shapes

#: Output pixels per vector (int16 lanes of a ymm register).
PIXEL_LANES = 16
#: Accumulator vectors held in registers per tile (of AVX2's 16 ymm registers).
ACC_REGS = 12

__all__ = ["build_narrow_kernel", "check_narrow", "narrow_tiles", "pack_narrow_weight",
           "padded_channels", "padded_row"]


def check_narrow(spec: ConvKernelSpec) -> None:
    """Refuse a spec this kernel does not compute (``kind`` ``"px16"``, stride 1, one group)."""
    if spec.kind != "px16" or spec.stride != (1, 1) or spec.groups != 1 or spec.im2col:
        raise ValueError(f"the pixels-in-lanes kernel computes kind 'px16' stride-1 dense "
                         f"convs, got kind {spec.kind!r}, stride {spec.stride}, groups "
                         f"{spec.groups}, im2col {spec.im2col}")


def padded_row(spec: ConvKernelSpec) -> int:
    """``Wp``: the padded input width, also the stride of the flattened output rows."""
    return spec.width + 2 * spec.padding[1]


def narrow_tiles(spec: ConvKernelSpec) -> tuple[int, int]:
    """``(tile_o, vectors)``: output channels x 16-pixel vectors held in registers.

    ``tile_o * vectors <= ACC_REGS`` accumulators; the channels are split into the fewest tiles
    of at most ``ACC_REGS`` (13 -> 2 x 7, 9 -> 9), padded with zero-weight channels to whole
    tiles; the spare registers go to more pixel vectors (reusing each weight broadcast)."""
    oc = spec.out_channels
    n_tiles = -(-oc // ACC_REGS)
    tile_o = -(-oc // n_tiles)
    return tile_o, max(1, ACC_REGS // tile_o)


def pack_narrow_weight(weight: np.ndarray, spec: ConvKernelSpec) -> np.ndarray:
    """OIHW integer weights to ``[OT, C/2, KH, KW, tile_o, 16, 2]`` int8 (flattened): each
    channel pair's two weights repeated for the 16 pixel lanes (one 32-byte vector, the
    ``vpmaddubsw`` operand read straight from memory), zero past ``O``
    and past ``C`` (an odd count)."""
    tile_o, _ = narrow_tiles(spec)
    oc, ic, kh, kw = weight.shape
    n_tiles, pairs = -(-oc // tile_o), -(-ic // 2)
    full = np.zeros((n_tiles * tile_o, pairs * 2, kh, kw), np.int8)
    full[:oc, :ic] = weight
    # [OT, tile_o, CP, 2, KH, KW] -> [OT, CP, KH, KW, tile_o, 2], then 16 lanes
    per = full.reshape(n_tiles, tile_o, pairs, 2, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    lanes = np.broadcast_to(per[..., None, :], per.shape[:-1] + (PIXEL_LANES, 2))
    return np.ascontiguousarray(lanes).reshape(-1)


def padded_channels(spec: ConvKernelSpec) -> int:
    """Output channels the kernel computes (whole channel tiles): the length of its bias and
    requantization parameters."""
    tile_o, _ = narrow_tiles(spec)
    return -(-spec.out_channels // tile_o) * tile_o


def build_narrow_kernel(spec: ConvKernelSpec) -> Any:
    """The PrimFunc of ``spec``: params ``x, w, bias, m, rnd, shift, lo, hi, out`` (``m``,
    ``rnd``, ``shift`` unused for an int32 output, ``lo``, ``hi`` but for ``int32_requant``).

    One parallel iteration per image: fill its pack ``[C/2, R * Wp, 2]`` u8 with the offset,
    copy the codes (plus the offset) into the interior, then per register tile (``tile_o``
    channels x ``vectors`` x 16 pixels, int16 accumulators) sum ``vpmaddubsw`` over channel
    pairs and taps, apply the epilogue vectorized over the pixels into a per-image result
    ``[O', OH * Wp]``, and finally write the real columns out (NCHW rows, or every lane of a
    packed pixel together, padding lanes ``clip(0)``)."""
    from tvm import tirx
    from tvm.script import tirx as T

    n_, c_, h, w = spec.batch, spec.in_channels, spec.height, spec.width
    (kh, kw), (ph, pw), (dh, dw) = spec.kernel, spec.padding, spec.dilation
    oh, ow = spec.out_size
    check_narrow(spec)
    wp = padded_row(spec)
    tile_o, vecs = narrow_tiles(spec)
    oc = spec.out_channels
    ocp = padded_channels(spec)
    n_ot = ocp // tile_o
    tile_px = vecs * PIXEL_LANES
    q_tiles = -(-(oh * wp) // tile_px)
    length = q_tiles * tile_px + (kh - 1) * dh * wp + (kw - 1) * dw
    rows = -(-length // wp)
    offset = spec.act_offset
    in_lanes, out_lanes = spec.in_lanes, spec.out_lanes
    x_shape, out_shape = io_shapes(spec)
    in_dtype, out_dtype = spec.in_dtype, spec.out_dtype
    requant = out_dtype != "int32"
    # the requantization parameters' dtypes (conv2d.epilogue_params); the kernel always takes
    # ``lo`` and ``hi`` (read only by the int32 form)
    m_dtype, rnd_dtype, shift_dtype = all_params_dtypes(spec)
    qmin, qmax = spec.qmin, spec.qmax
    blocks = q_tiles * n_ot

    def load(x: Any, n: Any, c: Any, y: Any, xx: Any) -> Any:
        """Code of channel ``c`` at input position ``(y, xx)`` (in bounds), as int32."""
        if in_lanes:
            return T.Cast("int32", x[n, c // in_lanes, y, xx, c % in_lanes])
        return T.Cast("int32", x[n, c, y, xx])

    def finish(acc: Any, c: Any, params: dict[str, Any]) -> Any:
        """Epilogue of one accumulator of output channel ``c`` (``conv2d.epilogue_value``)."""
        return epilogue_value(spec, T.Cast("int32", acc), c, params)

    def zero_code() -> Any:
        return T.Cast(out_dtype, T.max(T.min(0, qmax), qmin)) if requant else T.int32(0)

    mp = (ocp,)
    pad_lanes = bool(out_lanes and oc % out_lanes)
    packed_out = bool(out_lanes)
    pairs = -(-c_ // 2)
    flat = rows * wp * 2  # one channel pair's packed operands: [pixel, 2] u8
    vec = PIXEL_LANES
    w_size = n_ot * pairs * kh * kw * tile_o * 2 * vec

    def operand(x: Any, n: Any, c: Any, r: Any, col: Any) -> Any:
        """Packed operand of channel ``c`` at padded row ``r``, column ``col``: code + offset,
        or the offset in the spatial padding and past the last channel (zero weights)."""
        yy, xw = r - ph, col - pw
        inside = tirx.all(c < c_, yy >= 0, yy < h, xw >= 0, xw < w)
        value = load(x, n, T.min(c, c_ - 1), T.max(T.min(yy, h - 1), 0),
                     T.max(T.min(xw, w - 1), 0))
        return T.Cast("uint8", T.if_then_else(inside, value, 0) + offset)

    def pair_sum(xp: Any, wt: Any, xbase: Any, wbase: Any) -> Any:
        """``vpmaddubsw``: 16 pixels' channel pair (u8) times one output channel's weight pair
        (s8), pair sums in int16 (no saturation within the selection's bound)."""
        return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw",
                                       xp[T.ramp(xbase, 1, 2 * vec)],
                                       wt[T.ramp(wbase, 1, 2 * vec)])

    def x_at(n: Any, cp: Any, q: Any) -> Any:
        return (n * pairs + cp) * flat + q * 2

    def w_at(ot: Any, cp: Any, tap: int, o: int) -> Any:
        return (((ot * pairs + cp) * kh * kw + tap) * tile_o + o) * 2 * vec

    qlen = q_tiles * tile_px
    out_blocks = -(-oc // out_lanes) if out_lanes else 0

    def result(c: Any, y: Any, xx: Any, res: Any, n: Any) -> Any:
        """The epilogue's code of channel ``c`` at output ``(y, xx)``; ``clip(0)`` for the
        padding lanes of a packed output (``c >= O``)."""
        value = res[(n * res_rows + T.min(c, ocp - 1)) * qlen + y * wp + xx]
        return T.if_then_else(c < oc, value, zero_code()) if pad_lanes else value

    in_blocks = -(-c_ // in_lanes) if in_lanes else 0
    x_size = int(np.prod(x_shape))
    out_size = int(np.prod(out_shape))
    res_rows = max(ocp, out_blocks * out_lanes)
    vec_pack = in_lanes == 8 and w >= vec and in_dtype in ("uint8", "int8")
    vec_unpack = out_lanes == 8 and ow >= vec and out_dtype in ("uint8", "int8")

    def pair_plane(xf: Any, base: Any, j: int) -> Any:
        """Channel pair ``j`` of 16 packed pixels (128 bytes from ``base``), plus the offset:
        32 bytes ``[pixel, 2]`` (the codes plus the offset fit a byte, so the u8 add is exact
        for signed containers too)."""
        v = tirx.reinterpret("uint8x128", xf[T.ramp(base, 1, vec * in_lanes)]) \
            if in_dtype == "int8" else xf[T.ramp(base, 1, vec * in_lanes)]
        if offset:
            v = v + tirx.Broadcast(tirx.const(offset, "uint8"), vec * in_lanes)
        return tirx.Shuffle([v], [tirx.const(p * in_lanes + 2 * j + e, "int32")
                                  for p in range(vec) for e in range(2)])

    def to_pixels(res: Any, base: Any) -> Any:
        """8 result rows (channels) x 16 pixels from ``base`` as 16 pixels x 8 channels."""
        rows8 = [res[T.ramp(base + lane * qlen, 1, vec)] for lane in range(out_lanes)]
        return tirx.Shuffle(rows8, [tirx.const(lane * vec + p, "int32")
                                    for p in range(vec) for lane in range(out_lanes)])

    @T.macro
    def pack_pair(xp: Any, xf: Any, n: Any, b: Any, y: Any, i: Any, j: int) -> None:
        """Channel pair ``b * 4 + j`` (``j`` a Python int: the shuffle's lanes are constants) of
        the 16 pixels from column ``min(i * 16, W - 16)`` of row ``y`` into the pack."""
        if b * 4 + j < pairs:
            xp[T.ramp(x_at(n, b * 4 + j, (y + ph) * wp + pw + T.min(i * vec, w - vec)), 1,
                      2 * vec)] = pair_plane(xf, ((n * in_blocks + b) * h + y) * w * 8
                                             + T.min(i * vec, w - vec) * 8, j)

    @T.prim_func
    def kernel(x: T.Buffer(x_shape, in_dtype), wt: T.Buffer((w_size,), "int8"),
               bias: T.Buffer(mp, "int32"), m: T.Buffer(mp, m_dtype), rnd: T.Buffer(mp, rnd_dtype),
               shift: T.Buffer(mp, shift_dtype), lo: T.Buffer(mp, "int32"),
               hi: T.Buffer(mp, "int32"), out: T.Buffer(out_shape, out_dtype)) -> None:
        T.func_attr({"tirx.noalias": True})
        xp = T.alloc_buffer((n_ * pairs * flat,), "uint8")
        res = T.alloc_buffer((n_ * res_rows * qlen,), out_dtype)
        for n in T.parallel(n_):
            # pack: the offset everywhere (spatial and channel padding), then the codes
            for i in T.vectorized(pairs * flat):
                xp[n * pairs * flat + i] = T.uint8(offset)
            if vec_pack:  # 16 pixels x 8 lanes per load, 4 channel pairs per shuffle
                xf = T.decl_buffer((x_size,), in_dtype, data=x.data)
                for y, i in T.grid(h, -(-w // vec)):
                    for b in T.unroll(in_blocks):  # the 4 channel pairs of each 8-lane block
                        pack_pair(xp, xf, n, b, y, i, 0)
                        pack_pair(xp, xf, n, b, y, i, 1)
                        pack_pair(xp, xf, n, b, y, i, 2)
                        pack_pair(xp, xf, n, b, y, i, 3)
            else:
                for y, xx in T.grid(h, w):
                    for c in T.unroll(c_):
                        xp[x_at(n, c // 2, (y + ph) * wp + xx + pw) + c % 2] = T.Cast(
                            "uint8", load(x, n, c, y, xx) + offset)
            for blk in range(blocks):
                acc = T.alloc_buffer((tile_o * tile_px,), "int16", scope="local")
                ot = blk // q_tiles
                q0 = blk % q_tiles * tile_px
                for i in T.vectorized(tile_o * tile_px):
                    acc[i] = T.int16(0)
                for cp in range(pairs):
                    for t in T.unroll(kh * kw):
                        for v in T.unroll(vecs):
                            for o in T.unroll(tile_o):
                                acc[T.ramp((o * vecs + v) * vec, 1, vec)] = (
                                    acc[T.ramp((o * vecs + v) * vec, 1, vec)] + pair_sum(
                                        xp, wt, x_at(n, cp, q0 + v * vec + t // kw * dh * wp
                                                     + t % kw * dw), w_at(ot, cp, t, o)))
                for o in T.unroll(tile_o):
                    for p in T.vectorized(tile_px):
                        res[(n * res_rows + ot * tile_o + o) * qlen + q0 + p] = finish(
                            acc[o * tile_px + p], ot * tile_o + o,
                            {"bias": bias, "m": m, "rnd": rnd, "shift": shift, "lo": lo,
                             "hi": hi})
            # unpack: the real columns of each row, every channel of a pixel together
            if vec_unpack:  # 8 channel rows x 16 pixels per shuffle, one 128-lane store
                for c, i in T.grid(res_rows - oc, qlen // vec):
                    res[T.ramp((n * res_rows + oc + c) * qlen + i * vec, 1, vec)] = \
                        T.Broadcast(zero_code(), vec)
                of = T.decl_buffer((out_size,), out_dtype, data=out.data)
                for b, y, i in T.grid(out_blocks, oh, -(-ow // vec)):
                    of[T.ramp((((n * out_blocks + b) * oh + y) * ow + T.min(i * vec, ow - vec))
                              * out_lanes, 1, out_lanes * vec)] = to_pixels(
                        res, (n * res_rows + b * out_lanes) * qlen + y * wp
                        + T.min(i * vec, ow - vec))
            elif packed_out:
                for b, y, xx in T.grid(out_blocks, oh, ow):
                    for lane in T.unroll(out_lanes):
                        out[n, b, y, xx, lane] = result(b * out_lanes + lane, y, xx, res, n)
            else:
                for c, y in T.grid(oc, oh):
                    for xx in T.vectorized(ow):
                        out[n, c, y, xx] = result(c, y, xx, res, n)

    return kernel


def emit_narrow(bb: Any, x: Any, in_dtype: str, facts: Any, choice: Any, geometry: Any,
                requant: tuple[Any, Any, int, int, str] | None, in_layout: Any,
                out_lanes: int = 0) -> tuple[Any, Any, str]:
    """``emit.emit_conv`` for an ``avx2_px16`` choice: the pixels-in-lanes kernel of this
    module, reading ``x`` in ``in_layout`` and writing ``NCHW{out_lanes}c`` when asked (any
    requantizing layer), else NCHW. Same parameters and result as ``emit_conv``."""
    from .emit import emit_all_params_kernel, requant_args

    n, _, h, w = bb.shape(x)[:4]
    ic = in_layout.channels if in_layout.packed else bb.shape(x)[1]
    oc, _, kh, kw = facts.weight.shape
    stride, padding, dilation = geometry
    if tuple(stride) != (1, 1):
        raise ValueError(f"{facts.layer}: the pixels-in-lanes kernel needs stride 1, got "
                         f"{stride} (select.narrow_pixels admits stride 1 only)")
    m_c, shift_c, qmin, qmax, out_dtype, m_dtype = requant_args(requant, oc)
    offset = facts.offset_for("ubsw")
    lanes = out_lanes if requant is not None else 0
    spec = ConvKernelSpec(n, ic, h, w, oc, (kh, kw), (1, 1), tuple(padding), tuple(dilation),
                          "px16", 1, in_dtype, offset, facts.acc_shift, out_dtype, qmin, qmax,
                          m_dtype, in_layout.lanes, lanes)
    requant_c = (m_c, shift_c) if requant is not None else None
    return emit_all_params_kernel(bb, x, spec, facts, choice, requant_c, padded_channels(spec),
                                  (pack_narrow_weight(facts.weight, spec), "int8"),
                                  build_narrow_kernel)
