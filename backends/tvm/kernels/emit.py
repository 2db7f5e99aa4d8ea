"""TVM-facing: put a selected written kernel into the Relax module being built.

:func:`emit_conv` builds the layer's scheduled PrimFunc (:mod:`.conv2d`), adds it to the module
and calls it with ``call_tir`` on NCHW or packed ``NCHW{L}c`` tensors (``backends/tvm/layout.py``
decides which; the pack/unpack stages live inside the kernel).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from ..adapter import Builder, load_tvm
from ..layout import NCHW, Layout
from .conv2d import (
    ConvKernelSpec,
    build_conv_kernel,
    direct_input_shape,
    im2col_pays,
    pack_weight,
    reads_directly,
    split_shift_ok,
)
from .select import GROUPED_KINDS, PIXEL_KERNELS, KernelChoice, LayerFacts

__all__ = ["KNOWN_FEATURES", "ConvGeometry", "emit_conv", "target_features", "target_text"]

#: CPU features the written kernels use (LLVM names).
KNOWN_FEATURES = ("avx2", "avx512bw", "avx512vnni", "amx-int8")
#: aarch64 features the written kernels use (LLVM names).
KNOWN_ARM_FEATURES = ("dotprod",)

#: Kernel kinds whose int64 requantization uses the split shift (``conv2d._requantize``) when
#: every shift allows it: the x86 ones, where it was measured (CUDA and aarch64 ``sdot`` keep the
#: int64 shift; the depthwise kind ``dw8`` is shared by AVX2 and NEON).
SPLIT_SHIFT_KINDS = frozenset({"ubsw", "wd", "vnni", "dw8", "dw16", "amx", "px16", "px16v", "wino",
                               "wino4"})

#: Kernel kinds whose requantization runs in int32 where :func:`.requant32.plan_int32` finds a
#: plan for every channel (``ConvKernelSpec.int32_requant``): the same kinds (NEON depthwise
#: included: bit-exact under qemu, not timed on ARM hardware).
INT32_REQUANT_KINDS = SPLIT_SHIFT_KINDS

ConvGeometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # stride, pad, dilation


def epilogue_form(spec: ConvKernelSpec) -> str:
    """How a kernel of ``spec`` finishes its accumulators, for the kernel report."""
    if spec.out_dtype == "int32":
        return "int32 accumulator"
    return "int32 requantization" if spec.int32_requant else "int64 requantization"


def plan_epilogue(spec: ConvKernelSpec, kind: str, bias: np.ndarray, m_c: np.ndarray,
                  shift_c: np.ndarray) -> tuple[ConvKernelSpec, list[tuple[np.ndarray, str]]]:
    """The requantization form of a requantizing kernel and its parameters.

    Returns ``spec`` with ``int32_requant`` (a :func:`.requant32.plan_int32` plan for every
    channel), else ``split_shift`` / ``bias_in_round`` where they hold, and the per-channel
    parameter arrays after ``bias`` in ``conv2d.epilogue_params`` order with their dtypes (the
    caller pads them with zeros to its kernel's channel count: the padding channels' code is
    ``clip(0)`` in both forms). ``bias`` is the kernel's int32 bias (offset correction included),
    ``m_c``/``shift_c`` the per-channel multipliers and shifts."""
    from .requant32 import plan_int32

    rounding = np.where(shift_c > 0, np.left_shift(1, np.maximum(shift_c - 1, 0)), 0)
    if kind in INT32_REQUANT_KINDS:
        mult = [int(m) << spec.acc_shift for m in m_c]
        add = [int(b) * int(m) + int(r) for b, m, r in zip(bias.tolist(), m_c.tolist(),
                                                            rounding.tolist(), strict=True)]
        plan = plan_int32(np.array(mult, dtype=object), np.array(add, dtype=object), shift_c,
                          spec.qmin, spec.qmax)
        if plan is not None:
            spec = dataclasses.replace(spec, int32_requant=True)
            return spec, [(v, "int32") for v in (plan.m, plan.r, plan.s, plan.lo, plan.hi)]
    if kind in SPLIT_SHIFT_KINDS and split_shift_ok(shift_c):
        spec = dataclasses.replace(spec, split_shift=True)
    if kind in SPLIT_SHIFT_KINDS and spec.mult_dtype == "int32":
        spec = dataclasses.replace(spec, bias_in_round=True)
    rnd = rounding
    if spec.bias_in_round:  # conv2d: ConvKernelSpec.bias_in_round
        rnd = rnd + bias.astype(np.int64) * m_c
    shift = (shift_c - 32, "int32") if spec.split_shift else (shift_c, "int64")
    return spec, [(m_c, spec.mult_dtype), (rnd, "int64"), shift]


def target_features(spec: dict[str, Any] | None) -> frozenset[str] | None:
    """Which of :data:`KNOWN_FEATURES` the TVM target dict ``spec`` has (from its mcpu/mattr, as
    LLVM sees them); ``None`` if no spec."""
    if spec is None:
        return None
    if spec.get("kind") == "cuda":  # the written CUDA kernels: kernels/cuda.py
        from .cuda_select import dp4a_arch

        return frozenset({"dp4a"}) if dp4a_arch(str(spec.get("arch", ""))) else frozenset()
    if spec.get("kind") != "llvm":
        return frozenset()
    arm = "aarch64" in str(spec.get("mtriple", ""))
    tvm = load_tvm()
    target = tvm.target.Target(spec)
    return frozenset(f for f in (KNOWN_ARM_FEATURES if arm else KNOWN_FEATURES)
                     if tvm.target.codegen.target_has_features(f, target))


def target_text(spec: dict[str, Any] | None) -> str:
    """A short description of a target dict for the kernel records."""
    if spec is None:
        return "none"
    parts = [str(spec.get("kind"))] + [f"{k}={spec[k]}" for k in ("mcpu", "mtriple", "arch")
                                       if k in spec]
    if spec.get("mattr"):
        parts.append("mattr=" + ",".join(str(a) for a in spec["mattr"]))
    return " ".join(parts)


def _padded(values: np.ndarray, size: int, dtype: str) -> np.ndarray:
    out = np.zeros(size, dtype=dtype)
    out[: values.size] = values
    return out


def _padded_groups(values: np.ndarray, groups: int, size: int, dtype: str) -> np.ndarray:
    """Per-channel ``values`` of ``groups`` groups, each group's zero-padded to ``size``."""
    return np.concatenate([_padded(v, size, dtype) for v in np.asarray(values).reshape(groups, -1)])


