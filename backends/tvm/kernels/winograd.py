# mypy: disable-error-code="valid-type,name-defined"
"""TVM-facing: Winograd F(2x2, 3x3) and F(4x4, 3x3) integer conv kernels on AVX2 (one kernel,
written from a scheme's integer matrices, ``select.WinogradScheme``).

W8A8 layers (and any layer whose ``vpmaddubsw`` bound fails) get ``avx2_s16`` in
:mod:`.conv2d`: two ``vpmaddwd`` and two ``vpaddd`` per 32 multiply-adds, which this core's two
multiply ports hold to at most 1.5x a PyTorch FP32 at its FMA peak, and the ``vpmaddubsw``
kernels of narrower layers to at most 2.67x (``KERNELS.md``). Winograd's F(m x m, 3x3) computes
each m x m block of outputs from an ``alpha x alpha`` block of inputs (``alpha = m + 2``) with
``alpha^2`` products per input/output channel pair instead of ``9 m^2``: 16 for 36 (F(2, 3),
``avx2_wino_s16``), 36 for 144 (F(4, 3), ``avx2_wino4_s16``), paid for by transforms made of
additions and small constant multiplies (:mod:`.select`, :func:`~.select.winograd`).

Exact in integers. ``Y = A^T [(G g G^T) . (B^T d B)] A``; the scheme's ``G`` has its rows
scaled to integers and ``A^T`` its columns, so the integer transforms give ``divisor * Y``
(F(2, 3): ``2G``, ``A^T`` unchanged, divisor 4; F(4, 3): rows by 4, 6, 6, 24, 24, 1, columns by
6, 4, 4, 1, 1, 24, divisor 576). Ranges, for operands in ``[0, span]`` (the activation offset
added, as in every kernel here):

* ``V = B^T d B`` in int16: every partial sum within ``v_gain * span`` (4 and 100; checked);
* ``U = g w g^T``: computed per weight at build time (int16 checked);
* each ``vpmaddwd`` sums two int16 products exactly into int32; from there on everything runs in
  uint32, i.e. modulo 2^32: the sums over the input channels (``M[xi, o] = sum_c U[xi, o, c] *
  V[xi, c]``) and the output transform (integer coefficients) give ``divisor * Y`` modulo 2^32,
  however large the partial sums grow;
* with ``divisor = 2^s * odd``: ``>> s`` (logical) leaves ``odd * Y`` modulo ``2^(32 - s)``, times
  the odd part's inverse modulo 2^32 ``Y`` modulo ``2^(32 - s)``, and sign extension from
  ``32 - s`` bits ``Y`` itself, since ``|Y| <= max_o sum|w_o| * span <= 2^(31 - s) - 1`` (checked:
  ``2^29 - 1`` for F(2, 3), ``2^25 - 1`` for F(4, 3)). Then the epilogue of :mod:`.conv2d`
  (bias, requantization).

One parallel iteration per image row of m x m tiles: input transform of the row (``V``,
``[alpha^2, TW', Cp]`` int16, 8 channels per vector: the input's ``NCHW8c`` blocks are read as
they are, NCHW input is gathered), ``alpha^2`` register-tiled GEMMs (``tile_t`` tiles x
``tile_oc`` blocks of 8 output channels, one broadcast input-channel pair per ``vpmaddwd``,
:func:`winograd_tiles`), then per tile and channel block the output transform, the epilogue and
the store (NCHW, or the packed output's 8 lanes together). Stride 1, dilation 1, one group, 3x3
kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .conv2d import ConvKernelSpec, all_params_dtypes, epilogue_value, io_shapes
from .select import WINOGRAD_F2, WINOGRAD_F4, WinogradScheme

__all__ = ["SCHEMES", "build_winograd_kernel", "check_winograd", "emit_winograd",
           "pack_winograd_weight", "padded_channels", "winograd_tiles"]

#: The scheme of each kernel kind: ``"wino"`` F(2x2, 3x3), ``"wino4"`` F(4x4, 3x3).
SCHEMES: dict[str, WinogradScheme] = {"wino": WINOGRAD_F2, "wino4": WINOGRAD_F4}

#: Output-channel lanes of a vector (int32 lanes of a ymm register) and input-channel lanes of
#: the input transform (int16 x 8: one ``NCHW8c`` block).
LANES = 8
#: Accumulator vectors held in registers per tile (of AVX2's 16 ymm registers).
ACC_REGS = 8


def check_winograd(spec: ConvKernelSpec) -> None:
    """Refuse a spec this kernel does not compute (kind ``"wino"`` or ``"wino4"``, 3x3, stride
    1, dilation 1, one group, no grouped batch)."""
    if (spec.kind not in SCHEMES or spec.kernel != (3, 3) or spec.stride != (1, 1)
            or spec.dilation != (1, 1) or spec.conv_groups != 1 or spec.im2col):
        raise ValueError(f"the Winograd kernel computes kind 'wino' or 'wino4' 3x3 stride-1 "
                         f"undilated dense convs, got kind {spec.kind!r}, kernel {spec.kernel}, "
                         f"stride {spec.stride}, dilation {spec.dilation}, conv_groups "
                         f"{spec.conv_groups}")
    if spec.out_lanes not in (0, LANES):
        raise ValueError(f"the Winograd kernel writes NCHW or NCHW{LANES}c, got out_lanes "
                         f"{spec.out_lanes}")


def winograd_tiles(spec: ConvKernelSpec) -> tuple[int, int]:
    """``(tile_t, tile_oc)``: output tiles x 8-channel output blocks held in registers
    (``tile_t * tile_oc <= ACC_REGS``).

    F(2x2, 3x3): two blocks where the block count is even (each broadcast input pair then feeds
    two), else one block and twice the tiles. F(4x4, 3x3): the most blocks of 4, 2, 1 that
    divide the block count, and the tile count that pads a row of tiles least (ties: the
    larger), e.g. 1 x 4 for a row of 7 tiles: measured 1.03-1.24x 2 x 4 there and 1.07x 2 x 4 on
    rows of 14 (``KERNELS.md``, "Winograd F(4x4, 3x3)")."""
    blocks = -(-spec.out_channels // LANES)
    if spec.kind != "wino4":
        tile_oc = 2 if blocks % 2 == 0 else 1
        return ACC_REGS // tile_oc, tile_oc
    tile_oc = next(b for b in (4, 2, 1) if blocks % b == 0)
    tw_n = -(-spec.out_size[1] // SCHEMES[spec.kind].m)
    most = ACC_REGS // tile_oc
    tile_t = min(range(most, 0, -1), key=lambda t: -(-tw_n // t) * t)
    return tile_t, tile_oc


def padded_channels(spec: ConvKernelSpec) -> int:
    """Output channels the kernel computes (whole 8-channel blocks): the length of its bias and
    requantization parameters."""
    return -(-spec.out_channels // LANES) * LANES


def pack_winograd_weight(weight: np.ndarray, spec: ConvKernelSpec) -> np.ndarray:
    """OIHW 3x3 weights to ``U`` packed ``[alpha^2, OT, Cp/2, tile_oc, 8, 2]`` int16
    (flattened): for each of the ``alpha^2`` products, output-channel tile and input-channel
    pair, ``tile_oc`` vectors of 8 output channels x the pair (``vpmaddwd``'s second operand,
    read from memory); zero past ``O`` and ``C``. Raises if a transformed weight passes int16
    (the selection never asks for such a kernel)."""
    scheme = SCHEMES[spec.kind]
    u = scheme.weight_transform(weight)
    if np.abs(u).max(initial=0) > 2**15 - 1:
        raise ValueError(f"Winograd weights past int16 (max |U| {np.abs(u).max()})")
    _, tile_oc = winograd_tiles(spec)
    oc, ic = weight.shape[:2]
    a2 = scheme.alpha ** 2
    ocp, cp = padded_channels(spec), -(-ic // LANES) * LANES
    full = np.zeros((a2, ocp, cp), np.int64)
    full[:, :oc, :ic] = u.reshape(a2, oc, ic)
    # [A2, OT, tile_oc, 8, CP/2, 2] -> [A2, OT, CP/2, tile_oc, 8, 2]
    per = full.reshape(a2, ocp // (tile_oc * LANES), tile_oc, LANES, cp // 2, 2)
    return np.ascontiguousarray(per.transpose(0, 1, 4, 2, 3, 5)).astype(np.int16).reshape(-1)


def _comb(coeffs: tuple[int, ...], load: Any, base: Any, step: Any, dtype: str) -> Any:
    """``sum_k coeffs[k] * load(base + k * step)`` as one expression, zero terms left out and
    the signs as additions and subtractions (the dtype's own wrapping arithmetic: int16 in the
    input transform, uint32 in the output one)."""
    from tvm import tirx

    expr = None
    for k, c in enumerate(coeffs):
        if c == 0:
            continue
        v = load(base + k * step)
        term = v if abs(c) == 1 else v * tirx.const(abs(c), dtype)
        if expr is None:
            expr = term if c > 0 else tirx.const(0, dtype) - term
        else:
            expr = expr + term if c > 0 else expr - term
    assert expr is not None, "a transform row of zeros"
    return expr


def build_winograd_kernel(spec: ConvKernelSpec) -> Any:
    """The PrimFunc of ``spec``: params ``x, w, bias, m, rnd, shift, lo, hi, out`` (``m``,
    ``rnd``, ``shift`` unused for an int32 output, ``lo``, ``hi`` but for ``int32_requant``)."""
    from tvm import tirx
    from tvm.script import tirx as T

    check_winograd(spec)
    scheme = SCHEMES[spec.kind]
    tm, al = scheme.m, scheme.alpha  # output and input rows per tile
    a2 = al * al
    bt, at = scheme.b_t, scheme.a_t
    six, four = al > 4, tm > 2  # the rows F(4, 3) adds to F(2, 3)'s
    div_shift = scheme.divisor_shift
    div_odd = scheme.divisor >> div_shift
    div_inv = pow(div_odd, -1, 2**32)  # the odd part's inverse modulo 2^32
    n_, c_, h, w = spec.batch, spec.in_channels, spec.height, spec.width
    ph, pw = spec.padding
    oh, ow = spec.out_size
    oc = spec.out_channels
    tile_t, tile_oc = winograd_tiles(spec)
    th_n, tw_n = -(-oh // tm), -(-ow // tm)
    twp = -(-tw_n // tile_t) * tile_t
    cp = -(-c_ // LANES) * LANES
    cb_n, pairs = cp // LANES, cp // 2
    ocp = padded_channels(spec)
    ocb_n = ocp // LANES
    n_ot = ocb_n // tile_oc
    offset = spec.act_offset
    in_lanes, out_lanes = spec.in_lanes, spec.out_lanes
    x_shape, out_shape = io_shapes(spec)
    in_dtype, out_dtype = spec.in_dtype, spec.out_dtype
    m_dtype, rnd_dtype, shift_dtype = all_params_dtypes(spec)
    mp = (ocp,)
    v_size = a2 * twp * cp
    m_size = twp * ocb_n * a2 * LANES
    w_size = a2 * n_ot * pairs * tile_oc * LANES * 2
    packed_out = bool(out_lanes)
    sl = al * LANES  # the transforms' column stride (their row stride is LANES)

    def operand(x: Any, n: Any, c: Any, y: Any, xx: Any) -> Any:
        """Code + offset of channel ``c`` at input ``(y, xx)`` as int16; the offset in the
        spatial padding and past the last channel (zero weights there)."""
        inside = tirx.all(c < c_, y >= 0, y < h, xx >= 0, xx < w)
        yc, xc, cc = T.max(T.min(y, h - 1), 0), T.max(T.min(xx, w - 1), 0), T.min(c, c_ - 1)
        code = (x[n, cc // in_lanes, yc, xc, cc % in_lanes] if in_lanes else x[n, cc, yc, xc])
        return T.Cast("int16", T.if_then_else(inside, T.Cast("int32", code), 0) + offset)

    def pair_word(vb: Any, base: Any) -> Any:
        """One tile's input-channel pair (two int16 at ``base``) in every 32-bit lane."""
        return T.reinterpret("int16x16", T.Broadcast(
            T.reinterpret("int32", vb[T.ramp(base, 1, 2)]), LANES))

    def col(buf: Any, row: int, base: Any) -> Any:
        """Row ``row`` of ``B^T`` applied down the columns: ``sum_k B^T[row, k] buf[k, .]``."""
        return _comb(bt[row], lambda i: buf[i], base, sl, "int16")

    def row_(buf: Any, row: int, base: Any) -> Any:
        """... and along the rows: ``sum_k buf[., k] B^T[row, k]``."""
        return _comb(bt[row], lambda i: buf[i], base, LANES, "int16")

    def out_col(mb: Any, row: int, base: Any) -> Any:
        """Row ``row`` of ``A^T`` down the columns of ``M`` (uint32: wrapping sums)."""
        return _comb(at[row], lambda i: mb[i], base, sl, "uint32")

    def out_row(s_: Any, row: int, base: Any) -> Any:
        """Row ``row`` of ``A^T`` along the rows, giving ``divisor * Y`` modulo 2^32, then ``Y``:
        ``>> div_shift`` (logical) leaves ``odd * Y`` modulo ``2^(32 - div_shift)``, times the
        odd part's inverse ``Y`` modulo the same, and the sign extension from ``32 - div_shift``
        bits ``Y`` itself (``|Y| < 2^(31 - div_shift)``, checked by the selection)."""
        total = _comb(at[row], lambda i: s_[i], base, LANES, "uint32")
        low = total >> tirx.const(div_shift, "uint32")
        if div_odd != 1:
            low = low * tirx.const(div_inv, "uint32")
        return T.reinterpret("int32", low << tirx.const(div_shift, "uint32")) >> div_shift

    @T.prim_func
    def kernel(x: T.Buffer(x_shape, in_dtype), wt: T.Buffer((w_size,), "int16"),
               bias: T.Buffer(mp, "int32"), m: T.Buffer(mp, m_dtype), rnd: T.Buffer(mp, rnd_dtype),
               shift: T.Buffer(mp, shift_dtype), lo: T.Buffer(mp, "int32"),
               hi: T.Buffer(mp, "int32"), out: T.Buffer(out_shape, out_dtype)) -> None:
        T.func_attr({"tirx.noalias": True})
        for row in T.parallel(n_ * th_n):
            n = row // th_n
            th = row % th_n
            vb = T.alloc_buffer((v_size,), "int16")
            mb = T.alloc_buffer((m_size,), "uint32")
            # input transform: V[xi, tile, c] for the row's tiles, 8 channels per vector
            for tw, cb in T.grid(twp, cb_n):
                d = T.alloc_buffer((a2 * LANES,), "int16", scope="local")
                for ij in T.unroll(a2):
                    for lane in T.vectorized(LANES):
                        d[ij * LANES + lane] = operand(x, n, cb * LANES + lane,
                                                       th * tm - ph + ij // al,
                                                       tw * tm - pw + ij % al)
                # B^T d (down the columns), then (B^T d) B (along the rows)
                t = T.alloc_buffer((a2 * LANES,), "int16", scope="local")
                for j in T.unroll(al):
                    for lane in T.vectorized(LANES):
                        t[j * LANES + lane] = col(d, 0, j * LANES + lane)
                        t[(al + j) * LANES + lane] = col(d, 1, j * LANES + lane)
                        t[(2 * al + j) * LANES + lane] = col(d, 2, j * LANES + lane)
                        t[(3 * al + j) * LANES + lane] = col(d, 3, j * LANES + lane)
                        if six:
                            t[(4 * al + j) * LANES + lane] = col(d, 4, j * LANES + lane)
                            t[(5 * al + j) * LANES + lane] = col(d, 5, j * LANES + lane)
                for a in T.unroll(al):
                    for lane in T.vectorized(LANES):
                        vb[((a * al) * twp + tw) * cp + cb * LANES + lane] = row_(
                            t, 0, a * sl + lane)
                        vb[((a * al + 1) * twp + tw) * cp + cb * LANES + lane] = row_(
                            t, 1, a * sl + lane)
                        vb[((a * al + 2) * twp + tw) * cp + cb * LANES + lane] = row_(
                            t, 2, a * sl + lane)
                        vb[((a * al + 3) * twp + tw) * cp + cb * LANES + lane] = row_(
                            t, 3, a * sl + lane)
                        if six:
                            vb[((a * al + 4) * twp + tw) * cp + cb * LANES + lane] = row_(
                                t, 4, a * sl + lane)
                            vb[((a * al + 5) * twp + tw) * cp + cb * LANES + lane] = row_(
                                t, 5, a * sl + lane)
            # the alpha^2 products: GEMMs over the input-channel pairs, register-tiled
            for xi, ot, tb in T.grid(a2, n_ot, twp // tile_t):
                acc = T.alloc_buffer((tile_t * tile_oc * LANES,), "uint32", scope="local")
                for i in T.vectorized(tile_t * tile_oc * LANES):
                    acc[i] = 0
                for p in range(pairs):
                    for t in T.unroll(tile_t):
                        for o in T.unroll(tile_oc):
                            acc[T.ramp((t * tile_oc + o) * LANES, 1, LANES)] = (
                                acc[T.ramp((t * tile_oc + o) * LANES, 1, LANES)]
                                + T.reinterpret("uint32x8", T.call_llvm_pure_intrin(
                                    "int32x8", "llvm.x86.avx2.pmadd.wd",
                                    pair_word(vb, (xi * twp + tb * tile_t + t) * cp + p * 2),
                                    wt[T.ramp((((xi * n_ot + ot) * pairs + p) * tile_oc + o)
                                              * LANES * 2, 1, LANES * 2)])))
                for t in T.unroll(tile_t):
                    for o in T.unroll(tile_oc):
                        mb[T.ramp((((tb * tile_t + t) * ocb_n + ot * tile_oc + o) * a2 + xi)
                                  * LANES, 1, LANES)] = acc[T.ramp((t * tile_oc + o) * LANES,
                                                                  1, LANES)]
            # output transform, exact division, epilogue, store
            for tw, ob in T.grid(tw_n, ocb_n):
                r = T.alloc_buffer((tm * tm * LANES,), "int32", scope="local")
                s_ = T.alloc_buffer((tm * al * LANES,), "uint32", scope="local")
                base = (tw * ocb_n + ob) * a2 * LANES
                # A^T M (down the columns), then (A^T M) A (along the rows), in uint32
                for b in T.unroll(al):
                    for lane in T.vectorized(LANES):
                        s_[b * LANES + lane] = out_col(mb, 0, base + b * LANES + lane)
                        s_[(al + b) * LANES + lane] = out_col(mb, 1, base + b * LANES + lane)
                        if four:
                            s_[(2 * al + b) * LANES + lane] = out_col(mb, 2,
                                                                      base + b * LANES + lane)
                            s_[(3 * al + b) * LANES + lane] = out_col(mb, 3,
                                                                      base + b * LANES + lane)
                for i in T.unroll(tm):
                    for lane in T.vectorized(LANES):
                        r[i * tm * LANES + lane] = out_row(s_, 0, i * sl + lane)
                        r[(i * tm + 1) * LANES + lane] = out_row(s_, 1, i * sl + lane)
                        if four:
                            r[(i * tm + 2) * LANES + lane] = out_row(s_, 2, i * sl + lane)
                            r[(i * tm + 3) * LANES + lane] = out_row(s_, 3, i * sl + lane)
                if packed_out:  # ocb_n is the output's block count
                    for ij in T.unroll(tm * tm):
                        if th * tm + ij // tm < oh and tw * tm + ij % tm < ow:
                            for lane in T.vectorized(LANES):
                                out[n, ob, th * tm + ij // tm, tw * tm + ij % tm, lane] = \
                                    epilogue_value(spec, r[ij * LANES + lane], ob * LANES + lane,
                                                   {"bias": bias, "m": m, "rnd": rnd,
                                                    "shift": shift, "lo": lo, "hi": hi})
                else:  # the epilogue on 8 channels at once, then each channel's outputs
                    e = T.alloc_buffer((tm * tm * LANES,), out_dtype, scope="local")
                    for ij in T.unroll(tm * tm):
                        for lane in T.vectorized(LANES):
                            e[ij * LANES + lane] = epilogue_value(
                                spec, r[ij * LANES + lane], ob * LANES + lane,
                                {"bias": bias, "m": m, "rnd": rnd, "shift": shift, "lo": lo,
                                 "hi": hi})
                    for lane in range(LANES):
                        if ob * LANES + lane < oc:
                            for ij in T.unroll(tm * tm):
                                if th * tm + ij // tm < oh and tw * tm + ij % tm < ow:
                                    out[n, ob * LANES + lane, th * tm + ij // tm,
                                        tw * tm + ij % tm] = e[ij * LANES + lane]

    return kernel


def emit_winograd(bb: Any, x: Any, in_dtype: str, facts: Any, choice: Any, geometry: Any,
                  requant: tuple[Any, Any, int, int, str] | None, in_layout: Any,
                  out_lanes: int = 0) -> tuple[Any, Any, str]:
    """``emit.emit_conv`` for an ``avx2_wino_s16`` or ``avx2_wino4_s16`` choice: the kernel of
    this module, reading ``x`` in ``in_layout`` (NCHW or packed, any lanes) and writing
    ``NCHW8c`` when asked (a requantizing layer), else NCHW. Same parameters and result as
    ``emit_conv``."""
    from .emit import emit_all_params_kernel, requant_args

    n, _, h, w = bb.shape(x)[:4]
    ic = in_layout.channels if in_layout.packed else bb.shape(x)[1]
    oc = facts.weight.shape[0]
    stride, padding, dilation = geometry
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or facts.groups != 1:
        raise ValueError(f"{facts.layer}: the Winograd kernel needs stride 1, dilation 1 and "
                         f"one group, got {stride}, {dilation}, {facts.groups} "
                         "(select.winograd admits those only)")
    m_c, shift_c, qmin, qmax, out_dtype, m_dtype = requant_args(requant, oc)
    offset = facts.offset_for("wd")
    lanes = out_lanes if requant is not None and out_lanes == LANES else 0
    spec = ConvKernelSpec(n, ic, h, w, oc, (3, 3), (1, 1), tuple(padding), (1, 1), choice.kind,
                          1, in_dtype, offset, facts.acc_shift, out_dtype, qmin, qmax, m_dtype,
                          in_layout.lanes, lanes)
    requant_c = (m_c, shift_c) if requant is not None else None
    return emit_all_params_kernel(bb, x, spec, facts, choice, requant_c, padded_channels(spec),
                                  (pack_winograd_weight(facts.weight, spec), "int16"),
                                  build_winograd_kernel)
