"""TVM-facing: the written AVX2 integer conv2d kernel (TE compute + a fixed TIR schedule).

One PrimFunc per layer, in four stages:

1. ``pack``: NCHW activations, or packed ``[N, ceil(C/L), H, W, L]`` ones (``spec.in_lanes``,
   ``backends/tvm/layout.py``), in any int container, to ``[N, ICB, Hp, Wp, (G,) L]`` with the input
   channels padded to the intrinsic's width and the spatial zero padding applied, plus an offset
   (``-lo`` for signed inputs, padding included) that makes every operand unsigned.
   A 1x1 dense kernel on packed unsigned 8-bit codes with nothing to pad (:func:`reads_directly`)
   has no pack stage: it reads the packed input as it is, viewed as ``[N, CB, H, W, L/(4P), (P,)
   4]`` (a free reshape of the same memory), so its intrinsic's 4 (x P) bytes are contiguous.
   A dense kernel on at most 4 input channels (a stem, :func:`im2col_pays`) packs im2col rows
   instead, ``[N, KB, OH, OWp, (G,) L]`` over ``K = KH * KW * C`` (taps and channels reduced
   jointly, padded once), and its conv is a 1x1 over them.
2. ``conv``: ``[N, OCB, OH, OWp, 8]`` int32, tensorized with an intrinsic of :mod:`.intrin`;
   register tile of ``tile_w`` output columns x ``tile_oc`` blocks of 8 output channels.
3. ``epilogue`` (fused into the accumulator write-back): ``acc * 2^k + bias`` in int32, then the
   dyadic requantization ``clip(((acc * m + R) >> shift))`` in int64 and the cast to the output
   container -- or the int32 accumulator itself for float-output layers. On x86 the bias rides
   in the rounding term and the shift is split at 32 bits where that is exact
   (``ConvKernelSpec.bias_in_round``, ``split_shift``): AVX2 has neither a 64-bit arithmetic
   shift nor 64-bit min/max, and the epilogue was most of a 1x1 or depthwise kernel's work.
4. ``unpack``: back to NCHW, dropping padded channels and columns -- or, for a packed output
   (``spec.out_lanes``), the epilogue's channel blocks as they are (padded columns dropped,
   padding lanes kept: zero weights, bias and multipliers make them ``clip(0)``).

Tile sizes come from the shape (no tuning). The weights arrive pre-packed (:func:`pack_weight`).
At batch >= 2 depthwise and packed 1x1 kernels run the batch as the outer parallel axis with each
image's pack right before its conv (:func:`batch_outer`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..adapter import load_tvm
from .intrin import intrin_name, register_intrinsics

__all__ = ["ConvKernelSpec", "build_conv_kernel", "choose_tiles", "direct_input_shape",
           "lanes_aligned", "pack_weight", "reads_directly"]


@dataclass(frozen=True)
class ConvKernelSpec:
    """Everything one written conv kernel is specialized on.

    ``kind`` is ``"ubsw"`` (u8 x s8, ``groups`` = P input-channel groups of 4 summed in int16),
    ``"wd"`` (int16 x int16 pairs), ``"vnni"`` or ``"sdot"`` (aarch64, s8 x s8: the offset then
    moves the codes into ``[-128, 127]``); ``"amx"`` is built by :mod:`.amx`, ``"px16"`` (output
    pixels in the lanes; stride 1, one group) by :mod:`.conv2d_narrow`. ``act_offset`` is added
    to every activation (and to the zero padding) before the product: ``-lo`` for signed
    inputs, so that the operand is unsigned (``sdot``: ``-128 - lo`` or 0, see
    ``LayerFacts.offset_for``); the bias passed in carries the correction
    ``-act_offset * sum(w) * 2^acc_shift``.
    ``out_dtype`` ``"int32"`` means: no requantization, return the accumulator.
    ``mult_dtype`` is the dtype of the requantization multipliers: ``"int32"`` when they all fit,
    so that the int64 product ``acc * m`` of two sign-extended 32-bit values is one ``vpmuldq``
    instead of a full 64-bit multiply (same result).
    """

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    kind: str
    groups: int
    in_dtype: str
    act_offset: int
    acc_shift: int
    out_dtype: str
    qmin: int
    qmax: int
    mult_dtype: str = "int64"
    #: Layout of the input: 0 = NCHW, ``L`` = packed ``[N, ceil(C/L), H, W, L]`` (``layout.py``).
    in_lanes: int = 0
    #: Layout of the output: 0 = NCHW, else packed with ``oc_lanes`` lanes (the only packed
    #: output written: the epilogue's channel blocks themselves).
    out_lanes: int = 0
    #: Depthwise only: the products' and sums' dtype, ``"int16"`` where the selection proved
    #: every partial sum fits (``select.py``, ``*_acc16`` variants), else ``"int32"``.
    acc_dtype: str = "int32"
    #: Every channel's shift is at least 32 (:func:`split_shift_ok`): the requantization takes
    #: the high word of ``acc * m + R`` and shifts it in int32 by ``shift - 32`` (the ``shift``
    #: parameter then holds ``shift - 32`` as int32), see :func:`_requantize`.
    split_shift: bool = False
    #: Dense kernels on few input channels (:func:`im2col_pays`): reduce over the taps and the
    #: channels jointly, ``K = KH * KW * C`` padded once to the intrinsic's width (a 1-channel 3x3
    #: stem: 12 operands per output instead of 9 taps x 4), through an im2col pack.
    im2col: bool = False
    #: The requantization's rounding term carries the bias, ``rnd = bias * m + R`` (int64), and
    #: the epilogue forms ``(acc * 2^k) * m + rnd``: the same int64 value as ``(acc * 2^k +
    #: bias) * m + R`` (each product is below ``2^62``: ``|acc * 2^k|``, ``|bias|`` and ``|m|``
    #: are below ``2^31``, which the selection's accumulator bound and ``mult_dtype`` int32
    #: guarantee), but the multiplicand stays a sign-extended 32-bit value, so LLVM emits one
    #: ``vpmuldq`` per 4 lanes; ``sext(acc + bias)`` may need 33 bits and cost three
    #: ``vpmuludq`` with shifts and adds (seen in the AVX2 depthwise kernels).
    bias_in_round: bool = False
    #: The requantization runs in int32 (:mod:`.requant32`): ``clip((clamp(acc, lo, hi) * m +
    #: rnd) >> shift)`` with int32 ``m, rnd, shift, lo, hi`` per channel (:func:`epilogue_params`),
    #: ``acc_shift`` and the bias folded into them; a plan found at build time gives the int64
    #: form's codes for every int32 accumulator.
    int32_requant: bool = False
    #: Dense kinds (``ubsw``, ``wd``, ``vnni``, ``sdot``) only: the batch holds ``N`` images x
    #: ``conv_groups`` groups of a grouped conv (batch index ``image * G + group``: the layer's
    #: ``(N, G * C, H, W)`` input seen as ``(N * G, C, H, W)``, the same memory), each group
    #: convolved with its own weights (``[G, ...]``, :func:`pack_weight`) and epilogue
    #: parameters (``[G * channels padded to the blocks]``); ``in_channels`` / ``out_channels``
    #: are one group's. One kernel for every group of the layer.
    conv_groups: int = 1

    @property
    def macs(self) -> int:
        """Multiply-adds per call (one input channel per output channel if depthwise)."""
        (oh, ow), (kh, kw) = self.out_size, self.kernel
        per = 1 if self.depthwise else self.in_channels
        return self.batch * self.out_channels * oh * ow * kh * kw * per

    @property
    def depthwise(self) -> bool:
        """Depthwise kinds ``"dw8"``/``"dw16"``: channels in vector lanes, int32 products."""
        return self.kind.startswith("dw")

    @property
    def lanes(self) -> int:
        """Input channels per intrinsic group: 4 bytes (ubsw, vnni), 2 int16 (wd); depthwise:
        the channel lanes."""
        if self.depthwise:
            return self.oc_lanes
        return 2 if self.kind == "wd" else 4

    @property
    def oc_lanes(self) -> int:
        """Output channels per vector: 16 int32 (AVX-512), 8 (AVX2) or 4 (NEON)."""
        if self.kind == "sdot":
            return 4
        return 16 if self.kind in ("vnni", "dw16", "amx") else 8

    @property
    def out_size(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel, self.stride, self.padding,
                                                  self.dilation)
        return ((self.height + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (self.width + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    @property
    def reduce_channels(self) -> int:
        """Channels the kernel reduces over per output: ``C``, or ``KH * KW * C`` (im2col)."""
        kh, kw = self.kernel
        return kh * kw * self.in_channels if self.im2col else self.in_channels

    @property
    def in_blocks(self) -> int:
        return -(-self.reduce_channels // (self.lanes * self.groups))

    def out_blocks(self, tile_oc: int) -> int:
        return -(-self.out_channels // (self.oc_lanes * tile_oc)) * tile_oc


def choose_tiles(spec: ConvKernelSpec) -> tuple[int, int]:
    """``(tile_w, tile_oc)``: output columns x 8-channel blocks held in registers.

    16 ymm registers hold ``tile_w * tile_oc`` accumulators plus the weight vectors; P = 4 keeps
    one channel block (its 4 weight vectors are reused over the columns), P <= 2 and the int16
    path take two (each broadcast then feeds two blocks) where the layer has an even number of
    blocks, else one: a second block per tile would pad a whole block of 8 zero-weight channels
    (a pruned 23 -> 32 channels; measured 1.12-1.54x faster with one block,
    ``benchmarks/latency/tiles_ab.json``). The width tile minimizes padded columns, preferring
    the larger tile on ties.
    """
    out_w = spec.out_size[1]
    if spec.depthwise:
        tile_oc, widest = 1, 8
    elif spec.kind == "sdot":  # 32 NEON registers, 4 int32 lanes
        tile_oc = min(4, -(-spec.out_channels // 4))
        widest = 6 if tile_oc > 2 else 8
    elif spec.kind == "vnni":  # 32 zmm registers
        tile_oc = 2 if spec.out_channels > 16 else 1
        widest = 12 if tile_oc == 1 else 8
    else:
        blocks = -(-spec.out_channels // spec.oc_lanes)
        pair = spec.kind == "wd" or spec.groups <= 2
        tile_oc = 2 if pair and blocks % 2 == 0 else 1
        widest = 7 if tile_oc == 1 else 5
    return width_tile(out_w, widest), tile_oc


def width_tile(out_w: int, widest: int) -> int:
    """Output columns per register tile: the whole row if it fits ``widest``, else the tile of
    4..``widest`` columns that pads the row least, the larger on ties."""
    if out_w <= widest:
        return out_w
    candidates = range(widest, 3, -1)
    waste = {t: -(-out_w // t) * t - out_w for t in candidates}
    return min(candidates, key=lambda t: (waste[t], -t))


def pack_weight(weight: np.ndarray, spec: ConvKernelSpec, tile_oc: int) -> np.ndarray:
    """OIHW integer weights to the ``[OCB, ICB, KH, KW, (G,) O, L]`` layout (zero padded); with
    ``spec.conv_groups`` > 1 the layer's ``(G * O, I, KH, KW)`` weights to ``[G, OCB, ...]``,
    each group packed alone."""
    if spec.conv_groups > 1:
        per_group = weight.reshape((spec.conv_groups, -1) + weight.shape[1:])
        return np.stack([pack_weight(w, dataclasses.replace(spec, conv_groups=1), tile_oc)
                         for w in per_group])
    oc, ic, kh, kw = weight.shape
    if spec.depthwise:  # (C, 1, KH, KW) -> [CB, KH, KW, L] int16
        full = np.zeros((spec.out_blocks(1) * spec.oc_lanes, kh, kw), dtype="int16")
        full[:oc] = weight[:, 0]
        packed = full.reshape(-1, spec.oc_lanes, kh, kw).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(packed)
    if spec.im2col:  # O x (KH, KW, C) as a 1x1 conv over K = KH * KW * C channels
        weight = weight.transpose(0, 2, 3, 1).reshape(oc, kh * kw * ic, 1, 1)
        oc, ic, kh, kw = weight.shape
    lanes, groups, ol = spec.lanes, spec.groups, spec.oc_lanes
    ocb, icb = spec.out_blocks(tile_oc), spec.in_blocks
    dtype = "int16" if spec.kind == "wd" else "int8"
    full = np.zeros((ocb * ol, icb * groups * lanes, kh, kw), dtype=dtype)
    full[:oc, :ic] = weight
    packed = full.reshape(ocb, ol, icb, groups, lanes, kh, kw).transpose(0, 2, 5, 6, 3, 1, 4)
    shape = (ocb, icb, kh, kw) + ((groups,) if groups > 1 else ()) + (ol, lanes)
    return np.ascontiguousarray(packed.reshape(shape))


def reads_directly(spec: ConvKernelSpec, tile_w: int) -> bool:
    """Whether the dense kernel of ``spec`` reads its packed input without a pack stage.

    True for a 1x1 conv without padding on a packed ``uint8`` input (``act_offset`` 0) whose
    lanes hold whole intrinsic groups (``in_lanes`` a multiple of ``4 * P``) and whose output
    width is a multiple of ``tile_w`` (no padded columns to read past the row). The kernel then
    also reads the input's padding lanes (channels ``>= C`` of the last block, and a partly
    used last group): their packed weights are zero (:func:`pack_weight`), and a u8 code times
    a zero weight adds exactly 0 to the int32 (``vpdpbusd``) or int16 (``vpmaddubsw``, whose
    bound counts only real products) sums, so their contents never change a result.
    """
    group = spec.lanes * spec.groups
    return (spec.in_lanes > 0 and not spec.depthwise and spec.kind in ("vnni", "ubsw")
            and spec.kernel == (1, 1) and spec.padding == (0, 0) and spec.act_offset == 0
            and spec.in_dtype == "uint8" and spec.in_lanes % group == 0
            and spec.out_size[1] % tile_w == 0)


def direct_input_shape(spec: ConvKernelSpec) -> tuple[int, ...]:
    """The view of a packed ``[N, CB, H, W, L]`` input a direct-reading kernel takes:
    ``[N, CB, H, W, L / (4P), (P,) 4]``."""
    group = spec.lanes * spec.groups
    gdim = (spec.groups,) if spec.groups > 1 else ()
    return ((spec.batch, -(-spec.in_channels // spec.in_lanes), spec.height, spec.width,
             spec.in_lanes // group) + gdim + (spec.lanes,))


def _packed_value(x: Any, spec: ConvKernelSpec, n: Any, c: Any, y: Any, xx: Any,
                  dtype: str) -> Any:
    """Operand of input channel ``c`` at padded position ``(y, xx)``: the code plus
    ``act_offset``, zero (plus the offset) in the spatial padding and past the last channel.
    The indices are clamped so that the load stays in bounds wherever the branch is taken."""
    tirx = load_tvm().tirx
    (ph, pw), c_, h, w = spec.padding, spec.in_channels, spec.height, spec.width
    yy, xw = y - ph, xx - pw
    # c >= C (channel padding of the kernel's blocks and of a packed input's last block) is
    # never read: it becomes the zero code, whose weights are zero too (layout.py, point 2)
    inside = tirx.all(c < c_, yy >= 0, yy < h, xw >= 0, xw < w)
    row, col = tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xw, w - 1), 0)
    if spec.in_lanes:  # clamped to the layout's last lane (in bounds; folds when aligned)
        lanes = spec.in_lanes
        cc = tirx.min(c, -(-c_ // lanes) * lanes - 1)
        value = x[n, cc // lanes, row, col, cc % lanes].astype("int32")
    else:
        value = x[n, tirx.min(c, c_ - 1), row, col].astype("int32")
    return (tirx.if_then_else(inside, value, 0) + spec.act_offset).astype(dtype)


def _im2col_value(x: Any, spec: ConvKernelSpec, n: Any, k: Any, y: Any, xx: Any,
                  dtype: str) -> Any:
    """Operand ``k`` of output pixel ``(y, xx)`` in the im2col pack: tap ``k // C`` (row-major
    over ``KH x KW``), channel ``k % C``, through :func:`_packed_value` (zero plus the offset in
    the spatial padding; ``k >= KH * KW * C`` lands there too or on a clamped in-bounds load,
    and meets zero weights)."""
    c_ = spec.in_channels
    (_, kw), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation
    tap, c = k // c_, k % c_
    return _packed_value(x, spec, n, c, y * sh + (tap // kw) * dh, xx * sw + (tap % kw) * dw,
                         dtype)


def im2col_pays(spec: ConvKernelSpec) -> bool:
    """Whether a dense kernel should reduce over taps and channels jointly (``im2col``): a
    spatial kernel on at most 4 input channels (a stem on grayscale or RGB input), where padding
    each tap's channels to the intrinsic's group of 4 (x P) multiplies the work: 1 channel, 3x3,
    P = 2: 72 operands per output for 9 products; jointly 16."""
    return (not spec.depthwise and spec.kind in ("ubsw", "vnni", "wd")
            and spec.kernel != (1, 1) and spec.in_channels <= 4)


def subsamples(spec: ConvKernelSpec, tile_w: int) -> bool:
    """A strided 1x1 dense kernel with a pack stage (not :func:`reads_directly`): the pack holds
    only the pixels the conv reads (every ``sh``-th row and ``sw``-th column of the padded
    input), not the whole padded input. resnet20's 1x1 stride-2 shortcuts on AVX2 packed 27 x 29
    pixels per image to read 14 x 15 of them (0.153 -> 0.141 ms for one at batch 32)."""
    return (not spec.depthwise and not spec.im2col and spec.kernel == (1, 1)
            and spec.stride != (1, 1) and not reads_directly(spec, tile_w))


def lanes_aligned(spec: ConvKernelSpec) -> bool:
    """A depthwise kernel on a packed input with its own lane count: its pack copies whole
    channel blocks (vectorized over the lanes, no per-lane channel test). It reads the input's
    padding lanes, whose packed weights are zero (:func:`pack_weight`), so they add exactly 0."""
    return spec.depthwise and spec.in_lanes == spec.oc_lanes


def packs_blocks(spec: ConvKernelSpec) -> bool:
    """A dense kernel on packed input whose lanes hold whole intrinsic groups (``in_lanes`` a
    multiple of ``4 * P``), that is not :func:`reads_directly`: its pack copies whole lane
    blocks (spatial padding and offset applied, one vector per pixel, no per-lane channel
    test) and the conv reads them viewed as ``[.., L/(4P), (P,) 4]``. The padding lanes are
    read, as codes in the value's range (plus the offset: in ``[0, span]``), and meet zero
    weights (:func:`pack_weight`): they add exactly 0."""
    return (spec.in_lanes > 0 and not spec.depthwise and spec.kind in ("vnni", "ubsw")
            and not spec.im2col and spec.in_lanes % (spec.lanes * spec.groups) == 0)


def _block_value(x: Any, spec: ConvKernelSpec, n: Any, b: Any, y: Any, xx: Any, lane: Any,
                 dtype: str) -> Any:
    """Block ``b``, lane ``lane`` of a packed input at padded position ``(y, xx)`` plus
    ``act_offset`` as ``dtype``, zero (plus the offset) in the spatial padding only (the same
    test for every lane of a pixel)."""
    tirx = load_tvm().tirx
    (ph, pw), h, w = spec.padding, spec.height, spec.width
    yy, xw = y - ph, xx - pw
    inside = tirx.all(yy >= 0, yy < h, xw >= 0, xw < w)
    row, col = tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xw, w - 1), 0)
    value = x[n, b, row, col, lane].astype("int32")
    return (tirx.if_then_else(inside, value, 0) + spec.act_offset).astype(dtype)


def _aligned_value(x: Any, spec: ConvKernelSpec, n: Any, b: Any, y: Any, xx: Any,
                   lane: Any) -> Any:
    """:func:`_packed_value` for :func:`lanes_aligned` kernels: block ``b``, lane ``lane`` of
    the packed input as int16 codes plus ``act_offset``, zero (plus the offset) in the spatial
    padding only (the same test for every lane of a pixel)."""
    return _block_value(x, spec, n, b, y, xx, lane, "int16")


def _input(spec: ConvKernelSpec) -> Any:
    """The activation placeholder: NCHW, or packed ``[N, ceil(C/L), H, W, L]``."""
    te = load_tvm().te
    n_, c_, h, w = spec.batch, spec.in_channels, spec.height, spec.width
    if spec.in_lanes:
        shape: tuple[int, ...] = (n_, -(-c_ // spec.in_lanes), h, w, spec.in_lanes)
    else:
        shape = (n_, c_, h, w)
    return te.placeholder(shape, spec.in_dtype, name="x")


def _depthwise(spec: ConvKernelSpec, tile_w: int) -> tuple[Any, Any, Any]:
    """Depthwise pack + conv: ``[N, CB, Hp, Wp, L]`` int16 codes, int32 products and sums."""
    te = load_tvm().te
    n_ = spec.batch
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation
    oh, ow = spec.out_size
    owp = -(-ow // tile_w) * tile_w
    ol, cb = spec.oc_lanes, spec.out_blocks(1)
    hp, wp = (oh - 1) * sh + dh * (kh - 1) + 1, (owp - 1) * sw + dw * (kw - 1) + 1
    x = _input(spec)
    wt = te.placeholder((cb, kh, kw, ol), "int16", name="w")

    def pack(n: Any, b: Any, y: Any, xx: Any, lane: Any) -> Any:
        if lanes_aligned(spec):
            return _aligned_value(x, spec, n, b, y, xx, lane)
        return _packed_value(x, spec, n, b * ol + lane, y, xx, "int16")

    xp = te.compute((n_, cb, hp, wp, ol), pack, name="pack")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    acc_dtype = spec.acc_dtype
    acc = te.compute((n_, cb, oh, owp, ol), lambda n, b, y, xx, o: te.sum(
        xp[n, b, y * sh + ry * dh, xx * sw + rx * dw, o].astype(acc_dtype)
        * wt[b, ry, rx, o].astype(acc_dtype), axis=[ry, rx]), name="conv")
    return x, wt, acc


def _compute(spec: ConvKernelSpec, tile_w: int, tile_oc: int) -> Any:
    """The TE definition (pack, conv, epilogue, unpack) as a PrimFunc."""
    if spec.depthwise:
        x, wt, acc = _depthwise(spec, tile_w)
    else:
        x, wt, acc = _dense(spec, tile_w, tile_oc)
    return _finish(spec, x, wt, acc)


def _dense(spec: ConvKernelSpec, tile_w: int, tile_oc: int) -> tuple[Any, Any, Any]:
    """Dense pack + conv: ``[N, ICB, Hp, Wp, (G,) L]`` operands, the intrinsic's inner product."""
    te = load_tvm().te
    n_ = spec.batch
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation
    if spec.im2col:  # the conv proper is a 1x1 over the im2col pack's K channels
        (kh, kw), (sh, sw), (dh, dw) = (1, 1), (1, 1), (1, 1)
    oh, ow = spec.out_size
    owp = -(-ow // tile_w) * tile_w
    lanes, groups = spec.lanes, spec.groups
    icb, ocb = spec.in_blocks, spec.out_blocks(tile_oc)
    # a strided 1x1 conv packs only the pixels it reads (``subsamples``): the pack's (y, x) is
    # the padded input's (y * sh, x * sw), and the conv then reads the pack with stride 1
    ps = (sh, sw) if subsamples(spec, tile_w) else (1, 1)
    csh, csw = sh // ps[0], sw // ps[1]  # the conv's stride over its operand
    hp, wp = (oh - 1) * csh + dh * (kh - 1) + 1, (owp - 1) * csw + dw * (kw - 1) + 1
    act = {"wd": "int16", "sdot": "int8"}.get(spec.kind, "uint8")
    gdim = (groups,) if groups > 1 else ()
    ol = spec.oc_lanes

    cg = spec.conv_groups
    wt = te.placeholder(((cg,) if cg > 1 else ()) + (ocb, icb, kh, kw) + gdim + (ol, lanes),
                        act.replace("uint", "int"), name="w")

    def weight(n: Any, index: tuple[Any, ...]) -> Any:
        """``wt[index]``; of batch entry ``n``'s group when the batch holds groups."""
        return wt[(n % cg,) + index] if cg > 1 else wt[index]

    rb, ry, rx = (te.reduce_axis((0, icb), "rb"), te.reduce_axis((0, kh), "ry"),
                  te.reduce_axis((0, kw), "rx"))
    rg, rl = te.reduce_axis((0, groups), "rg"), te.reduce_axis((0, lanes), "rl")
    red = [rb, ry, rx] + ([rg] if groups > 1 else []) + [rl]
    gi = (rg,) if groups > 1 else ()
    if reads_directly(spec, tile_w):  # no pack stage: the packed input viewed in groups
        x = te.placeholder(direct_input_shape(spec), "uint8", name="x")
        per = spec.in_lanes // (lanes * groups)

        def direct(n: Any, ob: Any, y: Any, xx: Any, o: Any) -> Any:
            a = x[(n, rb // per, y * sh, xx * sw, rb % per) + gi + (rl,)]
            b = weight(n, (ob, rb, ry, rx) + gi + (o, rl))
            return te.sum(a.astype("int32") * b.astype("int32"), axis=red)

        return x, wt, te.compute((n_, ocb, oh, owp, ol), direct, name="conv")
    x = _input(spec)
    if packs_blocks(spec):  # pack whole lane blocks (spatial padding + offset), viewed in groups
        per = spec.in_lanes // (lanes * groups)
        cb_in = -(-spec.in_channels // spec.in_lanes)

        def block_pack(n: Any, b: Any, y: Any, xx: Any, j: Any, *gl: Any) -> Any:
            g, lane = gl if groups > 1 else (0, gl[0])
            return _block_value(x, spec, n, b, y * ps[0], xx * ps[1],
                                (j * groups + g) * lanes + lane, act)

        xb = te.compute((n_, cb_in, hp, wp, per) + gdim + (lanes,), block_pack, name="pack")

        def conv_blocks(n: Any, ob: Any, y: Any, xx: Any, o: Any) -> Any:
            a = xb[(n, rb // per, y * csh + ry * dh, xx * csw + rx * dw, rb % per) + gi
                   + (rl,)]
            b = weight(n, (ob, rb, ry, rx) + gi + (o, rl))
            return te.sum(a.astype("int32") * b.astype("int32"), axis=red)

        return x, wt, te.compute((n_, ocb, oh, owp, ol), conv_blocks, name="conv")

    def pack(n: Any, b: Any, y: Any, xx: Any, *gl: Any) -> Any:
        g, lane = gl if groups > 1 else (0, gl[0])
        if spec.im2col:
            return _im2col_value(x, spec, n, (b * groups + g) * lanes + lane, y, xx, act)
        return _packed_value(x, spec, n, (b * groups + g) * lanes + lane, y * ps[0],
                             xx * ps[1], act)

    xp = te.compute((n_, icb, hp, wp) + gdim + (lanes,), pack, name="pack")

    def conv(n: Any, ob: Any, y: Any, xx: Any, o: Any) -> Any:
        a = xp[(n, rb, y * csh + ry * dh, xx * csw + rx * dw) + gi + (rl,)]
        b = weight(n, (ob, rb, ry, rx) + gi + (o, rl))
        return te.sum(a.astype("int32") * b.astype("int32"), axis=red)

    return x, wt, te.compute((n_, ocb, oh, owp, ol), conv, name="conv")


def split_shift_ok(shifts: np.ndarray) -> bool:
    """Whether every requantization shift is at least 32 (:attr:`ConvKernelSpec.split_shift`)."""
    return bool(shifts.size and shifts.min() >= 32)


def _requantize(spec: ConvKernelSpec, product: Any, shift: Any) -> Any:
    """``product >> shift`` (arithmetic, int64 ``product = acc * m + R``).

    With ``spec.split_shift`` (every shift ``s >= 32``; ``shift`` holds ``s - 32`` as int32):
    ``int32(product >> 32) >> (s - 32)``. Equal for every int64 ``product``: arithmetic right
    shifts are floor divisions by powers of two and ``floor(floor(p / 2^32) / 2^(s-32)) =
    floor(p / 2^s)``; ``product >> 32`` fits int32 because ``|product| < 2^63``. On AVX2 (no
    64-bit arithmetic shift, no 64-bit min/max) the int64 form costs a logical shift with sign
    fix-ups and compare-and-blend clips per 4 lanes; this one takes the high words and does one
    ``vpsravd`` and int32 ``vpminsd``/``vpmaxsd`` per 8 lanes (the epilogue was most of the
    instructions of 1x1 and depthwise kernels, which do 9-64 MACs per output).
    """
    if spec.split_shift:
        return (product >> 32).astype("int32") >> shift
    return product >> shift


def epilogue_params(spec: ConvKernelSpec) -> tuple[tuple[str, str], ...]:
    """``(name, dtype)`` of the requantization parameters a kernel of ``spec`` takes after its
    int32 ``bias`` (none for an int32 output), in order (``emit.py`` passes them so)."""
    if spec.out_dtype == "int32":
        return ()
    if spec.int32_requant:
        return tuple((name, "int32") for name in ("m", "rnd", "shift", "lo", "hi"))
    return (("m", spec.mult_dtype), ("rnd", "int64"),
            ("shift", "int32" if spec.split_shift else "int64"))


def io_shapes(spec: ConvKernelSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input and output buffer shapes of a kernel that reads NCHW or packed
    ``[N, ceil(C/L), H, W, L]`` (``spec.in_lanes``) and writes NCHW or packed
    (``spec.out_lanes``): the pixels-in-lanes and Winograd kernels."""
    n, c, (oh, ow), oc = spec.batch, spec.in_channels, spec.out_size, spec.out_channels
    li, lo = spec.in_lanes, spec.out_lanes
    x_shape = (n, -(-c // li), spec.height, spec.width, li) if li else \
        (n, c, spec.height, spec.width)
    out_shape = (n, -(-oc // lo), oh, ow, lo) if lo else (n, oc, oh, ow)
    return x_shape, out_shape


def all_params_dtypes(spec: ConvKernelSpec) -> tuple[str, str, str]:
    """Dtypes of ``m``, ``rnd``, ``shift`` of a kernel that takes every requantization
    parameter whether it reads them or not (:func:`epilogue_params`; int64 for an int32
    output, which reads none)."""
    dtypes = dict(epilogue_params(spec)) or {"m": "int64", "rnd": "int64", "shift": "int64"}
    return dtypes["m"], dtypes["rnd"], dtypes["shift"]


def epilogue_value(spec: ConvKernelSpec, acc: Any, c: Any, params: dict[str, Any]) -> Any:
    """The epilogue of one int32 accumulator ``acc`` of output channel ``c`` (TE or TIR
    expressions; ``params``: ``bias`` and :func:`epilogue_params`' buffers by name).

    ``acc * 2^k + bias`` for an int32 output; else the code: in int32 (``int32_requant``),
    ``clip((clamp(acc, lo, hi) * m + rnd) >> shift)``; in int64, ``acc * 2^k`` (int32) times
    ``m`` plus ``rnd`` (``bias_in_round``: ``rnd`` holds ``bias * m + R``) or ``(acc * 2^k +
    bias) * m + R``, shifted by :func:`_requantize`, clipped."""
    tirx = load_tvm().tirx
    bias = params["bias"]
    if spec.out_dtype == "int32":
        return acc * (1 << spec.acc_shift) + bias[c]
    m, rnd, shift = params["m"], params["rnd"], params["shift"]
    if spec.int32_requant:
        a = tirx.max(tirx.min(acc, params["hi"][c]), params["lo"][c])
        q = (a * m[c] + rnd[c]) >> shift[c]
    else:
        scaled = acc * (1 << spec.acc_shift)
        if spec.bias_in_round:  # rnd holds bias * m + R (emit.py)
            product = scaled.astype("int64") * m[c].astype("int64") + rnd[c]
        else:
            product = (scaled + bias[c]).astype("int64") * m[c].astype("int64") + rnd[c]
        q = _requantize(spec, product, shift[c])
    return tirx.max(tirx.min(q, spec.qmax), spec.qmin).astype(spec.out_dtype)


def _finish(spec: ConvKernelSpec, x: Any, wt: Any, acc: Any) -> Any:
    """Epilogue (bias, requantization) and unpack to NCHW; the whole PrimFunc."""
    te = load_tvm().te
    n_, oc, ol = spec.batch, spec.out_channels, spec.oc_lanes
    oh, ow = spec.out_size
    ocb, cg = int(acc.shape[1]), spec.conv_groups
    bias = te.placeholder((cg * ocb * ol,), "int32", name="bias")
    named = {"bias": bias}
    for name, dtype in epilogue_params(spec):
        named[name] = te.placeholder((cg * ocb * ol,), dtype, name=name)
    params = [x, wt, *named.values()]

    def channel(n: Any, ob: Any, o: Any) -> Any:
        """The epilogue parameters' index of lane ``o`` of block ``ob`` (of ``n``'s group)."""
        return (n % cg * ocb + ob) * ol + o if cg > 1 else ob * ol + o

    epi = te.compute(acc.shape, lambda n, ob, y, xx, o: epilogue_value(
        spec, acc[n, ob, y, xx, o].astype("int32"), channel(n, ob, o), named), name="epilogue")
    if spec.out_lanes:  # packed output: the epilogue's blocks, padded channels included
        if spec.out_lanes != ol:
            raise ValueError(f"packed output needs {ol} lanes, got {spec.out_lanes}")
        out = te.compute((n_, -(-oc // ol), oh, ow, ol),
                         lambda n, b, y, xx, o: epi[n, b, y, xx, o], name="unpack")
    else:
        out = te.compute((n_, oc, oh, ow), lambda n, c, y, xx: epi[n, c // ol, y, xx, c % ol],
                         name="unpack")
    return te.create_prim_func(params + [out])


def _schedule(func: Any, spec: ConvKernelSpec, tile_w: int, tile_oc: int) -> Any:
    """The fixed schedule: register tile, tensorized inner product, fused epilogue."""
    tvm = load_tvm()
    sch = tvm.s_tir.Schedule(func)
    conv = sch.get_sblock("conv")
    writeback = sch.cache_write(conv, 0, "local")
    parallel = runs_parallel(spec)
    if spec.depthwise:
        return _schedule_depthwise(sch, conv, writeback, tile_w, lanes_aligned(spec),
                                   batch_outer(spec), parallel)
    loops = sch.get_loops(conv)
    n, ob, y, xx, o = loops[:5]
    rb, ry, rx, *inner = loops[5:]
    obo, obi = sch.split(ob, [None, tile_oc])
    xo, xi = sch.split(xx, [None, tile_w])
    sch.reorder(n, obo, y, xo, rb, ry, rx, xi, obi, o, *inner)
    pack = not reads_directly(spec, tile_w)
    if batch_outer(spec, tile_w):  # one image per parallel iteration, its pack just before
        sch.fuse(obo, y)
        _schedule_stages(sch, n, xo, writeback, pack=pack, vector_lanes=packs_blocks(spec),
                         pack_at=n, parallel=parallel)
    else:
        _schedule_stages(sch, sch.fuse(n, obo, y), xo, writeback, pack=pack,
                         vector_lanes=packs_blocks(spec), im2col=spec.im2col, parallel=parallel)
    init = sch.decompose_reduction(conv, rb)
    sch.tensorize(o, intrin_name(spec.kind, spec.groups))
    sch.unroll(xi)
    sch.unroll(obi)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(writeback)[-1])
    return sch.mod["main"]


def _schedule_depthwise(sch: Any, conv: Any, writeback: Any, tile_w: int,
                        vector_pack: bool = False, per_block: bool = False,
                        parallel: bool = True) -> Any:
    """Depthwise: channels vectorized, ``tile_w`` columns x all taps unrolled in registers;
    ``per_block``: one (image, channel block) per parallel iteration, its pack right before
    its conv (:func:`batch_outer`)."""
    n, b, y, xx, o, ry, rx = sch.get_loops(conv)
    xo, xi = sch.split(xx, [None, tile_w])
    sch.reorder(n, b, y, xo, ry, rx, xi, o)
    if per_block:
        outer = sch.fuse(n, b)
        _schedule_stages(sch, outer, xo, writeback, vector_lanes=vector_pack, pack_at=outer,
                         parallel=parallel)
    else:
        _schedule_stages(sch, sch.fuse(n, b, y), xo, writeback, vector_lanes=vector_pack,
                         parallel=parallel)
    sch.vectorize(o)
    init = sch.decompose_reduction(conv, ry)
    sch.unroll(xi)
    sch.unroll(rx)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(writeback)[-1])
    return sch.mod["main"]


#: The pack's column loop is unrolled when the padded row is at most this wide.
PACK_UNROLL_WIDTH = 32


def _schedule_pack(sch: Any, vector_lanes: bool = False, at: Any = None,
                   im2col: bool = False, parallel: bool = True) -> None:
    """The pack stage as its own parallel loop nest over (image, channel block, row), or, with
    ``at``, computed under the conv's loop ``at`` (only the part that iteration reads).

    The channel-lane loops (and narrow rows) are unrolled: each lane's channel index, bounds test
    and clamp then fold to constants per unrolled copy, which made the pack of a 9-channel 28x28
    batch-32 input 5-10x faster than the rolled scalar loop (it cost 70 % of that conv kernel).
    """
    pack = sch.get_sblock("pack")
    if at is not None:
        sch.compute_at(pack, at)
        lane_dims = len(sch.get(pack).iter_vars) - 4  # after (n, b, y, x): lanes (, groups)
        # compute_at creates no loop for an extent-1 region (one channel block, a 1x1
        # image): the lane loops are innermost and never extent 1, a column loop may be gone
        loops = sch.get_loops(pack)
        at_loop = sch.get(at)
        own = loops[1 + next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(at_loop)):]
        lanes = own[-lane_dims:]
        cols = own[-lane_dims - 1] if len(own) > lane_dims else None
    elif im2col:  # rows parallel; blocks, columns, lanes unrolled: each tap's index folds
        n, b, y, cols, *lanes = sch.get_loops(pack)
        sch.reorder(n, y, b, cols, *lanes)
        rows = sch.fuse(n, y)
        if parallel:
            sch.parallel(rows)
        sch.unroll(b)
    else:
        loops = sch.get_loops(pack)
        rows = sch.fuse(*loops[:3])
        if parallel:
            sch.parallel(rows)
        cols, lanes = loops[3], loops[4:]
    if vector_lanes:  # lanes_aligned / packs_blocks: one vector per pixel
        sch.vectorize(sch.fuse(*lanes) if len(lanes) > 1 else lanes[0])
    else:
        for lane in lanes:
            sch.unroll(lane)
    if cols is not None and int(sch.get(cols).extent) <= PACK_UNROLL_WIDTH:
        sch.unroll(cols)


def _schedule_stages(sch: Any, outer: Any, xo: Any, writeback: Any, pack: bool = True,
                     vector_lanes: bool = False, pack_at: Any = None,
                     im2col: bool = False, parallel: bool = True) -> None:
    """Around the conv's register tile loop ``xo`` (under the fused ``outer`` loop): the
    write-back with the epilogue inlined, then the unpack of that tile right after it (while it
    is in cache, inside the parallel loop rather than in a serial pass over the whole output
    afterwards); ``outer`` parallel (if ``parallel``, :func:`runs_parallel`); the pack
    (:func:`_schedule_pack`), if there is one, under ``pack_at`` if given."""
    sch.reverse_compute_at(writeback, xo)
    sch.reverse_compute_inline(sch.get_sblock("epilogue"))
    sch.reverse_compute_at(sch.get_sblock("unpack"), xo)
    if parallel:
        sch.parallel(outer)
    if pack:
        _schedule_pack(sch, vector_lanes, pack_at, im2col, parallel)


#: Work per call (MACs, plus :data:`OUTPUT_WORK` per output element for the pack, epilogue and
#: unpack) below which a kernel runs on the calling thread (:func:`runs_parallel`).
PARALLEL_MIN_WORK = 1 << 23
#: MAC-equivalents of one output element's share of pack, epilogue and unpack (~0.6 ns, what
#: the 1x1 stride-2 shortcut of resnet20 spends per output on AVX2).
OUTPUT_WORK = 64


def runs_parallel(spec: ConvKernelSpec) -> bool:
    """Whether the kernel's outer loops are parallel (else it runs on the calling thread).

    A parallel loop wakes the thread pool's workers on every call; with workers that do not spin
    (``TVM_THREAD_POOL_SPIN_COUNT=0``, as every latency benchmark here runs, so that backends do
    not steal each other's cores) that cost ~37 us per kernel on this machine: mobilenetv2 at
    batch 1 took 1.15 ms with 2 threads against 0.19 ms with 1, every kernel of it doing under
    a million MACs. Below :data:`PARALLEL_MIN_WORK` (~80 us of one core) the wake-up costs more
    than the second core saves."""
    oh, ow = spec.out_size
    return spec.macs + OUTPUT_WORK * spec.batch * spec.out_channels * oh * ow \
        >= PARALLEL_MIN_WORK


#: Batches at least this large run one image per parallel iteration (:func:`batch_outer`).
BATCH_OUTER_MIN = 2


def batch_outer(spec: ConvKernelSpec, tile_w: int = 0) -> bool:
    """Whether the kernel of ``spec`` runs its batch as the outer parallel axis, packing each
    image (each image's channel block, for a depthwise kernel) right before its conv.

    At batch 32 the whole padded input (3.4 MB of int16 for a 61-channel 28x28 depthwise layer)
    was packed in one pass and read back from memory by the conv; one image's part stays in
    cache between the two. Measured (``benchmarks/latency/kernels_avx2_ab.py``, haswell, batch
    32): depthwise 1.3-1.6x faster, a 1x1 dense kernel with a pack stage 1.09x; but 3x3 dense
    kernels 0.9x and 1x1 kernels without a pack (:func:`reads_directly`) 0.8x, so those keep
    the rows as the parallel axis, as batch 1 does."""
    if spec.batch < BATCH_OUTER_MIN:
        return False
    if spec.depthwise:
        return True
    return spec.kernel == (1, 1) and not reads_directly(spec, tile_w)


def build_conv_kernel(spec: ConvKernelSpec) -> tuple[Any, tuple[int, int]]:
    """The scheduled PrimFunc of ``spec`` and its ``(tile_w, tile_oc)``.

    Parameters of the PrimFunc, in order: activations (NCHW, ``spec.in_dtype``), packed weights
    (:func:`pack_weight`), int32 bias (padded to the channel blocks), then for a requantizing
    kernel int64 ``m``, rounding term and ``shift`` (same padding), and the NCHW output.
    """
    if not spec.depthwise:  # only the intrinsic this kernel is tensorized with
        register_intrinsics(spec.kind, spec.groups)
    tile_w, tile_oc = choose_tiles(spec)
    func = _schedule(_compute(spec, tile_w, tile_oc), spec, tile_w, tile_oc)
    return func, (tile_w, tile_oc)
