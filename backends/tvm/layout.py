"""Layout planning: which integer values stay in the packed channel layout ``NCHW{L}c``.

A written conv kernel (``backends/tvm/kernels``) packs its input into channel blocks and computes
on blocks of ``L`` output channels. Between two such kernels, going back to NCHW and packing again
is pure data movement (in mobilenetv2 at batch 32 it was most of the time, PROFILE.md). So a
value may live in the packed layout ``[N, ceil(C/L), H, W, L]``: channel ``c`` at block ``c // L``,
lane ``c % L``; the lanes ``c >= C`` of the last block are **padding**.

The layout of every emitted integer value is a typed fact, :class:`Layout`, carried on the value
(``emit.IntValue.layout``). Two pure steps decide it:

* :func:`plan_layouts` (before emission, over the fx graph only): which conv layers write packed
  output. A node is a *packed candidate* if its op is in :data:`PACKED_OPS` (a conv that may get
  a written kernel, or a lane-wise integer op whose tensor inputs are all candidates); a candidate
  stays packed only if some user consumes packed values (backwards, users first).
* At emission each converter states its value's layout; a plan that emission cannot honour (the
  conv fell back to TVM's default lowering, operands of different layouts) costs a conversion,
  never a wrong value: every converter that does not know packed layouts reads its inputs through
  ``Lowering.value`` / ``int_arg``, which unpack to NCHW (once per value).

Ops and their packed form (the record asked for by issue 15, item 3):

=====================================  ===================================================
op                                      packed form
=====================================  ===================================================
``IntConv2d`` dense / depthwise         reads any layout, writes ``NCHW{L}c`` if planned
``IntConv2d`` grouped                   like dense where each group (merged groups,
                                        ``select.merge_factor``) holds whole lane blocks on
                                        both sides (images x groups as the kernel's batch);
                                        else NCHW in and out
``IntConv2d``, float output             NCHW in and out
``IntAdd`` (equal shapes), ``IntClip``,  lane-wise on packed values when every operand has
``Requantize``                          the same :class:`Layout`; else NCHW. A chain of them
                                        is one written kernel (``kernels/eltwise.py``)
``IntMaxPool2d``                        lane-wise on packed values (Relax's pool layout)
``IntMul``                              lane-wise when both operands share a layout, or when
                                        one is packed and the other broadcasts over ``H, W``
                                        (a per-channel ``[N|1, C, 1, 1]`` gate, squeeze-
                                        excite; it is packed, padding lanes 0) or is one
                                        value; else NCHW
``IntConcat``                           on the channel blocks when every input shares the
                                        lanes and all but the last have ``C % L == 0``
                                        (block-aligned offsets); along ``N``/``H``/``W``
                                        when every input has one :class:`Layout`; else NCHW
``IntAvgPool2d``, ``IntPoolRequantize``  lane-wise window sums (``pools.py``), and read
(avg), ``IntAdaptiveAvgPool2d`` and     packed even when their users unpack ("reducing": the
``IntPoolRequantize`` to ``1x1``        pooled value is the smaller one to unpack)
other adaptive pools                    unpack
``IntLinear``, flatten, reshape, ...    unpack (they index channels)
``IntLUT``                              lane-wise (``take`` on any shape; the converter in
                                        ``float_ops.py`` keeps the layout; the index is
                                        clipped to the table, so padding lanes read table
                                        entries: codes in the output range)
float islands, graph outputs            unpack
=====================================  ===================================================

**Why padding lanes never change a real output** (tested in ``tests/test_tvm_layout.py``):

1. Every producer of a packed value writes *defined* codes into the padding lanes: the conv
   kernels (the only producers from unpacked values) compute them with zero weights, zero bias
   and a zero multiplier (``clip(0)``). Lane-wise ops map padding lanes only to padding lanes,
   and every one of them ends in a clip to its range, so the codes stay in range: a fused chain
   (``kernels/eltwise.py``; its int32 bounds assume in-range codes, and only padding lanes could
   break that, which the clip then confines to themselves); ``IntMul`` by a packed gate, whose
   padding lanes are 0 (:func:`to_packed`): ``requantize(x * 0)`` is ``clip(0)``; a channel
   concat, whose inputs before the last have no padding lanes (block-aligned), so the only
   padding lanes are the last input's, rescaled and clipped like its real lanes.
2. No padding lane reaches a real channel: the pack stage of every written conv kernel masks
   channels ``c >= C`` to the zero code (``conv2d._packed_value``), exactly as it pads an NCHW
   input, and the packed weights of those channels are zero as well (``conv2d.pack_weight``).
   Kernels that take whole lane blocks -- a 1x1 kernel reading packed ``uint8`` codes without
   a pack stage (``conv2d.reads_directly``), a dense kernel packing whole blocks
   (``conv2d.packs_blocks``), a depthwise kernel of the input's lane count
   (``conv2d.lanes_aligned``) -- multiply the padding lanes (codes in the value's range, plus
   the kernel's offset) by those zero weights: ``a * 0`` adds exactly 0 (no saturation:
   ``vpmaddubsw``'s bound counts real products only). Pools and the other lane-wise ops never
   mix lanes.
3. :func:`to_nchw` slices channels ``[0, C)`` away from the padding before any op that mixes
   channels (linear, concat, flatten, reductions) or leaves the integer graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import fx

from djpq_compiler.ir import modules as im
from djpq_compiler.ir.lookup import IntLUT

__all__ = ["NCHW", "PACKED_OPS", "Layout", "LayoutPlan", "layout_lanes", "packed_channel_const",
           "lanewise_rule", "plan_layouts", "to_nchw", "to_packed"]


@dataclass(frozen=True)
class Layout:
    """The memory layout of an integer tensor value.

    Attributes:
        lanes: ``0`` for the plain layout every converter reads (NCHW for 4-D values), or ``L``
            for ``NCHW{L}c``: shape ``[N, ceil(C/L), H, W, L]``.
        channels: The real channel count ``C`` of a packed value (``0`` for plain layouts).
    """

    lanes: int = 0
    channels: int = 0

    @property
    def packed(self) -> bool:
        return self.lanes > 0

    @property
    def blocks(self) -> int:
        """``ceil(C / L)`` channel blocks (0 for plain layouts)."""
        return -(-self.channels // self.lanes) if self.packed else 0

    def __str__(self) -> str:
        return f"NCHW{self.lanes}c" if self.packed else "NCHW"


NCHW = Layout()


def layout_lanes(features: frozenset[str] | None) -> int:
    """Lanes of the packed layout for a target with CPU ``features`` (the written kernels' output
    vector: 16 int32 with AVX-512, 8 with AVX2); ``0`` (no packing) elsewhere (aarch64, CUDA, no
    target): those targets keep NCHW between layers."""
    if not features:
        return 0
    if "avx512bw" in features or "avx512vnni" in features:
        return 16
    return 8 if "avx2" in features else 0


# ------------------------------------------------------------------------------ the plan

#: How an op relates to the packed layout: ``"kernel"`` (reads any layout, may write packed:
#: the written conv kernels), ``"lanewise"`` (packed output iff all its tensor inputs are),
#: ``"broadcast"`` (lane-wise, packed output iff some input is: the others are small operands
#: broadcast over ``H, W`` and packed at emission, e.g. a squeeze-excite gate) or
#: ``"reducing"`` (lane-wise, and worth reading packed values even when its own users unpack:
#: its output is smaller than its input, e.g. the global average pool before a classifier).
PackedRule = Callable[[Any], str | None]


def _conv_rule(module: Any) -> str | None:
    depthwise = module.groups == module.weight.shape[0] and module.weight.shape[1] == 1
    if module.out_scale is None:
        return None  # float output: NCHW
    return "grouped" if module.groups != 1 and not depthwise else "kernel"


def grouped_in_blocks(module: Any, lanes: int) -> bool:
    """Whether a grouped (not depthwise) integer conv's groups, as its kernel runs them
    (``select.merge_factor``), hold whole blocks of ``lanes`` channels on both sides: its
    kernel then reads and writes ``NCHW{L}c`` as the images x groups batch (the same memory);
    otherwise it runs on NCHW."""
    from .kernels.select import merge_factor

    groups = int(module.groups)
    oc, in_g = (int(d) for d in module.weight.shape[:2])
    k = merge_factor(groups, in_g, oc // groups, lanes=lanes)
    return (k * in_g) % lanes == 0 and (k * oc // groups) % lanes == 0


def lanewise_rule(module: Any) -> str | None:
    """The :data:`PACKED_OPS` rule of an op that maps each lane to the same lane (and ends
    in codes of its range): a converter module whose converter reads packed values registers
    its op with it (``PACKED_OPS[op] = lanewise_rule``)."""
    return "lanewise"


_lanewise = lanewise_rule


def _reducing(module: Any) -> str | None:
    return "reducing"


def _broadcast(module: Any) -> str | None:
    return "broadcast"


def _adaptive_rule(module: Any) -> str | None:
    """Adaptive pools have a packed form for a ``1x1`` output only (a sum over ``H, W``)."""
    size = module.output_size
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    return "reducing" if sizes == (1, 1) else None


def _pool_requantize_rule(module: Any) -> str | None:
    pool = module.pool
    return _adaptive_rule(pool) if isinstance(pool, im.IntAdaptiveAvgPool2d) else "reducing"


#: Ops with a packed form, keyed by the integer module class (the house registry style).
PACKED_OPS: dict[type, PackedRule] = {
    im.IntConv2d: _conv_rule,
    im.IntAdd: _lanewise,
    im.IntClip: _lanewise,
    im.Requantize: _lanewise,
    im.IntMaxPool2d: _lanewise,  # per channel over H, W: lane-wise on the blocks
    im.IntMul: _broadcast,  # x * gate: the gate broadcasts over H, W (packed at emission)
    im.IntConcat: _lanewise,  # on channel blocks when block-aligned (checked at emission)
    IntLUT: _lanewise,  # a table lookup per lane (float_ops.convert_lut)
    im.IntAvgPool2d: _reducing,  # window sums lane by lane (pools.py)
    im.IntAdaptiveAvgPool2d: _adaptive_rule,
    im.IntPoolRequantize: _pool_requantize_rule,
}


@dataclass(frozen=True)
class LayoutPlan:
    """Which nodes are planned to yield packed values, with the lane count."""

    lanes: int
    packed: frozenset[str]

    def wants_packed(self, node: fx.Node) -> bool:
        return self.lanes > 0 and node.name in self.packed


def _rule(gm: fx.GraphModule, node: fx.Node, lanes: int) -> str | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    rule = PACKED_OPS.get(type(module))
    found = None if rule is None else rule(module)
    if found == "grouped":  # a kernel where its groups fill whole lane blocks, else NCHW
        return "kernel" if grouped_in_blocks(module, lanes) else None
    return found


def _channels(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """Channels of ``node``'s value where the graph says so: a conv's output channels, through
    lane-wise and pooling ops (their first input's), a concat's sum; ``None`` if unknown."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    if isinstance(module, im.IntConv2d):
        return int(module.weight.shape[0])
    inputs = node.all_input_nodes
    if isinstance(module, im.IntConcat) and module.dim % 4 == 1:
        counts = [_channels(gm, a) for a in inputs]
        return None if None in counts else sum(c for c in counts if c is not None)
    if type(module) in PACKED_OPS and inputs:
        return _channels(gm, inputs[0])
    return None


def _block_aligned(gm: fx.GraphModule, node: fx.Node, lanes: int) -> bool:
    """Whether a concat can run on channel blocks: along ``N``/``H``/``W``, or along the channels
    with every input but the last a whole number of blocks (:func:`_channels`)."""
    module = gm.get_submodule(str(node.target))
    if not isinstance(module, im.IntConcat) or module.dim % 4 != 1:
        return True
    counts = [_channels(gm, a) for a in node.all_input_nodes[:-1]]
    return all(c is not None and c % lanes == 0 for c in counts)


def _consumes_packed(gm: fx.GraphModule, user: fx.Node, packed: set[fx.Node],
                     lanes: int) -> bool:
    rule = _rule(gm, user, lanes)
    return rule in ("kernel", "reducing") or (rule in ("lanewise", "broadcast")
                                              and user in packed)


def plan_layouts(gm: fx.GraphModule, lanes: int) -> LayoutPlan:
    """Plan the packed values of a converted graph (pure; reads only ops and the graph).

    Forward: conv candidates (:data:`PACKED_OPS`), lane-wise (or reducing) ops whose tensor
    inputs are all candidates (a channel concat only with block-aligned offsets, as far as the
    graph tells the channel counts) and broadcasting ones with at least one candidate input.
    Backward: a candidate stays packed only if a user consumes packed values (a conv, a reducing
    op, or a lane-wise op that stays packed), so no value is packed just to be unpacked at its
    full size.

    Args:
        gm: The converted model.
        lanes: :func:`layout_lanes` of the target; ``0`` plans everything NCHW.
    """
    if lanes <= 0:
        return LayoutPlan(0, frozenset())
    candidates: set[fx.Node] = set()
    for node in gm.graph.nodes:
        rule = _rule(gm, node, lanes)
        inputs = node.all_input_nodes
        if rule == "kernel" or (rule in ("lanewise", "reducing") and inputs
                                and all(a in candidates for a in inputs)
                                and _block_aligned(gm, node, lanes)):
            candidates.add(node)
        elif rule == "broadcast" and any(a in candidates for a in inputs):
            candidates.add(node)
    packed: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        if node in candidates and any(_consumes_packed(gm, u, packed, lanes)
                                      for u in node.users):
            packed.add(node)
    return LayoutPlan(lanes, frozenset(n.name for n in packed))


# --------------------------------------------------------------- conversions (Relax, via bb)


def to_nchw(bb: Any, expr: Any, layout: Layout) -> Any:
    """``[N, CB, H, W, L]`` -> ``[N, C, H, W]``: blocks and lanes back to channels, padding
    lanes sliced away."""
    if not layout.packed:
        return expr
    n, cb, h, w, lanes = bb.shape(expr)
    flat = bb.reshape(bb.permute(expr, (0, 1, 4, 2, 3)), (n, cb * lanes, h, w))
    if cb * lanes == layout.channels:
        return flat
    return bb.strided_slice(flat, [1], [0], [layout.channels], [1])


def to_packed(bb: Any, expr: Any, layout: Layout) -> Any:
    """``[N, C, H, W]`` -> ``[N, CB, H, W, L]`` of ``layout`` (``C == layout.channels``), the
    padding lanes 0: for small operands broadcast against a packed value (a per-channel gate)."""
    n, c, h, w = bb.shape(expr)
    full = layout.blocks * layout.lanes
    if full != c:
        expr = bb.call("nn.pad", expr, [0, 0, 0, full - c, 0, 0, 0, 0])
    blocks = bb.reshape(expr, (n, layout.blocks, layout.lanes, h, w))
    return bb.permute(blocks, (0, 1, 3, 4, 2))


def packed_channel_const(values: Any, layout: Layout) -> np.ndarray:
    """A per-channel vector ``(C,)`` as a ``(1, CB, 1, 1, L)`` numpy array broadcasting over a
    packed value; padding lanes get 0."""
    flat = np.asarray(values).reshape(-1)
    full = np.zeros(layout.blocks * layout.lanes, dtype=flat.dtype)
    full[: flat.size] = flat
    return full.reshape(1, layout.blocks, 1, 1, layout.lanes)
