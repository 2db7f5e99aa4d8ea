"""Kernel selection for integer conv/linear layers: the fastest variant that is provably exact.

Pure Python (no TVM): the choice depends on the layer's integer ranges, its weights and the
target's features, and is recorded as a frozen :class:`KernelChoice` per layer. Bounds
(``docs/tvm_backend.md``, "Integer kernels"):

* ``avx512_vnni``: activations shifted to ``[0, span]`` (``span <= 255``), weights in int8;
  ``vpdpbusd`` sums four u8 x s8 products into int32 without intermediate saturation, so only the
  accumulator bound below applies (W8A8 included). Chosen first where the target has it.
* ``amx_int8`` (x86 with AMX-INT8, ``kernels/amx.py``): the operands of ``avx512_vnni``
  (activations shifted to ``[0, span]``, ``span <= 255``, weights in int8); ``tdpbusd`` sums
  four u8 x s8 products at full width into each int32 element of a 16 x 16 tile without
  intermediate saturation, so only the accumulator bound below applies. Chosen before VNNI for
  dense convs and 2-D linears whose shape pays for 16 x 64 tiles (:func:`amx_pays`), else VNNI.
* ``avx2_u8s8_p{P}``: activations shifted to ``[0, span]`` (``span <= 255``), weights in int8;
  ``vpmaddubsw`` pair sums and ``P`` of them summed in int16 are exact iff
  ``2 * P * span * max|w| <= 32767``; P = 4, 2, 1 tried in that order. A 1x1 conv on packed
  ``NCHW8c`` input then lowers P to 2 (:func:`fit_groups_to_lanes`) to read it without a pack.
* ``avx2_s16``: int16 operands through ``vpmaddwd``: exact iff ``span <= 32767``,
  ``max|w| <= 32767`` and ``2 * span * max|w| <= 2^31 - 1``.
* ``avx512_dw16`` / ``avx2_dw8``: depthwise convs (``groups == channels``), channels in the
  vector lanes, int16 operands multiplied and summed in int32: exact iff ``span <= 32767`` and
  ``max|w| <= 32767``. ``..._acc16``: the same with products and tap sums in int16 (twice the
  lanes per instruction, no widening before the epilogue): exact iff every partial sum fits,
  i.e. ``span * max_c sum_taps |w_c| <= 32767`` (operands are in ``[0, span]`` after the
  offset), e.g. 3x3 taps of 5-bit weights on 8-bit activations.
* all of them need the whole accumulator (offset correction and ``acc_shift`` included) to fit
  int32, checked from the weights: ``max_o sum|w_o| * span * 2^k + max|bias'| <= 2^31 - 1``.
* grouped (non-depthwise) convs with groups at least ``MIN_GROUP_IN -> MIN_GROUP_OUT`` channels
  wide take the dense variants: one kernel whose batch is the images x groups
  (:data:`GROUPED_KINDS`, every dense kind); narrower groups are first merged block-diagonally
  (:func:`merge_groups`).
* ``neon_sdot`` (aarch64 with ``dotprod``): operands shifted into int8 (offset 0 when the codes
  already lie in ``[-128, 127]``, else ``-128 - lo``: needs ``hi - lo <= 255``), weights in
  ``[-128, 127]``; ``sdot`` adds four full-width s8 x s8 products (each ``|p| <= 2^14``, their sum
  ``<= 2^16``) to an int32 lane with no intermediate rounding or saturation, so it is exact
  whenever the accumulator bound below holds (W8A8 included). ``udot`` (u8 x u8) would need
  non-negative weights and ``usdot`` (u8 x s8) needs ``i8mm`` (Armv8.6), hence the offset.
  Dense and grouped convs and 2-D linears.
* ``neon_dw8`` (aarch64 depthwise): the depthwise kernel of ``avx2_dw8`` (int16 operands, int32
  products and sums, 8 channels in lanes), vectorized by LLVM into NEON ``smlal``; same bound.
* ``avx2_px16`` (:func:`narrow_pixels`, ``conv2d_narrow.py``): stride-1 dense convs on AVX2
  (no VNNI) whose channel-lane kernel would pad most of its work (few output channels, e.g.
  13 -> 9): 16 output pixels in the lanes, ``vpmaddubsw`` over channel pairs, every partial
  sum in int16: exact iff ``span <= 255``, ``max|w| <= 127`` and
  ``span * max_o sum|w_o| <= 32767``.
* ``avx512_px16`` (the same rule and kernel, :data:`PX16_VNNI`): stride-1 dense convs that
  would get ``avx512_vnni`` and pad its 16 channel lanes most: ``vpdpbusd`` over channel quads
  of 16 output pixels, sums in int32: the bounds of ``avx512_vnni`` (W8A8 included).
* ``avx2_wino_s16`` (:func:`winograd`, ``winograd.py``): 3x3 stride-1 undilated dense convs
  of >= 28 input channels that would get ``avx2_s16`` (W8A8 and wider) or ``avx2_u8s8_p1``
  (W7A8): Winograd F(2x2, 3x3) with integer transforms, 16 ``vpmaddwd`` products per 2x2
  outputs instead of 36. Exact iff ``4 * span <= 32767`` (the transformed activations), every
  transformed weight ``|U| <= 32767`` and ``max_o sum|w_o| * span <= 2^29 - 1``: the sums
  after each exact ``vpmaddwd`` run modulo 2^32 and give ``4 Y`` modulo 2^32, hence ``Y``
  modulo 2^30 (:func:`winograd_bounds`).
* ``avx2_wino4_s16`` (:func:`winograd`, the same kernel): Winograd F(4x4, 3x3), 36 products per
  4x4 outputs instead of 144, tried first on 3x3 stride-1 dense convs that would get any AVX2
  channel-lane kernel (:func:`_winograd4_replaces`). The same three bounds with F(4, 3)'s
  integer matrices (:data:`WINOGRAD_F4`): ``100 * span <= 32767``, ``|U| <= 32767`` and
  ``max_o sum|w_o| * span <= 2^25 - 1`` (``576 Y`` modulo 2^32 gives ``Y`` modulo 2^26).
* ``default``: TVM's generic lowering (int32 or int64 accumulators), for everything else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .intrin import UBSW_GROUPS

__all__ = ["GROUPED_KINDS", "INT16_MAX", "INT32_MAX", "KernelChoice", "LayerFacts", "amx_pays",
           "fit_groups_to_lanes", "merge_factor", "merge_groups", "narrow_pixels",
           "PIXEL_KERNELS", "PIXEL_LANES", "PixelKernel", "PX16_AVX2", "PX16_VNNI", "pixel_tiles",
           "select_kernel", "winograd", "winograd_bounds", "WINOGRAD_F2", "WINOGRAD_F4",
           "WinogradScheme"]

INT16_MAX = 2**15 - 1
INT32_MAX = 2**31 - 1
#: Grouped (non-depthwise) convs take the dense kernels when the groups are this wide.
MIN_GROUP_IN, MIN_GROUP_OUT = 4, 8
#: Intrinsic families whose dense kernel (``conv2d._dense``; CUDA's ``dp4a`` schedules the same
#: definition) runs every group of a grouped conv in one kernel (``ConvKernelSpec.conv_groups``):
#: every dense kind that takes grouped convs (AMX's kernels are dense only: VNNI takes them).
GROUPED_KINDS = ("ubsw", "wd", "vnni", "sdot", "dp4a")
#: Narrower groups are merged, ``k`` adjacent groups into one block-diagonal group
#: (:func:`merge_groups`), for ``k`` up to this: ``k`` times the multiply-adds, against
#: TVM's generic lowering at ~4 GMAC/s (15-30x slower than the written kernels).
MAX_MERGE = 8
#: A grouped conv in the packed layout merges further (up to this factor more multiply-adds than
#: the narrowest merge that fits) to fill whole lane blocks and stay packed (:func:`merge_factor`):
#: on this CPU's VNNI/AMX build ResNeXt-50 (its 4- and 8-channel groups merged to 16 lanes, every
#: grouped conv packed) measured 2.86x the generic lowering against 2.13x with the narrowest
#: merges, in one run (``benchmarks/latency/grouped_ab.py``).
LANE_MERGE_EXTRA = 2


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel a layer got, and why it is exact (one record per conv/linear layer).

    Attributes:
        layer: The fx node name.
        op: ``"conv2d"`` or ``"linear"``.
        variant: ``"amx_int8"``, ``"avx512_vnni"``, ``"avx2_u8s8_p4"``, ``"avx2_u8s8_p2"``,
            ``"avx2_u8s8_p1"``, ``"avx2_s16"``, ``"avx2_wino_s16"`` / ``"avx2_wino4_s16"``
            (Winograd F(2x2, 3x3) / F(4x4, 3x3), :func:`winograd`), ``"avx2_px16"`` /
            ``"avx512_px16"`` (pixels in lanes, :func:`narrow_pixels`), ``"avx512_dw16"``,
            ``"avx2_dw8"``,
            ``"neon_sdot"``, ``"neon_dw8"`` (aarch64; depthwise variants with ``"_acc16"``:
            int16 tap sums), ``"cuda_dp4a"`` (CUDA, ``kernels/cuda_select.py``) or
            ``"default"`` (TVM's generic lowering).
        bound: The inequality the variant relies on, with this layer's numbers.
        note: Why this variant (for ``default``: why no written kernel applies).
        macs: Multiply-accumulates of one call.
        in_layout: The layout the kernel read its input in (``"NCHW"`` or ``"NCHW16c"``,
            ``backends/tvm/layout.py``); set when the layer is emitted.
        out_layout: The layout it wrote its output in.
        epilogue: How the kernel finished its accumulators (``emit.epilogue_form``: ``"int32
            requantization"`` where a :mod:`.requant32` plan exists, ``"int64
            requantization"``, ``"int32 accumulator"`` for a float-output layer); set when the
            layer is emitted.
        preferred: Why this written variant was taken over another that is exact too (the
            padded-work comparison of :func:`narrow_pixels`); empty where no second written
            kernel competed.
    """

    layer: str
    op: str
    variant: str
    bound: str
    note: str
    macs: int
    in_layout: str = "NCHW"
    out_layout: str = "NCHW"
    epilogue: str = ""
    preferred: str = ""

    @property
    def kind(self) -> str | None:
        """Intrinsic family: ``"ubsw"``, ``"wd"``, ``"vnni"``, ``"sdot"`` or ``None`` (default)."""
        if self.variant.startswith("avx2_u8s8"):
            return "ubsw"
        return {"avx2_s16": "wd", "avx512_vnni": "vnni", "amx_int8": "amx", "avx512_dw16": "dw16",
                "avx2_dw8": "dw8", "neon_sdot": "sdot", "cuda_dp4a": "dp4a",
                "neon_dw8": "dw8", "avx2_wino_s16": "wino", "avx2_wino4_s16": "wino4",
                **{k.variant: k.kind for k in PIXEL_KERNELS.values()},
                }.get(self.variant.removesuffix("_acc16"))

    @property
    def acc_dtype(self) -> str:
        """Dtype of the products and sums inside a depthwise kernel: ``"int16"`` for the
        ``_acc16`` variants, else ``"int32"``."""
        return "int16" if self.variant.endswith("_acc16") else "int32"

    @property
    def groups(self) -> int:
        """P, the number of vpmaddubsw results summed in int16 (1 for the other variants)."""
        return int(self.variant.rsplit("_p", 1)[1]) if self.kind == "ubsw" else 1


