# mypy: disable-error-code="valid-type,name-defined"
"""TVM-facing: a conv kernel with output *pixels* in the vector lanes, for narrow layers.

The channels-in-lanes kernels (:mod:`.conv2d`) pad the output channels to blocks of 8 (AVX2)
and the input channels to groups of ``4 * P``: a pruned 13 -> 9 3x3 layer (resnet20's first
stage) computes 16 x 16 products per tap for 13 x 9 real ones, 2.2x its work. Here the lanes run
over 16 output pixels of one output channel instead; the channels are plain loops, so neither
is padded. Two instruction sets (``select.PIXEL_KERNELS``): ``avx2_px16`` (kind ``px16``,
``vpmaddubsw`` on channel pairs, int16 sums) and ``avx512_px16`` (kind ``px16v``, AVX-512
VNNI's ``vpdpbusd`` on channel quads, int32 sums), whose channel-lane kernels pad the output
channels to 8 and 16 lanes.

Stride-1 convs only: the input is packed per image into rows of the padded width ``Wp = W +
2 * pw``, flattened (``[N, C/g, R * Wp, g]`` u8, the activation offset added, the spatial padding
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
13 -> 9 shape at batch 1, this one 70-78. With VNNI the operands are channel quads per pixel
(``[C/4, pixel, 4]``) and one ``vpdpbusd`` adds 16 pixels' four products each into int32
lanes: exact under the accumulator bound alone, as ``avx512_vnni``. Its weights are whole
64-byte vectors, or 4 bytes broadcast at the load where a tile holds one pixel vector
(:func:`weight_lanes`).

Layouts: the input is read NCHW or packed ``[N, ceil(C/L), H, W, L]``; the output is written
NCHW or packed with any ``L`` (padding lanes get ``clip(0)``, a defined code, as the other
kernels' zero-weight lanes do), so layout planning is unchanged. The pack and the final store
are this kernel's layout conversions (channels in lanes <-> pixels in lanes), per image, inside
the kernel and included in every time measured (``benchmarks/latency/narrow_packed_ab.json``):
on ``NCHW8c`` (AVX2) one 128-byte load of 16 pixels x 8 lanes and a shuffle per channel pair,
and one shuffle of 8 channel rows x 16 pixels per 128-byte packed store; on ``NCHW16c`` (VNNI)
the same with 256 bytes and channel quads (rows narrower than 16 pixels, other lane counts and
NCHW input: scalar copies).

Epilogue as in :mod:`.conv2d` (``epilogue_value``): in int32 where a :mod:`.requant32` plan
exists, else ``acc * 2^k`` then ``acc * m + rnd`` in int64 with the bias in the rounding term
(``bias_in_round``) or added in int32, split shift where every shift >= 32, clip, cast; or the
int32 accumulator plus bias for float-output layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .conv2d import ConvKernelSpec, all_params_dtypes, epilogue_value, io_shapes
from .select import PIXEL_KERNELS, PIXEL_LANES, PixelKernel, pixel_tiles

__all__ = ["build_narrow_kernel", "check_narrow", "narrow_tiles", "pack_narrow_weight",
           "padded_channels", "padded_row", "pixel_kernel", "weight_lanes"]


def check_narrow(spec: ConvKernelSpec) -> None:
    """Refuse a spec this kernel does not compute (``kind`` one of ``select.PIXEL_KERNELS``,
    stride 1, one group)."""
    if (spec.kind not in PIXEL_KERNELS or spec.stride != (1, 1) or spec.groups != 1
            or spec.im2col):
        raise ValueError(f"the pixels-in-lanes kernel computes kinds {sorted(PIXEL_KERNELS)} "
                         f"of stride-1 dense convs, got kind {spec.kind!r}, stride "
                         f"{spec.stride}, groups {spec.groups}, im2col {spec.im2col}")


def pixel_kernel(spec: ConvKernelSpec) -> PixelKernel:
    """The instruction set of ``spec``'s kind (``select.PIXEL_KERNELS``)."""
    check_narrow(spec)
    return PIXEL_KERNELS[spec.kind]


def padded_row(spec: ConvKernelSpec) -> int:
    """``Wp``: the padded input width, also the stride of the flattened output rows."""
    return spec.width + 2 * spec.padding[1]


def narrow_tiles(spec: ConvKernelSpec) -> tuple[int, int]:
    """``(tile_o, vectors)``: output channels x 16-pixel vectors held in registers
    (``select.pixel_tiles``)."""
    return pixel_tiles(spec.out_channels, pixel_kernel(spec))


def weight_lanes(spec: ConvKernelSpec) -> int:
    """How often each weight group is stored: 16 (a whole vector, the operand read as it is),
    or 1 (broadcast at the load) for a ``splat_weights`` kernel whose tile holds one pixel
    vector (``select.PixelKernel``)."""
    _, vectors = narrow_tiles(spec)
    return 1 if pixel_kernel(spec).splat_weights and vectors == 1 else PIXEL_LANES