def _per_channel(value: Any, channels: int) -> np.ndarray:
    flat = np.asarray(value, dtype=np.int64).reshape(-1)
    return np.broadcast_to(flat, (channels,)) if flat.size == 1 else flat


def _fits_int32(values: np.ndarray) -> bool:
    return bool(values.size == 0 or (values.min() >= -(2**31) and values.max() <= 2**31 - 1))


def requant_args(requant: tuple[Any, Any, int, int, str] | None, channels: int,
                 ) -> tuple[np.ndarray, np.ndarray, int, int, str, str]:
    """``requant`` = ``(m, shift, qmin, qmax, out_dtype)`` (``None``: an int32 output) as
    per-channel multipliers and shifts, ``qmin``, ``qmax``, the output dtype and the
    multipliers' dtype (``"int32"`` where they all fit)."""
    m, shift, qmin, qmax, out_dtype = requant if requant is not None else (0, 0, 0, 0, "int32")
    m_c = _per_channel(m, channels)
    return (m_c, _per_channel(shift, channels), int(qmin), int(qmax), out_dtype,
            "int32" if _fits_int32(m_c) else "int64")


def emit_conv(bb: Builder, x: Any, in_dtype: str, facts: LayerFacts, choice: KernelChoice,
              geometry: ConvGeometry, requant: tuple[Any, Any, int, int, str] | None,
              in_layout: Layout = NCHW, out_lanes: int = 0) -> tuple[Any, Layout, str]:
    """Emit the written kernel of ``choice`` for a conv; returns the result, its layout and how
    the kernel finished its accumulators (:func:`epilogue_form`).

    Args:
        bb: The builder.
        x: The integer activations (container ``in_dtype``) in ``in_layout``.
        in_dtype: Container dtype of ``x``.
        facts: The layer's selection facts (weights OIHW, bias, ``acc_shift``, offset).
        choice: A non-default :class:`KernelChoice`.
        geometry: ``(stride, padding, dilation)``.
        requant: ``(m, shift, qmin, qmax, out_dtype)`` to fuse the requantization, or ``None`` to
            return the int32 accumulator ``acc * 2^k + bias``.
        in_layout: The layout of ``x`` (NCHW or packed ``NCHW{L}c``, any ``L``).
        out_lanes: ``L`` to write the packed layout ``NCHW{L}c``; honoured only for a
            requantizing kernel whose output vector has ``L`` lanes, else the result is NCHW.
    """
    if choice.kind in PIXEL_KERNELS:  # pixels in lanes (narrow layers): conv2d_narrow.py
        from .conv2d_narrow import emit_narrow

        return emit_narrow(bb, x, in_dtype, facts, choice, geometry, requant, in_layout,
                           out_lanes)
    if choice.kind in ("wino", "wino4"):  # Winograd F(2x2 / 4x4, 3x3): kernels/winograd.py
        from .winograd import emit_winograd

        return emit_winograd(bb, x, in_dtype, facts, choice, geometry, requant, in_layout,
                             out_lanes)
    n, _, h, w = bb.shape(x)[:4]
    ic = in_layout.channels if in_layout.packed else bb.shape(x)[1]
    oc, in_g, kh, kw = facts.weight.shape
    # a grouped (not depthwise) conv: one kernel over the batch of images x groups
    cg = facts.groups if facts.groups > 1 and not facts.depthwise else 1
    if cg > 1:
        if choice.kind not in GROUPED_KINDS:
            raise ValueError(f"{facts.layer}: no grouped {choice.kind} kernel (kinds "
                             f"{GROUPED_KINDS})")
        if in_layout.packed and in_g % in_layout.lanes:
            raise ValueError(f"{facts.layer}: a grouped kernel reads packed input only when a "
                             f"group's {in_g} channels fill whole blocks of {in_layout.lanes}")
        blocks = (in_g // in_layout.lanes,) if in_layout.packed else (in_g,)
        x = bb.reshape(x, (n * cg,) + blocks + tuple(bb.shape(x)[2:]))
        ic = in_g
    oc_g = oc // cg
    stride, padding, dilation = geometry
    m_c, shift_c, qmin, qmax, out_dtype, m_dtype = requant_args(requant, oc)
    offset = facts.offset_for(choice.kind)
    spec = ConvKernelSpec(n * cg, ic, h, w, oc_g, (kh, kw), stride, padding, dilation,
                          str(choice.kind), choice.groups, in_dtype, offset,
                          facts.acc_shift, out_dtype, qmin, qmax, m_dtype,
                          in_layout.lanes, acc_dtype=choice.acc_dtype, conv_groups=cg)
    if (out_lanes and requant is not None and out_lanes == spec.oc_lanes
            and (cg == 1 or oc_g % out_lanes == 0)):
        spec = dataclasses.replace(spec, out_lanes=out_lanes)
    if im2col_pays(spec):
        spec = dataclasses.replace(spec, im2col=True)
    bias = facts.kernel_bias(offset)
    extra: list[tuple[np.ndarray, str]] = []
    if requant is not None:
        spec, extra = plan_epilogue(spec, spec.kind, bias, m_c, shift_c)
    func, (tile_w, tile_oc) = _kernel(spec)
    size = spec.out_blocks(tile_oc) * spec.oc_lanes
    if reads_directly(spec, tile_w):  # a free view of the packed input (no pack stage)
        x = bb.reshape(x, direct_input_shape(spec))
    w_dtype = "int16" if spec.kind == "wd" or spec.depthwise else "int8"
    if spec.kind == "amx":
        from .amx import pack_weight_amx as pack
    else:
        pack = pack_weight
    args = [x, bb.const(pack(facts.weight, spec, tile_oc), w_dtype),
            bb.const(_padded_groups(bias, cg, size, "int32"), "int32")]
    args += [bb.const(_padded_groups(values, cg, size, dtype), dtype) for values, dtype in extra]
    out_layout = Layout(spec.out_lanes, oc) if spec.out_lanes else NCHW
    if spec.out_lanes:
        out_shape: tuple[int, ...] = ((n * cg, -(-oc_g // spec.out_lanes)) + spec.out_size
                                      + (spec.out_lanes,))
    else:
        out_shape = (n * cg, oc_g) + spec.out_size
    # one PrimFunc per distinct spec in a module: same-shaped layers share it, named after the
    # first layer that used it (BlockBuilder deduplicates equal functions), so it is scheduled
    # and compiled by LLVM once
    named = bb.kernel_cache.get(spec)
    if named is None:
        name = f"djpq_{choice.variant}_{facts.layer}"
        # opaque (op_pattern 8 = kOpaque): Relax's FuseOps/FuseTIR must not merge the scheduled
        # kernel with neighbouring elementwise ops (they would discard its schedule);
        # "tirx.is_scheduled" tells dlight / meta_schedule passes to leave it alone
        named = (name, func.with_attr("global_symbol", name).with_attr("op_pattern", 8)
                 .with_attr("tirx.is_scheduled", True))
        bb.kernel_cache[spec] = named
    out = bb.call_tir(named[1], named[0], args, out_shape, out_dtype)
    if cg > 1:  # (N * G, C, ...) back to the layer's (N, G * C, ...): the same memory
        out = bb.reshape(out, (n, cg * out_shape[1]) + tuple(out_shape[2:]))
    return out, out_layout, epilogue_form(spec)


def emit_all_params_kernel(bb: Builder, x: Any, spec: ConvKernelSpec, facts: LayerFacts,
                           choice: KernelChoice, requant_c: tuple[np.ndarray, np.ndarray] | None,
                           size: int, weight: tuple[np.ndarray, str],
                           build: Callable[[ConvKernelSpec], Any]) -> tuple[Any, Layout, str]:
    """The call of a written kernel whose PrimFunc always takes ``x, w, bias, m, rnd, shift,
    lo, hi, out`` (the pixels-in-lanes and Winograd kernels): plans the epilogue of a
    requantizing ``spec`` (``requant_c`` = per-channel multipliers and shifts; ``None``: an
    int32 output, the unread parameters passed empty), pads the bias and parameters to
    ``size`` channels, builds the PrimFunc once per spec (``build``) and calls it. Returns the
    result, its layout (``spec.out_lanes``) and the epilogue form, as :func:`emit_conv`."""
    oc = spec.out_channels
    bias = facts.kernel_bias(spec.act_offset)
    if requant_c is not None:
        spec, extra = plan_epilogue(spec, spec.kind, bias, *requant_c)
    else:  # an int32 output reads none of them
        extra = [(np.zeros(0, np.int64), "int64")] * 3
    if not spec.int32_requant:  # lo, hi: read by the int32 form only
        extra += [(np.zeros(0, np.int32), "int32")] * 2
    args = [x, bb.const(*weight), bb.const(_padded(bias, size, "int32"), "int32")]
    args += [bb.const(_padded(values, size, dtype), dtype) for values, dtype in extra]
    lanes = spec.out_lanes
    out_layout = Layout(lanes, oc) if lanes else NCHW
    out_shape = ((spec.batch, out_layout.blocks) + spec.out_size + (lanes,) if lanes
                 else (spec.batch, oc) + spec.out_size)
    named = bb.kernel_cache.get(spec)
    if named is None:
        name = f"djpq_{choice.variant}_{facts.layer}"
        named = (name, build(spec).with_attr("global_symbol", name).with_attr("op_pattern", 8)
                 .with_attr("tirx.is_scheduled", True))
        bb.kernel_cache[spec] = named
    return (bb.call_tir(named[1], named[0], args, out_shape, spec.out_dtype), out_layout,
            epilogue_form(spec))


@functools.lru_cache(maxsize=512)
def _kernel(spec: ConvKernelSpec) -> tuple[Any, tuple[int, int]]:
    """:func:`build_conv_kernel`, memoized: scheduling is a pure function of the spec."""
    if spec.kind == "dp4a":  # CUDA
        from .cuda import build_dp4a_kernel

        return build_dp4a_kernel(spec)
    if spec.kind == "amx":  # x86 AMX-INT8 tiles
        from .amx import build_amx_kernel

        return build_amx_kernel(spec)
    return build_conv_kernel(spec)