@dataclass(frozen=True)
class LayerFacts:
    """What selection reads about one layer (all derived from ranges and weights, never data).

    ``act_lo``/``act_hi`` is the input's integer range, ``weight`` the integer weights (any
    shape with the output channels first), ``bias`` the int bias, ``acc_shift`` the layer's ``k``.
    ``features`` are the target's CPU features this module knows (``"avx2"``, ``"avx512vnni"``,
    ``"dotprod"``; ``None``: no target given).
    """

    layer: str
    op: str
    act_lo: int
    act_hi: int
    weight: np.ndarray
    bias: np.ndarray
    acc_shift: int
    groups: int
    macs: int
    features: frozenset[str] | None
    target: str
    #: The layer reads and writes the packed ``NCHW{L}c`` layout (known when lowering a conv;
    #: ``False`` for NCHW input or output, linears, or unknown): AMX pays from narrower layers
    #: then (:func:`amx_pays`).
    packed_io: bool = False

    @property
    def act_offset(self) -> int:
        """Added to every activation so that the operand is unsigned (``-lo`` if ``lo < 0``)."""
        return -self.act_lo if self.act_lo < 0 else 0

    @property
    def span(self) -> int:
        """Largest operand after the offset, the zero padding's included: every kernel pads with
        code 0 plus the offset, so a range of negative codes only (``hi < 0``) still has the
        operand ``offset`` at the padding."""
        return max(self.act_hi, 0) + self.act_offset

    @property
    def depthwise(self) -> bool:
        """One input channel per output channel (``groups`` equal to the output channels)."""
        return self.groups == self.weight.shape[0] and self.weight.shape[1] == 1

    @property
    def w_max(self) -> int:
        return int(np.abs(self.weight).max(initial=0))

    def offset_for(self, kind: str | None) -> int:
        """The offset a kernel of intrinsic family ``kind`` adds to every activation:
        :attr:`act_offset` (unsigned operands) except for ``"sdot"`` (signed int8 operands: 0
        if the codes lie in ``[-128, 127]``, else ``-128 - lo``)."""
        if kind == "sdot":
            return 0 if self.act_lo >= -128 and self.act_hi <= 127 else -128 - self.act_lo
        return self.act_offset

    def kernel_bias(self, offset: int | None = None) -> np.ndarray:
        """The bias the kernel adds: ``bias - offset * sum_o(w) * 2^k`` (int64); ``offset``
        defaults to :attr:`act_offset`."""
        offset = self.act_offset if offset is None else offset
        rows = self.weight.reshape(self.weight.shape[0], -1).astype(np.int64).sum(axis=1)
        bias = np.broadcast_to(self.bias.astype(np.int64), rows.shape) if self.bias.size \
            else np.zeros_like(rows)
        return bias - offset * rows * (1 << self.acc_shift)

    def kernel_acc_bound(self, offset: int | None = None) -> int:
        """Bound on every int32 value the kernel forms (products, ``acc * 2^k``, ``+ bias'``)
        with activations shifted by ``offset`` (default :attr:`act_offset`)."""
        offset = self.act_offset if offset is None else offset
        # code 0 (the zero padding) included: a range without 0 still pads with it
        a_max = max(abs(self.act_lo + offset), abs(self.act_hi + offset), abs(offset))
        per_out = np.abs(self.weight.reshape(self.weight.shape[0], -1)).astype(np.int64).sum(1)
        conv = int(per_out.max(initial=0)) * a_max << self.acc_shift
        return conv + int(np.abs(self.kernel_bias(offset)).max(initial=0))