def pack_narrow_weight(weight: np.ndarray, spec: ConvKernelSpec) -> np.ndarray:
    """OIHW integer weights to ``[OT, C/g, KH, KW, tile_o, L, g]`` int8 (flattened, ``g``
    the kernel's channel group: 2 or 4, ``L`` = :func:`weight_lanes`): each channel group's
    weights repeated for the 16 pixel lanes (one 32- or 64-byte vector, the ``vpmaddubsw`` /
    ``vpdpbusd`` operand read straight from memory) or stored once (``L = 1``, broadcast at the
    load), zero past ``O`` and past ``C``."""
    tile_o, _ = narrow_tiles(spec)
    g = pixel_kernel(spec).group
    oc, ic, kh, kw = weight.shape
    n_tiles, groups = -(-oc // tile_o), -(-ic // g)
    full = np.zeros((n_tiles * tile_o, groups * g, kh, kw), np.int8)
    full[:oc, :ic] = weight
    # [OT, tile_o, CG, g, KH, KW] -> [OT, CG, KH, KW, tile_o, g], then 16 lanes
    per = full.reshape(n_tiles, tile_o, groups, g, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    lanes = np.broadcast_to(per[..., None, :], per.shape[:-1] + (weight_lanes(spec), g))
    return np.ascontiguousarray(lanes).reshape(-1)


def padded_channels(spec: ConvKernelSpec) -> int:
    """Output channels the kernel computes (whole channel tiles): the length of its bias and
    requantization parameters."""
    tile_o, _ = narrow_tiles(spec)
    return -(-spec.out_channels // tile_o) * tile_o


def build_narrow_kernel(spec: ConvKernelSpec) -> Any:
    """The PrimFunc of ``spec``: params ``x, w, bias, m, rnd, shift, lo, hi, out`` (``m``,
    ``rnd``, ``shift`` unused for an int32 output, ``lo``, ``hi`` but for ``int32_requant``).

    One parallel iteration per image: fill its pack ``[C/g, R * Wp, g]`` u8 with the offset
    (``g`` = 2 for ``px16``, 4 for ``px16v``), copy the codes (plus the offset) into the
    interior, then per register tile (``tile_o`` channels x ``vectors`` x 16 pixels) sum
    ``vpmaddubsw`` (int16 accumulators) or ``vpdpbusd`` (int32) over channel groups and taps,
    apply the epilogue vectorized over the pixels into a per-image result ``[O', OH * Wp]``,
    and finally write the real columns out (NCHW rows, or every lane of a packed pixel
    together, padding lanes ``clip(0)``)."""
    from tvm import tirx
    from tvm.script import tirx as T

    n_, c_, h, w = spec.batch, spec.in_channels, spec.height, spec.width
    (kh, kw), (ph, pw), (dh, dw) = spec.kernel, spec.padding, spec.dilation
    oh, ow = spec.out_size
    kern = pixel_kernel(spec)
    g = kern.group
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
    cgroups = -(-c_ // g)
    flat = rows * wp * g  # one channel group's packed operands: [pixel, g] u8
    vec = PIXEL_LANES
    wl = weight_lanes(spec)
    w_size = n_ot * cgroups * kh * kw * tile_o * g * wl

    def accumulate(acc: Any, xp: Any, wt: Any, xbase: Any, wbase: Any) -> Any:
        """One accumulator vector plus 16 pixels' channel group (u8) times one output
        channel's weight group (s8): ``vpmaddubsw`` pair sums added in int16 (no saturation
        or wrap within the selection's bound), or ``vpdpbusd`` quad sums into int32 (exact)."""
        if kern.acc_dtype == "int16":
            return acc + T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw",
                                                 xp[T.ramp(xbase, 1, g * vec)],
                                                 wt[T.ramp(wbase, 1, g * vec)])
        weights = wt[T.ramp(wbase, 1, g * vec)] if wl == vec else tirx.reinterpret(
            f"int8x{g * vec}", T.Broadcast(tirx.reinterpret("int32", wt[T.ramp(wbase, 1, g)]),
                                            vec))
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                       xp[T.ramp(xbase, 1, g * vec)], weights)

    def x_at(n: Any, cp: Any, q: Any) -> Any:
        return (n * cgroups + cp) * flat + q * g

    def w_at(ot: Any, cp: Any, tap: int, o: int) -> Any:
        return (((ot * cgroups + cp) * kh * kw + tap) * tile_o + o) * g * wl

    qlen = q_tiles * tile_px
    acc_dtype = kern.acc_dtype
    zero_acc = tirx.const(0, acc_dtype)
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
    vec_pack = in_lanes == kern.lanes and w >= vec and in_dtype in ("uint8", "int8")
    vec_unpack = out_lanes == kern.lanes and ow >= vec and out_dtype in ("uint8", "int8")
    # the vector pack takes a lane block's channel groups in four shuffles (pack_group)
    assert kern.lanes == 4 * g, f"{kern.kind}: {kern.lanes} lanes are not 4 groups of {g}"

    def group_plane(xf: Any, base: Any, j: int) -> Any:
        """Channel group ``j`` of 16 packed pixels (``16 * L`` bytes from ``base``), plus the
        offset: ``16 * g`` bytes ``[pixel, g]`` (the codes plus the offset fit a byte, so the u8
        add is exact for signed containers too)."""
        v = tirx.reinterpret(f"uint8x{vec * in_lanes}", xf[T.ramp(base, 1, vec * in_lanes)]) \
            if in_dtype == "int8" else xf[T.ramp(base, 1, vec * in_lanes)]
        if offset:
            v = v + tirx.Broadcast(tirx.const(offset, "uint8"), vec * in_lanes)
        return tirx.Shuffle([v], [tirx.const(p * in_lanes + g * j + e, "int32")
                                  for p in range(vec) for e in range(g)])

    def to_pixels(res: Any, base: Any) -> Any:
        """``L`` result rows (channels) x 16 pixels from ``base`` as 16 pixels x ``L``
        channels."""
        rows8 = [res[T.ramp(base + lane * qlen, 1, vec)] for lane in range(out_lanes)]
        return tirx.Shuffle(rows8, [tirx.const(lane * vec + p, "int32")
                                    for p in range(vec) for lane in range(out_lanes)])

    @T.macro
    def pack_group(xp: Any, xf: Any, n: Any, b: Any, y: Any, i: Any, j: int) -> None:
        """Channel group ``b * 4 + j`` (``j`` a Python int: the shuffle's lanes are constants)
        of the 16 pixels from column ``min(i * 16, W - 16)`` of row ``y`` into the pack."""
        if b * 4 + j < cgroups:
            xp[T.ramp(x_at(n, b * 4 + j, (y + ph) * wp + pw + T.min(i * vec, w - vec)), 1,
                      g * vec)] = group_plane(xf, ((n * in_blocks + b) * h + y) * w * in_lanes
                                              + T.min(i * vec, w - vec) * in_lanes, j)

    @T.prim_func
    def kernel(x: T.Buffer(x_shape, in_dtype), wt: T.Buffer((w_size,), "int8"),
               bias: T.Buffer(mp, "int32"), m: T.Buffer(mp, m_dtype), rnd: T.Buffer(mp, rnd_dtype),
               shift: T.Buffer(mp, shift_dtype), lo: T.Buffer(mp, "int32"),
               hi: T.Buffer(mp, "int32"), out: T.Buffer(out_shape, out_dtype)) -> None:
        T.func_attr({"tirx.noalias": True})
        xp = T.alloc_buffer((n_ * cgroups * flat,), "uint8")
        res = T.alloc_buffer((n_ * res_rows * qlen,), out_dtype)
        for n in T.parallel(n_):
            # pack: the offset everywhere (spatial and channel padding), then the codes
            for i in T.vectorized(cgroups * flat):
                xp[n * cgroups * flat + i] = T.uint8(offset)
            if vec_pack:  # 16 pixels x L lanes per load, one channel group per shuffle
                xf = T.decl_buffer((x_size,), in_dtype, data=x.data)
                for y, i in T.grid(h, -(-w // vec)):
                    for b in T.unroll(in_blocks):  # the 4 channel groups of each lane block
                        pack_group(xp, xf, n, b, y, i, 0)
                        pack_group(xp, xf, n, b, y, i, 1)
                        pack_group(xp, xf, n, b, y, i, 2)
                        pack_group(xp, xf, n, b, y, i, 3)
            else:
                for y, xx in T.grid(h, w):
                    for c in T.unroll(c_):
                        xp[x_at(n, c // g, (y + ph) * wp + xx + pw) + c % g] = T.Cast(
                            "uint8", load(x, n, c, y, xx) + offset)
            for blk in range(blocks):
                acc = T.alloc_buffer((tile_o * tile_px,), acc_dtype, scope="local")
                ot = blk // q_tiles
                q0 = blk % q_tiles * tile_px
                for i in T.vectorized(tile_o * tile_px):
                    acc[i] = zero_acc
                for cp in range(cgroups):
                    for t in T.unroll(kh * kw):
                        for v in T.unroll(vecs):
                            for o in T.unroll(tile_o):
                                acc[T.ramp((o * vecs + v) * vec, 1, vec)] = accumulate(
                                    acc[T.ramp((o * vecs + v) * vec, 1, vec)], xp, wt,
                                    x_at(n, cp, q0 + v * vec + t // kw * dh * wp + t % kw * dw),
                                    w_at(ot, cp, t, o))
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
    """``emit.emit_conv`` for an ``avx2_px16`` / ``avx512_px16`` choice: the pixels-in-lanes
    kernel of this module, reading ``x`` in ``in_layout`` and writing ``NCHW{out_lanes}c`` when
    asked (any requantizing layer), else NCHW. Same parameters and result as ``emit_conv``."""
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
                          choice.kind, 1, in_dtype, offset, facts.acc_shift, out_dtype, qmin, qmax,
                          m_dtype, in_layout.lanes, lanes)
    requant_c = (m_c, shift_c) if requant is not None else None
    return emit_all_params_kernel(bb, x, spec, facts, choice, requant_c, padded_channels(spec),
                                  (pack_narrow_weight(facts.weight, spec), "int8"),
                                  build_narrow_kernel)