def _default(facts: LayerFacts, note: str) -> KernelChoice:
    return KernelChoice(facts.layer, facts.op, "default", "-", note, facts.macs)


def _select_depthwise(facts: LayerFacts, acc_text: str) -> KernelChoice:
    """Depthwise: int16 operands, int32 products; 16 lanes with AVX-512, else 8 with AVX2."""
    span, w_max = facts.span, facts.w_max
    if span > INT16_MAX or w_max > INT16_MAX:
        return _default(facts, f"depthwise operands too wide for int16 (span {span}, "
                               f"max|w| {w_max})")
    assert facts.features is not None  # checked by the caller
    if "dotprod" in facts.features:  # aarch64: 8 lanes = two NEON registers, smlal
        variant = "neon_dw8"
    else:
        variant = "avx512_dw16" if "avx512bw" in facts.features else "avx2_dw8"
    if variant == "avx2_dw8" and "avx2" not in facts.features:
        return _default(facts, f"target {facts.target} has no AVX2")
    taps = np.abs(facts.weight.reshape(facts.weight.shape[0], -1)).astype(np.int64).sum(1)
    tap_bound = span * int(taps.max(initial=0))
    if tap_bound <= INT16_MAX:
        return KernelChoice(facts.layer, facts.op, f"{variant}_acc16",
                            f"span {span} * max sum|w| {int(taps.max(initial=0))} = {tap_bound} "
                            f"<= 32767 (int16 products and tap sums); {acc_text}",
                            f"{facts.target}: depthwise, channels in lanes, int16 sums",
                            facts.macs)
    return KernelChoice(facts.layer, facts.op, variant,
                        f"span {span}, max|w| {w_max} <= 32767 (int16 x int16 products in "
                        f"int32; int16 sums need {tap_bound} <= 32767); {acc_text}",
                        f"{facts.target}: depthwise, channels in lanes", facts.macs)


def merge_factor(groups: int, in_g: int, out_g: int, lanes: int = 0) -> int:
    """How many adjacent groups :func:`merge_groups` merges for a grouped conv of ``groups``
    groups of ``in_g -> out_g`` channels: 1 if they are wide enough already, or if no divisor
    ``k <= MAX_MERGE`` of ``groups`` makes them so. Every kernel runs all groups in one call
    (:data:`GROUPED_KINDS`), so the group count is not bounded.

    ``lanes``: the packed layout's ``L`` where the layer reads or writes it (``0``: NCHW on
    both sides). Then the smallest such ``k`` whose merged groups also hold whole blocks of
    ``L`` channels on both sides is taken if it costs at most :data:`LANE_MERGE_EXTRA` times
    the smallest fitting one's multiply-adds: the kernel then reads and writes ``NCHW{L}c``
    (``layout.grouped_in_blocks``) instead of converting its input and output to NCHW and back.
    On AVX2 (``L = 8 = MIN_GROUP_OUT``) this changes nothing for power-of-two widths; with
    AVX-512/VNNI's 16 lanes ResNeXt's 8-channel groups merge in pairs."""
    def fits(k: int) -> bool:
        return k * in_g >= MIN_GROUP_IN and k * out_g >= MIN_GROUP_OUT

    ks = [k for k in range(1, MAX_MERGE + 1) if groups % k == 0 and fits(k)]
    if not ks:
        return 1
    filled = [k for k in ks if lanes > 0 and (k * in_g) % lanes == 0 and (k * out_g) % lanes == 0
              and k <= LANE_MERGE_EXTRA * ks[0]]
    return filled[0] if filled else ks[0]


def merge_groups(facts: LayerFacts, lanes: int = 0) -> tuple[LayerFacts, int]:
    """``facts`` of a grouped conv whose groups are too narrow for the kernels (fewer than
    ``MIN_GROUP_IN -> MIN_GROUP_OUT`` channels) or, with ``lanes`` > 0 (the layer in the packed
    layout), do not fill whole lane blocks, rewritten with every ``k`` adjacent groups merged
    into one: ``k`` as :func:`merge_factor` chooses it (a divisor of the group count, at most
    :data:`MAX_MERGE`).

    Merged group ``j`` reads the input channels of groups ``j*k .. j*k+k-1`` (adjacent, as in
    the layer) and its weight is block-diagonal: each original group's weights at its own input
    channels, zeros elsewhere. Every output is the same sum (the added products are a real
    activation times 0), so the codes are the same; each output's ``sum|w|``, hence every bound
    of the selection, is unchanged; the kernels do ``k`` times the multiply-adds. Returns
    ``(facts, 1)`` unchanged for a dense, depthwise or already wide enough layer, or when no
    such ``k`` exists."""
    groups, (oc, in_g) = facts.groups, facts.weight.shape[:2]
    if groups == 1 or facts.depthwise:
        return facts, 1
    out_g = oc // groups
    k = merge_factor(groups, in_g, out_g, lanes)
    if k == 1:
        return facts, 1
    merged = np.zeros((oc, k * in_g) + facts.weight.shape[2:], facts.weight.dtype)
    for g in range(groups):
        rows, j = slice(g * out_g, (g + 1) * out_g), g % k
        merged[rows, j * in_g:(j + 1) * in_g] = facts.weight[rows]
    return dataclasses.replace(facts, weight=merged, groups=groups // k), k


def select_kernel(facts: LayerFacts) -> KernelChoice:
    """The fastest variant provably exact for ``facts`` (``default`` when none is)."""
    if facts.features is None:
        return _default(facts, "no target given (lowered for tuning or inspection)")
    arm = "dotprod" in facts.features
    gpu = "dp4a" in facts.features  # CUDA: kernels/cuda_select.py
    if not arm and not gpu and not facts.features & {"avx2", "avx512vnni", "amx-int8"}:
        return _default(facts, f"target {facts.target} has no AVX2 (nor aarch64 dotprod); no "
                               "written kernel for it yet")
    depthwise = facts.depthwise
    if gpu and depthwise:
        return _default(facts, f"target {facts.target}: no CUDA depthwise kernel yet")
    if arm and depthwise:  # NEON: the same int16 x int16 -> int32 depthwise kernel
        bound = facts.kernel_acc_bound()
        if bound > INT32_MAX:
            return _default(facts, f"accumulator bound {bound} > 2^31-1 needs int64")
        return _select_depthwise(facts, f"acc bound {bound} <= 2^31-1")
    in_g, out_g = facts.weight.shape[1], facts.weight.shape[0] // facts.groups
    if facts.groups != 1 and not depthwise and (in_g < MIN_GROUP_IN or out_g < MIN_GROUP_OUT):
        return _default(facts, f"groups={facts.groups} with {in_g} -> {out_g} channels per "
                               f"group: grouped kernels need >= {MIN_GROUP_IN} -> "
                               f"{MIN_GROUP_OUT} channels")
    if arm:
        choice = _select_sdot(facts)
    elif gpu:
        from .cuda_select import select_dp4a

        choice = select_dp4a(facts)
    else:
        bound = facts.kernel_acc_bound()
        if bound > INT32_MAX:
            return _default(facts, f"accumulator bound {bound} > 2^31-1 needs int64")
        acc_text = f"acc bound {bound} <= 2^31-1"
        if depthwise:
            return _select_depthwise(facts, acc_text)
        choice = _select_dense(facts, acc_text)
    if facts.groups != 1 and choice.kind is not None:
        if choice.kind not in GROUPED_KINDS:
            return _default(facts, f"groups={facts.groups}: no grouped {choice.kind} kernel")
        return dataclasses.replace(choice, note=f"{choice.note}; {facts.groups} groups in one "
                                                "kernel, its batch the images x groups")
    return choice


def _select_dense(facts: LayerFacts, acc_text: str) -> KernelChoice:
    """Dense (or grouped) conv/linear: VNNI, then vpmaddubsw with P = 4, 2, 1, then int16."""
    assert facts.features is not None  # checked by the caller
    span, w_max = facts.span, facts.w_max
    if "amx-int8" in facts.features and span <= 255 and w_max <= 127:
        pays, why = amx_pays(facts)
        if pays:
            return KernelChoice(facts.layer, facts.op, "amx_int8",
                                f"span {span} <= 255, max|w| {w_max} <= 127 (tdpbusd sums "
                                f"exactly in int32); {acc_text}",
                                f"{facts.target}: u8 x s8 AMX tdpbusd tiles ({why})", facts.macs)
        amx_note = f"; AMX not used: {why}"
    else:
        amx_note = ""
    if "avx512vnni" in facts.features and span <= 255 and w_max <= 127:
        return KernelChoice(facts.layer, facts.op, "avx512_vnni",
                            f"span {span} <= 255, max|w| {w_max} <= 127 (vpdpbusd sums exactly "
                            f"in int32); {acc_text}", f"{facts.target}: u8 x s8 vpdpbusd"
                            f"{amx_note}", facts.macs)
    if "avx2" not in facts.features:
        return _default(facts, f"target {facts.target}: operands past u8 x s8 and no AVX2")
    if span <= 255 and w_max <= 127:
        for p in UBSW_GROUPS:
            if 2 * p * span * w_max <= INT16_MAX:
                p, why = _fewest_padded(facts.weight.shape, p)
                text = f"2*{p}*{span}*{w_max} = {2 * p * span * w_max} <= 32767; {acc_text}"
                return KernelChoice(facts.layer, facts.op, f"avx2_u8s8_p{p}", text,
                                    f"{facts.target}: u8 x s8 vpmaddubsw, {p} summed in int16"
                                    f"{why}", facts.macs)
    if span <= INT16_MAX and w_max <= INT16_MAX and 2 * span * w_max <= INT32_MAX:
        text = (f"2*{span}*{w_max} = {2 * span * w_max} <= 2^31-1 (vpmaddubsw bound "
                f"2*1*{span}*{w_max} = {2 * span * w_max} > 32767 or operands past 8 bits); "
                f"{acc_text}")
        return KernelChoice(facts.layer, facts.op, "avx2_s16", text,
                            f"{facts.target}: int16 x int16 vpmaddwd", facts.macs)
    return _default(facts, f"operands too wide for int16 (span {span}, max|w| {w_max})")


#: AMX is chosen only for layers with at least ``channels`` input channels (a tile row holds 64,
#: the rest is zero padding) and ``reduce`` products per output (``C * KH * KW``: the NCHW
#: epilogue and the per-iteration tile set-up are paid per output): ``PACKED`` when the layer
#: reads and writes ``NCHW16c``, ``NCHW`` otherwise (its NCHW pack and scalar NCHW scatter cost
#: more than VNNI's); and at least ``AMX_MIN_PIXELS`` output pixels per call (a tile holds 16).
#: Measured one thread (``benchmarks/latency/KERNELS_amx_*.md``), AMX / VNNI: packed 3x3 at 16
#: channels 1.00x, 32 channels 1.41x, 64 1.9-3.0x, 1x1 stride 2 on 128 channels 1.63x; NCHW 3x3
#: at 64 channels 1.09-1.29x, 128-256 1.3-2.1x, but 1x1 stride 2 on 128 channels 0.76x.
AMX_MIN_PACKED = {"channels": 32, "reduce": 128}
AMX_MIN_NCHW = {"channels": 64, "reduce": 576}
AMX_MIN_PIXELS = 16


def amx_pays(facts: LayerFacts) -> tuple[bool, str]:
    """Whether the AMX kernel is worth it for ``facts``' shape and layouts, and why (for the
    record). Dense (one group) only."""
    channels = int(facts.weight.shape[1])
    reduce = int(np.prod(facts.weight.shape[1:], dtype=np.int64))
    pixels = facts.macs // max(int(facts.weight.size), 1)
    least = AMX_MIN_PACKED if facts.packed_io else AMX_MIN_NCHW
    io = "packed in and out" if facts.packed_io else "NCHW in or out"
    if facts.groups != 1:
        return False, f"groups={facts.groups}: AMX kernel is dense only"
    if channels < least["channels"]:
        return False, (f"{channels} input channels < {least['channels']} ({io}; tile rows hold "
                       "64)")
    if reduce < least["reduce"]:
        return False, f"{reduce} products per output < {least['reduce']} ({io})"
    if pixels < AMX_MIN_PIXELS:
        return False, f"{pixels} output pixels per call < {AMX_MIN_PIXELS} (tiles hold 16)"
    # the kernel's offsets are int32 (amx.build_amx_kernel): its pack (input pixels, at most
    # stride^2 per output, times 64-padded channels) and output must stay below 2^31
    out_c = int(facts.weight.shape[0])
    if pixels * max(-(-out_c // 32) * 32, -(-channels // 64) * 64) * 16 > INT32_MAX:
        return False, f"{pixels} pixels per call: AMX kernel offsets would pass int32"
    return True, (f"{channels} channels, {reduce} products per output ({io}), {pixels} "
                  "pixels")


def reduce_width(shape: tuple[int, ...]) -> int:
    """Operands a dense kernel reduces over per output, before padding, for weights of
    ``shape`` (``O, C[, KH, KW]``): ``C`` per tap, or ``KH * KW * C`` for a spatial kernel on at
    most 4 channels (taps and channels reduced jointly: ``conv2d.im2col_pays``)."""
    channels, taps = int(shape[1]), int(np.prod(shape[2:], dtype=np.int64))
    return channels * taps if channels <= 4 and taps > 1 else channels


#: Relative MAC rate of the ``vpmaddubsw`` kernels by P (64 -> 64 3x3 at 28x28, haswell:
#: 112.0, 91.8, 77.7 GMAC/s, ``KERNELS_avx2.md``), for trading P against channel padding.
UBSW_RATE = {4: 1.0, 2: 0.82, 1: 0.69}


def _fewest_padded(shape: tuple[int, ...], p: int) -> tuple[int, str]:
    """For a spatial ``vpmaddubsw`` kernel whose bound allows ``P = p``: the ``P' <= p`` that
    does its real work fastest given the padding of the reduction to ``4 * P'`` operands
    (:func:`reduce_width`), and a note when it is lower than ``p``. Exact: the bound shrinks
    with P. Per tap: the most ``UBSW_RATE[P'] / padded`` (7 channels: P = 2, 8 not 16 operands,
    measured 1.5x faster on resnet20's 7 -> 13 layer; 11 channels stay at P = 4, 16, measured
    1.08x faster than P = 1 at 12). Taps and channels jointly (a stem): the fewest operands,
    since its im2col pack and its outputs dominate (1 channel 3x3: P = 1, 12 operands, 1.3x
    faster than P = 2 and 1.4x than P = 4 at 16; ``kernels_avx2_ab.py``). 1x1 kernels keep P:
    their reduction is short and :func:`fit_groups_to_lanes` sets P for packed inputs."""
    if int(np.prod(shape[2:], dtype=np.int64)) <= 1:
        return p, ""
    width = reduce_width(shape)
    joint = width != int(shape[1])
    padded = {g: -(-width // (4 * g)) * 4 * g for g in UBSW_GROUPS if g <= p}
    if joint:
        best = min(padded, key=lambda g: (padded[g], -g))
    else:
        best = max(padded, key=lambda g: (UBSW_RATE[g] / padded[g], g))
    if best == p:
        return p, ""
    per = "per output (taps x channels)" if joint else "per tap"
    return best, (f" (P lowered from {p}: {width} operands {per} pad to {padded[best]}, "
                  f"not {padded[p]})")


def _select_sdot(facts: LayerFacts) -> KernelChoice:
    """aarch64 dense (or grouped) conv/linear: s8 x s8 ``sdot`` with the activations shifted
    into int8, or ``default`` when the codes or weights do not fit int8 or the accumulator does
    not fit int32."""
    lo, hi = facts.act_lo, facts.act_hi
    w_lo = int(facts.weight.min(initial=0))
    w_hi = int(facts.weight.max(initial=0))
    if hi - lo > 255 or w_lo < -128 or w_hi > 127:
        return _default(facts, f"{facts.target}: sdot needs activation codes spanning <= 256 "
                               f"values and weights in [-128, 127] (codes [{lo}, {hi}], weights "
                               f"[{w_lo}, {w_hi}]); no wider aarch64 kernel yet")
    offset = facts.offset_for("sdot")
    bound = facts.kernel_acc_bound(offset)
    if bound > INT32_MAX:
        return _default(facts, f"accumulator bound {bound} > 2^31-1 needs int64")
    text = (f"codes [{lo}, {hi}] {offset:+d} and weights [{w_lo}, {w_hi}] in int8 (sdot sums "
            f"4 s8 x s8 products exactly into int32); acc bound {bound} <= 2^31-1")
    return KernelChoice(facts.layer, facts.op, "neon_sdot", text,
                        f"{facts.target}: s8 x s8 sdot (dotprod), activation offset {offset}",
                        facts.macs)


def fit_groups_to_lanes(choice: KernelChoice, facts: LayerFacts, lanes: int) -> KernelChoice:
    """``choice`` with P lowered so that ``4 * P`` input channels fit a packed block of
    ``lanes`` (``avx2_u8s8_p4`` on ``NCHW8c`` becomes ``p2``), letting a 1x1 kernel read the
    packed input without a pack stage (``conv2d.reads_directly``). Exact: the bound
    ``2 * P * span * max|w|`` only shrinks with P. Other choices are returned unchanged."""
    if choice.kind != "ubsw" or 4 * choice.groups <= lanes or lanes % 4:
        return choice
    p = max(g for g in UBSW_GROUPS if 4 * g <= lanes and lanes % (4 * g) == 0)
    span, w_max = facts.span, facts.w_max
    acc_text = choice.bound.split("; ", 1)[1] if "; " in choice.bound else ""
    text = f"2*{p}*{span}*{w_max} = {2 * p * span * w_max} <= 32767; {acc_text}"
    rest = choice.note[choice.note.index("; "):] if "; " in choice.note else ""  # groups
    note = (f"{facts.target}: u8 x s8 vpmaddubsw, {p} summed in int16 (P lowered from "
            f"{choice.groups} to read NCHW{lanes}c input directly){rest}")
    return dataclasses.replace(choice, variant=f"avx2_u8s8_p{p}", bound=text, note=note)


@dataclass(frozen=True)
class PixelKernel:
    """One instruction set's pixels-in-lanes kernel (``conv2d_narrow.py``): 16 output pixels
    in the vector lanes, the input channels multiplied ``group`` at a time per pixel.

    ``kind`` is the ``ConvKernelSpec.kind`` it builds, ``variant`` the :class:`KernelChoice`
    name, ``acc_dtype`` the accumulators' dtype, ``acc_regs`` the accumulator vectors a
    register tile holds, ``lanes`` the packed layout (``NCHW{lanes}c``) its pack and store
    read and write with vector shuffles (other layouts: scalar copies), ``channel_lanes`` the
    output channel block of the channel-lane kernel it replaces. ``splat_weights``: a tile of
    one pixel vector stores each weight group once and broadcasts it to the 16 lanes at the
    load (``vpdpbusd``'s ``{1to16}`` memory operand); otherwise (and always on AVX2) each
    group is stored as a whole vector, read as it is. VNNI, measured packed in and out, batch
    1 / 32, every narrow layer forced to this kernel in each form (scratch runs of
    ``kernels.py --narrow-gain 0``; the committed ``KERNELS_pxv_*.md`` time the rule's
    outcome): one vector per tile (9 -> 13, 7 -> 13)
    1.14 / 1.18x and 1.12 / 1.12x the channel lanes with broadcasts, 0.96 / 1.01x and 1.00 /
    1.04x with whole vectors; two or three (13 -> 9, 13 -> 7) 1.32 / 1.44x and 1.27 / 1.42x with
    whole vectors, 1.15 / 1.11x and 1.19 / 1.33x with broadcasts."""

    kind: str
    variant: str
    group: int
    acc_dtype: str
    acc_regs: int
    lanes: int
    channel_lanes: int
    splat_weights: bool


#: AVX2: ``vpmaddubsw`` on channel pairs, pair sums added in int16 (``vpaddw``): 32 products
#: per two instructions; 12 of the 16 ymm registers accumulate.
PX16_AVX2 = PixelKernel("px16", "avx2_px16", 2, "int16", 12, 8, 8, False)
#: AVX-512 VNNI: ``vpdpbusd`` on channel quads into int32 (64 products per instruction, no
#: int16 partial sums); 24 of the 32 zmm registers accumulate.
PX16_VNNI = PixelKernel("px16v", "avx512_px16", 4, "int32", 24, 16, 16, True)
#: Every pixels-in-lanes kernel by ``ConvKernelSpec.kind``.
PIXEL_KERNELS = {k.kind: k for k in (PX16_AVX2, PX16_VNNI)}

#: A pixels-in-lanes kernel is chosen for layers of at most ``NARROW_MAX_OUT`` output channels
#: when the channel-lane kernel computes at least ``NARROW_MIN_GAIN`` times its padded work
#: (``narrow_pixels``). AVX2, measured in the packed layout, as inside a model
#: (``benchmarks/latency/KERNELS_narrow.md``, haswell, batch 32, thread CPU time): work ratio
#: 1.90 -> 1.63x faster (13 -> 9), 1.71 -> 1.46x (9 -> 13), 1.22 -> 1.21x (13 -> 7),
#: 1.07 -> 1.07x (7 -> 13), but 1.04 -> 0.95x (31 -> 27 at 14x14); and mobilenetv2's wide 1x1
#: expansions (24 -> 95, ratio 1.33 from P = 4 padding) made the whole net 7 % slower: with many
#: output channels the narrow kernel re-reads its input per tile of 12 channels and the channel
#: lanes pad little, hence the width limit.
NARROW_MIN_GAIN = 1.1
NARROW_MAX_OUT = 16
#: Output pixels per vector of the pixels-in-lanes kernels.
PIXEL_LANES = 16


def _lane_work(shape: tuple[int, ...], p: int, lanes: int) -> int:
    """Products per output pixel of a channel-lane kernel: output channels padded to blocks
    of ``lanes`` (AVX2 8, VNNI 16), the reduction to groups of ``4 * P`` (per tap, or jointly:
    ``reduce_width``)."""
    oc, taps = int(shape[0]), int(np.prod(shape[2:], dtype=np.int64))
    width = reduce_width(shape)
    padded = -(-width // (4 * p)) * 4 * p
    per_out = padded if width != int(shape[1]) else padded * taps
    return -(-oc // lanes) * lanes * per_out


def pixel_tiles(out_channels: int, kernel: PixelKernel) -> tuple[int, int]:
    """``(tile_o, vectors)`` of a pixels-in-lanes kernel: output channels x 16-pixel vectors
    held in registers. ``tile_o * vectors <= acc_regs`` accumulators; the channels are split
    into the fewest tiles of at most ``acc_regs`` (AVX2: 13 -> 2 x 7, 9 -> 9), padded with
    zero-weight channels to whole tiles; the spare registers go to more pixel vectors (reusing
    each weight vector)."""
    n_tiles = -(-out_channels // kernel.acc_regs)
    tile_o = -(-out_channels // n_tiles)
    return tile_o, max(1, kernel.acc_regs // tile_o)


def _narrow_work(shape: tuple[int, ...], out_w: int, pad_w: int, kernel: PixelKernel) -> float:
    """Products per output pixel of a pixels-in-lanes kernel: channels padded to whole tiles,
    input channels to ``group``, rows computed over the padded width ``W + 2 * pw``."""
    oc, ic, taps = int(shape[0]), int(shape[1]), int(np.prod(shape[2:], dtype=np.int64))
    tile_o, _ = pixel_tiles(oc, kernel)
    tiles = -(-oc // tile_o)
    group = kernel.group
    return tiles * tile_o * group * -(-ic // group) * taps * (out_w + 2 * pad_w) / out_w


def narrow_pixels(choice: KernelChoice, facts: LayerFacts, stride: tuple[int, int],
                  padding: tuple[int, int], out_w: int, direct: bool = False) -> KernelChoice:
    """``choice`` replaced by a pixels-in-lanes kernel (``conv2d_narrow.py``) where that is
    exact and pays: a dense conv (``groups == 1``, spatial or 1x1, at most
    :data:`NARROW_MAX_OUT` output channels) at stride 1 whose padded work in channel lanes
    (:func:`_lane_work`) is at least :data:`NARROW_MIN_GAIN` times the pixel kernel's
    (:func:`_narrow_work`):

    * ``avx2_px16`` for an ``avx2_u8s8_p*`` layer (AVX2 without VNNI), where every int16
      partial sum is bounded: ``span * max_o sum|w_o| <= 32767`` (the pair sums of
      ``vpmaddubsw`` and the wrapping ``vpaddw`` sums are then exact). Stems (at most 4 input
      channels, spatial kernel) take it whenever it is exact: their channel-lane kernel's
      im2col pack dominates its time, which the work ratio does not count (measured 1.5-1.65x
      on 1 -> 13 and 1 -> 16 3x3 at work ratio 0.77-0.8, 2.4x on 1 -> 3 5x5).
    * ``avx512_px16`` for an ``avx512_vnni`` layer: ``vpdpbusd`` sums four u8 x s8 products
      into int32 exactly, so the bounds of ``avx512_vnni`` itself (``span <= 255``, ``max|w| <=
      127``, the accumulator) are all it needs; no stem exception (a 1-channel tap pads to 4
      operands here, 12 per 3x3 output jointly in the channel-lane im2col kernel).

    Other choices are returned unchanged (one bit past the int16 bound keeps the channel-lane
    variant, exact at its own bound). ``direct``: a 1x1 conv whose channel-lane kernel may
    read its packed input without a pack stage (``conv2d.reads_directly``); it keeps that
    kernel (the narrow kernel was measured against channel-lane kernels with a pack only)."""
    vnni = choice.variant == "avx512_vnni"
    if (direct or not (vnni or choice.kind == "ubsw") or facts.op != "conv2d"
            or facts.groups != 1 or facts.weight.shape[0] > NARROW_MAX_OUT
            or tuple(stride) != (1, 1) or facts.features is None
            or (not vnni and "avx512vnni" in facts.features)):
        return choice
    kernel = PX16_VNNI if vnni else PX16_AVX2
    shape = facts.weight.shape
    old = _lane_work(shape, 1 if vnni else choice.groups, kernel.channel_lanes)
    new = _narrow_work(shape, out_w, padding[1], kernel)
    stem = not vnni and reduce_width(shape) != int(shape[1])  # AVX2's im2col kernel
    if old < NARROW_MIN_GAIN * new and not stem:
        return choice
    span = facts.span
    sums = np.abs(facts.weight.reshape(shape[0], -1)).astype(np.int64).sum(1)
    bound = span * int(sums.max(initial=0))
    if span > 255 or facts.w_max > 127 or (not vnni and bound > INT16_MAX):
        return choice
    acc_text = choice.bound.split("; ", 1)[1] if "; " in choice.bound else ""
    why = (f"a stem: the channel-lane kernel's im2col pack dominates ({old} products per pixel "
           f"vs {new:.0f})" if stem else
           f"{old} products per pixel in channel lanes vs {new:.0f}")
    if vnni:
        text = (f"span {span} <= 255, max|w| {facts.w_max} <= 127 (vpdpbusd sums exactly in "
                f"int32); {acc_text}")
        note = f"{facts.target}: pixels in 16 lanes, u8 x s8 vpdpbusd on channel quads ({why})"
    else:
        text = (f"span {span} * max sum|w| {int(sums.max(initial=0))} = {bound} <= 32767 (int16 "
                f"pair and partial sums); {acc_text}")
        note = f"{facts.target}: pixels in 16 lanes, u8 x s8 vpmaddubsw on channel pairs ({why})"
    return dataclasses.replace(choice, variant=kernel.variant, bound=text, note=note,
                               preferred=why)


#: ``avx2_wino_s16`` needs an output of at least this many rows and columns: its 2x2 tiles
#: compute up to one padded row and column (a 3x3 output computes 4x4, 1.8x its outputs). The
#: smallest output measured is 7x7 (1.45-1.60x ``avx2_s16``, ``KERNELS_avx2_winograd*.md``);
#: 4x4 to 6x6 are not measured.
WINOGRAD_MIN_OUT = 4
#: ... and at least this many input channels: its GEMMs reduce over the channels padded to 8
#: (``avx2_s16`` pads to pairs), and with a short reduction its transforms weigh more. Measured
#: (``KERNELS_avx2_winograd*.md``, packed / NCHW): 16 channels 1.31x / 0.89x ``avx2_s16`` and
#: 0.89x / 0.63x ``avx2_u8s8_p1``; 32 channels 1.08-1.85x (median ~1.4x). A pruned 28-31
#: channels pads to 32: by that padding the median gain becomes ~1.3x, the smallest ~0.95x.
WINOGRAD_MIN_IN = 28


@dataclass(frozen=True)
class WinogradScheme:
    """One Winograd algorithm F(m x m, 3x3) in integers: ``Y = A^T [(G g G^T) . (B^T d B)] A``
    computes an ``m x m`` output block from an ``alpha x alpha`` input block (``alpha = m + 2``)
    with ``alpha^2`` products per channel pair instead of ``9 m^2``.

    ``g`` is ``G`` with every row scaled to integers (row ``i`` by ``s_i``) and ``a_t`` is
    ``A^T`` with column ``i`` scaled by ``L / s_i`` (``L`` a common multiple of the ``s_i``), so
    ``a_t [(g w g^T) . (b_t d b_t^T)] a_t^T = divisor * Y`` with ``divisor = L^2``: every
    matrix an integer one, the result exact. Checked on construction on random integers."""

    name: str
    b_t: tuple[tuple[int, ...], ...]
    g: tuple[tuple[int, ...], ...]
    a_t: tuple[tuple[int, ...], ...]
    divisor: int

    def __post_init__(self) -> None:
        alpha, m = len(self.b_t), len(self.a_t)
        shapes = (np.shape(self.b_t), np.shape(self.g), np.shape(self.a_t))
        if alpha != m + 2 or shapes != ((alpha, alpha), (alpha, 3), (m, alpha)):
            raise ValueError(f"{self.name}: B^T, G, A^T shapes {shapes} are not F({m}, 3)'s")
        gen = np.random.default_rng(0)
        w = gen.integers(-128, 128, (3, 3))
        d = gen.integers(0, 256, (alpha, alpha))
        b_t, g, a_t = (np.array(t, np.int64) for t in (self.b_t, self.g, self.a_t))
        y = a_t @ ((g @ w @ g.T) * (b_t @ d @ b_t.T)) @ a_t.T
        direct = np.array([[(d[i:i + 3, j:j + 3] * w).sum() for j in range(m)]
                           for i in range(m)])
        if not np.array_equal(y, self.divisor * direct):
            raise ValueError(f"{self.name}: the transforms do not give {self.divisor} x the "
                             "direct convolution")

    @property
    def m(self) -> int:
        """Output rows and columns per tile."""
        return len(self.a_t)

    @property
    def alpha(self) -> int:
        """Input rows and columns per tile (``m + 2``): ``alpha^2`` products per channel pair."""
        return len(self.b_t)

    @property
    def v_gain(self) -> int:
        """``|B^T d B| <= v_gain * span`` for operands in ``[0, span]``, every partial sum of
        the two passes included: the square of ``B^T``'s largest row sum of ``|b|``."""
        return int(np.abs(np.array(self.b_t)).sum(1).max()) ** 2

    @property
    def divisor_shift(self) -> int:
        """``s`` of ``divisor = 2^s * odd``."""
        return (self.divisor & -self.divisor).bit_length() - 1

    def weight_transform(self, weight: np.ndarray) -> np.ndarray:
        """``U = g w g^T`` of OIHW 3x3 integer weights: ``[alpha, alpha, O, C]`` int64."""
        g = np.array(self.g, np.int64)
        return np.einsum("ai,ocij,bj->aboc", g, np.asarray(weight, np.int64), g)


#: F(2, 3): ``G``'s halves scaled by 2 (``2G``), ``A^T`` unchanged: the result is ``4 Y``.
WINOGRAD_F2 = WinogradScheme(
    "F(2x2,3x3)", ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    ((2, 0, 0), (1, 1, 1), (1, -1, 1), (0, 0, 2)), ((1, 1, 1, 0), (0, 1, -1, -1)), 4)
#: F(4, 3) on the points 0, +-1, +-2 and infinity: ``G``'s rows scaled by 4, 6, 6, 24, 24, 1,
#: ``A^T``'s columns by 6, 4, 4, 1, 1, 24: the result is ``576 Y``. ``|V| <= 100 span``,
#: ``|U| <= 49 max|w|``.
WINOGRAD_F4 = WinogradScheme(
    "F(4x4,3x3)",
    ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
     (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
    ((1, 0, 0), (-1, -1, -1), (-1, 1, -1), (1, 2, 4), (1, -2, 4), (0, 0, 1)),
    ((6, 4, 4, 1, 1, 0), (0, 4, -4, 2, -2, 0), (0, 4, 4, 4, 4, 0), (0, 4, -4, 8, -8, 24)), 576)


def winograd_bounds(facts: LayerFacts,
                    scheme: WinogradScheme = WINOGRAD_F2) -> tuple[bool, str]:
    """Whether Winograd ``scheme`` in int16 operands (``winograd.py``) is exact for ``facts``'
    3x3 weights and activation span, and the bound with this layer's numbers.

    ``V = B^T d B`` of operands in ``[0, span]``: ``|V| <= v_gain * span`` (F(2, 3): 4, F(4,
    3): 100, every partial sum of the transform included) must fit int16, and so must ``U``,
    from the weights themselves. Each ``vpmaddwd`` pair sum of two int16 products is exact in
    int32; everything after it (the sums over the input channels, the output transform) is
    linear with integer coefficients and runs modulo 2^32, giving ``divisor * Y`` modulo 2^32
    for the conv sum ``Y``. With ``divisor = 2^s * odd``, that determines ``Y`` modulo
    ``2^(32 - s)`` (the odd part is invertible), hence ``Y`` itself when
    ``|Y| <= max sum|w| * span <= 2^(31 - s) - 1``: F(2, 3) ``2^29 - 1``, F(4, 3) ``2^25 - 1``."""
    span = facts.span
    w = np.asarray(facts.weight, np.int64)
    u = scheme.weight_transform(w)
    u_max = int(np.abs(u).max(initial=0))
    v_max = scheme.v_gain * span
    y_max = int(np.abs(w.reshape(w.shape[0], -1)).sum(1).max(initial=0)) * span
    y_bits = 31 - scheme.divisor_shift
    ok = v_max <= INT16_MAX and u_max <= INT16_MAX and y_max <= 2**y_bits - 1
    text = (f"Winograd {scheme.name}: |V| <= {scheme.v_gain}*{span} = {v_max} <= 32767, "
            f"max|U| {u_max} <= 32767, max sum|w|*span {y_max} <= 2^{y_bits}-1 "
            f"({scheme.divisor}*Y formed modulo 2^32)")
    return ok, text


def _winograd_replaces(choice: KernelChoice, facts: LayerFacts) -> bool:
    """Whether :func:`winograd` may replace ``choice`` (the speed rule, not the exactness one):
    ``avx2_s16``, or ``avx2_u8s8_p1`` where P = 2's bound fails. (The fuzzer's
    ``x86-avx2-winograd`` build widens it to every AVX2 dense variant to exercise the kernel on
    small random graphs: ``testing.properties.winograd_everywhere``.)"""
    p2_fails = 2 * 2 * facts.span * facts.w_max > INT16_MAX
    return choice.variant == "avx2_s16" or (choice.variant == "avx2_u8s8_p1" and p2_fails)


#: ``avx2_wino4_s16`` (F(4x4, 3x3)) needs an output of at least this many rows and columns:
#: at 7x7 its 4x4 tiles compute 8x8 and a row holds two tiles, so each transformed weight
#: (36 int16 per nine int8 weights: 8x their bytes) is read for two tiles only: resnet18/2's
#: 7x7 layer4 (256 channels) measured 0.63x ``avx2_u8s8_p4``, vgg7's 7x7 conv6 (64) 1.10x.
WINOGRAD4_MIN_OUT = 8
#: ... and at least this many input channels, unless the output has
#: :data:`WINOGRAD4_FULL_OUT` rows and columns (its tiles then pad little and a row holds seven
#: or more). Measured against ``avx2_u8s8_p4``, 32 channels: 14x14 0.92x packed and 0.78x NCHW,
#: 56x56 1.51x packed and 1.18x NCHW; 64-128 channels 1.13-1.37x NCHW.
WINOGRAD4_MIN_IN = 64
WINOGRAD4_FULL_OUT = 28


def _winograd4_replaces(choice: KernelChoice, facts: LayerFacts,
                        out_size: tuple[int, int]) -> bool:
    """Whether :func:`winograd` may replace ``choice`` by F(4x4, 3x3) (the speed rule, not the
    exactness one): any AVX2 channel-lane dense kernel (``avx2_u8s8_p4``/``p2``/``p1``,
    ``avx2_s16``) on an output of at least :data:`WINOGRAD4_MIN_OUT` rows and columns, with
    :data:`WINOGRAD4_MIN_IN` input channels or :data:`WINOGRAD4_FULL_OUT` output rows and
    columns. (The fuzzer's ``x86-avx2-winograd4`` build lifts the rule:
    ``testing.properties.winograd_everywhere``.)"""
    lanes = choice.variant == "avx2_s16" or choice.variant.startswith("avx2_u8s8")
    wide = facts.weight.shape[1] >= WINOGRAD4_MIN_IN
    return (lanes and min(out_size) >= WINOGRAD4_MIN_OUT
            and (wide or min(out_size) >= WINOGRAD4_FULL_OUT))


def winograd(choice: KernelChoice, facts: LayerFacts, stride: tuple[int, int],
             dilation: tuple[int, int], out_size: tuple[int, int]) -> KernelChoice:
    """``choice`` replaced by a Winograd kernel (``winograd.py``) where that is exact and
    measured faster, for a dense conv (``groups == 1``, x86) with a 3x3 kernel, stride 1,
    dilation 1, an output of at least :data:`WINOGRAD_MIN_OUT` rows and columns and at least
    :data:`WINOGRAD_MIN_IN` input channels:

    * ``avx2_wino4_s16``, F(4x4, 3x3) (36 products per 16 outputs instead of 144), where
      :func:`_winograd4_replaces` and ``winograd_bounds(facts, WINOGRAD_F4)`` hold (8-bit
      activations; W8A8 where ``max sum|w| * span <= 2^25 - 1``, e.g. up to ~128 channels of
      weights spread over the 8-bit range). Measured on resnet18's 3x3 shapes of 14x14-56x56
      outputs (``KERNELS_avx2_wino4_all{_packed,}.md``): W4A8 1.35-1.70x ``avx2_u8s8_p4``
      packed in and out, 1.18-1.52x at a graph edge; W6A8 1.55-1.73x ``avx2_u8s8_p2``; W7A8
      and W8A8 1.8-3.1x the channel-lane kernels, 1.3-1.9x F(2x2, 3x3).
    * else ``avx2_wino_s16``, F(2x2, 3x3), for a layer that got ``avx2_s16`` (no ``vpmaddubsw``
      bound holds: W8A8 and wider) or ``avx2_u8s8_p1`` because P = 2's bound fails (W7A8), where
      :func:`winograd_bounds` holds. Measured against them on the same shapes with >= 32
      channels (``KERNELS_avx2_winograd*.md``): 1.2-2.1x ``avx2_s16``, 1.1-2.1x
      ``avx2_u8s8_p1``; not taken for P = 2 and 4 (scratch runs: 0.80-1.39x P = 2, median
      ~1.1x inside a network; 0.75-1.2x P = 4).

    Other choices are returned unchanged; one bit past a Winograd bound keeps the next kernel
    in that order (exact under its own), the failed bound written in the note."""
    if (facts.op != "conv2d" or facts.groups != 1
            or tuple(facts.weight.shape[2:]) != (3, 3) or tuple(stride) != (1, 1)
            or tuple(dilation) != (1, 1) or min(out_size) < WINOGRAD_MIN_OUT
            or facts.weight.shape[1] < WINOGRAD_MIN_IN):
        return choice
    acc_text = choice.bound.split("; ", 1)[1] if "; " in choice.bound else ""
    refused = ""
    if _winograd4_replaces(choice, facts, out_size):
        ok, text = winograd_bounds(facts, WINOGRAD_F4)
        if ok:
            note = (f"{facts.target}: Winograd F(4x4, 3x3), int16 x int16 vpmaddwd on "
                    f"transformed operands (36 products per 4x4 outputs instead of 144; "
                    f"{choice.variant} before)")
            return dataclasses.replace(choice, variant="avx2_wino4_s16",
                                       bound=f"{text}; {acc_text}", note=note, preferred="")
        refused = f"; Winograd F(4x4, 3x3) not exact: {text}"
    if not _winograd_replaces(choice, facts):
        return dataclasses.replace(choice, note=choice.note + refused) if refused else choice
    ok, text = winograd_bounds(facts)
    if not ok:
        return dataclasses.replace(choice, note=f"{choice.note}{refused}; Winograd not exact: "
                                                f"{text}")
    note = (f"{facts.target}: Winograd F(2x2, 3x3), int16 x int16 vpmaddwd on transformed "
            f"operands (16 products per 2x2 outputs instead of 36; {choice.variant} before)"
            f"{refused}")
    return dataclasses.replace(choice, variant="avx2_wino_s16", bound=f"{text}; {acc_text}",
                               note=note, preferred="")
