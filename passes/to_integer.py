"""To-integer pass: lower a folded, pruned prepared graph to integer modules.

Requires: a prepared graph after ``fold_gates``, ``strip_weight_quantizers`` (its record: the
weight grids), ``prune_graph`` and ``fold_scales(scale_layers=False)`` (its record: the layer
gate factors); eval mode.
Guarantees: a new ``GraphModule`` (its ``meta`` is empty: ``convert`` stores the record) whose
values are integer
codes wherever the prepared model had an activation quantizer, computed by the modules of
``djpq_compiler/ir/modules.py``: conv/linear + BN + gate + ReLU/ReLU6 + quantizer chains become
one ``IntConv2d``/``IntLinear`` (weight codes of the learned grid, BN and gate factors folded into
per-channel dyadic multipliers, ReLU as the clip range); residual adds and concats of quantized
operands become ``IntAdd``/``IntConcat``; a product of two quantized tensors read by a quantizer
(the squeeze-excite ``x * gate``) an ``IntMul``; pooling, ReLU and shape ops run on codes; an
elementwise unary function (``UNARY_OPS`` of ``djpq_compiler/ir/lookup.py``: sigmoid, hardswish,
SiLU, GELU, ...) of <= 8-bit codes read by a quantizer becomes an exact ``IntLUT`` table (listed in
:attr:`IntegerLowering.lut_ops`). Everything else runs in float between a ``Dequantize`` and the
next ``Quantize`` and is listed in :attr:`IntegerLowering.float_ops`. Conversion never changes
what a node computes beyond the ≤ 1 LSB of integer rounding (DESIGN invariant 4). Where the
accumulator step ``s_x * s_w`` is coarser than the output step, the integer bias gets extra
fractional bits (``acc_shift``) to keep that bound; only if int32 cannot hold them is the larger
bound recorded in :attr:`IntegerLowering.agreement_bounds` and a warning names the layer.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import QuantizationError
from djpq_compiler.ir import modules as im
from djpq_compiler.ir.elementwise import add_rescale, concat_rescales
from djpq_compiler.ir.fixedpoint import qrange
from djpq_compiler.ir.lookup import LUT_MAX_BITS, IntLUT, build_table, unary_op_name
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.passes.fold_scales import fold_layer_scale
from djpq_compiler.passes.lowering.layers import LayerParams, layer_params
from djpq_compiler.passes.lowering.pools import pool_module, window_sum
from djpq_compiler.passes.pipeline import Recorded

__all__ = ["to_integer", "Act", "IntegerLowering"]


@dataclass(frozen=True)
class Act:
    """An integer activation: codes in ``qrange(bits, signed)`` at ``scale`` (zero point 0)."""

    scale: float
    bits: int
    signed: bool


_RELU = facts.RELU
_RELU6 = facts.RELU6
_SHAPE = facts.SHAPE_ONLY
#: Shape ops returning a tuple of tensors: on codes only when every user takes one piece.
_PIECES = facts.PIECES
_METADATA = facts.METADATA
_ADD = facts.RESIDUAL_ADD
_CAT = facts.CONCAT
_MUL = facts.MULTIPLY


@dataclass(frozen=True)
class IntegerLowering:
    """What ``to_integer`` lowered (``convert`` puts it in the ``ConvertedRecord``).

    Attributes:
        float_ops: Nodes left in float between integer layers.
        lut_ops: Nodes lowered to exact lookup tables.
        lowered_layers: ``{layer node: {"w_bits", "a_bits", "in", "out"}}``.
        agreement_bounds: ``{node: LSB}`` where the bound exceeds 1.
        quant_map: ``{prepared quantizer node: converted node of its codes}``.
    """

    float_ops: tuple[str, ...]
    lut_ops: tuple[str, ...]
    lowered_layers: dict[str, dict[str, int]]
    agreement_bounds: dict[str, int]
    quant_map: dict[str, str]


class _Lowering:
    def __init__(self, gm: fx.GraphModule, weight_grid: Mapping[str, tuple[float, int]],
                 layer_scales: Mapping[str, torch.Tensor]) -> None:
        self.gm = gm
        self.weight_grid = weight_grid
        self.layer_scales = dict(layer_scales)  # a gate factor is used once (popped)
        self.graph = fx.Graph()
        self.env: dict[str, fx.Node] = {}
        self.act: dict[str, Act | None] = {}
        self.deq: dict[str, fx.Node] = {}
        self.bank = nn.ModuleDict()
        self.done: set[str] = set()
        self.float_ops: list[str] = []
        self.lut_ops: list[str] = []
        self.layers: dict[str, dict[str, object]] = {}
        self.bounds: dict[str, int] = {}  # quantizer node -> LSB bound where it exceeds 1

    # --------------------------------------------------------------------------- helpers
    def key(self, node: fx.Node) -> object:
        if node.op == "call_module":
            return type(self.gm.get_submodule(str(node.target)))
        return node.target

    def params(self, node: fx.Node) -> LayerParams | None:
        return layer_params(self.gm, node, self.weight_grid, self.layer_scales)

    def is_quant(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(
            self.gm.get_submodule(str(node.target)), DQQuantizer)

    def quant_act(self, node: fx.Node) -> Act:
        q = self.gm.get_submodule(str(node.target))
        if not isinstance(q, DQQuantizer):
            raise TypeError(f"{node.format_node()} is not a quantizer")
        snapped = q.snapped()
        return Act(float(snapped.d), int(snapped.bits), bool(q.signed))

    def sole_user(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def quantizer_reading(self, node: fx.Node, through: Collection[object]) -> fx.Node | None:
        """The quantizer that reads ``node``'s value through a chain of ``through`` ops, each
        the only user of the one before; ``None`` if the chain branches or ends elsewhere."""
        nxt = self.sole_user(node)
        while nxt is not None and self.key(nxt) in through:
            nxt = self.sole_user(nxt)
        return nxt if nxt is not None and self.is_quant(nxt) else None

    def exact_sink(self, node: fx.Node) -> bool:
        """Whether ``node`` takes a window sum as it is: a quantizer (one requantization), or
        an op that runs in float (it dequantizes the exact average); not an integer add/concat
        or layer, whose input bits the sum would widen."""
        if self.is_quant(node) or node.op == "output":
            return True
        if self.key(node) in _ADD + _CAT:
            return not self.may_merge(node)
        return self.params(node) is None

    def may_merge(self, node: fx.Node) -> bool:
        """Whether the add/concat ``node`` can become an integer ``IntAdd``/``IntConcat``
        (:meth:`merge`'s static conditions: tensor operands only, ``alpha == 1``, concat on
        dim 1, read by a quantizer); otherwise it runs in float, e.g. ``x + (-2.0)``."""
        quant = self.sole_user(node)
        if quant is None or not self.is_quant(quant):
            return False
        if self.key(node) in _CAT:
            operands = node.args[0] if isinstance(node.args[0], (list, tuple)) else ()
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            return bool(dim == 1) and bool(operands) and all(
                isinstance(a, fx.Node) for a in operands)
        return bool(node.kwargs.get("alpha", 1) == 1) and len(node.args) >= 2 and all(
            isinstance(a, fx.Node) for a in node.args[:2])

    def sum_reaches_sinks(self, node: fx.Node) -> bool:
        """Whether every path from ``node`` (an average pool) runs through shape ops, ReLUs and
        pools only into an :meth:`exact_sink`, so that its window sum can be handed on as is."""
        users = [u for u in node.users if self.key(u) not in _METADATA]
        if not users:
            return False
        for user in users:
            if self.key(user) in _SHAPE + _RELU + _RELU6 or pool_module(self.gm, user) is not None:
                if not self.sum_reaches_sinks(user):
                    return False
            elif not self.exact_sink(user):
                return False
        return True

    def module(self, name: str, mod: nn.Module, args: tuple[Any, ...]) -> fx.Node:
        self.bank[name] = mod
        return self.graph.call_module(f"djpq_int.{name}", args)

    def as_float(self, node: fx.Node) -> fx.Node:
        """The float value of an already lowered node (dequantized once, if integer)."""
        act = self.act.get(node.name)
        if act is None:
            return self.env[node.name]
        if node.name not in self.deq:
            self.deq[node.name] = self.module(f"deq_{node.name}", im.Dequantize(act.scale),
                                              (self.env[node.name],))
        return self.deq[node.name]

    def copy_float(self, node: fx.Node) -> None:
        scale = self.layer_scales.pop(node.name, None)
        if scale is not None:  # a gated layer left in float: its gate factor goes in its weights
            fold_layer_scale(self.gm.get_submodule(str(node.target)), scale)
        new = self.graph.node_copy(node, lambda n: self.as_float(n))
        self.env[node.name], self.act[node.name] = new, None
        if node.op in ("call_module", "call_function", "call_method") and \
                self.key(node) not in _SHAPE:
            self.float_ops.append(node.name)

    def copy_int(self, node: fx.Node, act: Act) -> None:
        new = self.graph.node_copy(node, lambda n: self.env[n.name])
        self.env[node.name], self.act[node.name] = new, act

    # --------------------------------------------------------------------------- ops
    def quantizer(self, node: fx.Node) -> None:
        out = self.quant_act(node)
        src = node.args[0]
        src_act = self.act.get(_name(src))
        x = self.env[_name(src)]
        if src_act is None:
            new = self.module(f"q_{node.name}", im.Quantize(out.scale, out.bits, out.signed), (x,))
        elif src_act == out:
            new = x
        else:
            new = self.module(f"rq_{node.name}", im.Requantize(src_act.scale, out.scale,
                                                                out.bits, out.signed), (x,))
        self.env[node.name], self.act[node.name] = new, out

    def layer_chain(self, node: fx.Node) -> bool:
        x = node.args[0]
        x_act = self.act.get(x.name) if isinstance(x, fx.Node) else None
        params = self.params(node) if x_act is not None else None
        if params is None or x_act is None:
            return False
        chain, bn, relu, quant = self._chain(node)
        out_act = self.quant_act(quant) if quant is not None else None
        try:
            mod, lsb = params.build(self.gm, bn, x_act.scale, x_act.bits, x_act.signed, out_act,
                                    relu)
        except QuantizationError as err:
            if quant is None or relu is not None or not self.read_by_tables(quant):
                raise
            # a pre-activation quantizer (prepare's choice, not the user's): the layer keeps a
            # float output, quantized by that quantizer as in fake-quant; the table still runs
            warnings.warn(f"{err}. Its output stays float here and is quantized at {quant.name}"
                          " before the lookup table", stacklevel=5)
            chain = chain[:2] if bn is not None else chain[:1]
            quant = out_act = None
            mod, lsb = params.build(self.gm, bn, x_act.scale, x_act.bits, x_act.signed, None, None)
        new = self.module(f"{params.kind}_{node.name}", mod, (self.env[_name(x)],))
        for n in chain:
            self.done.add(n.name)
            self.env[n.name], self.act[n.name] = new, out_act
        self.layers[node.name] = {"w_bits": params.w_bits, "a_bits": x_act.bits,
                                  "out": mod.weight.shape[0], "in": params.in_channels(mod)}
        if quant is not None and lsb > 1:
            self.bounds[quant.name] = lsb
            warnings.warn(
                f"layer {node.name}: its accumulator step s_x*s_w is coarser than its output "
                "step and even the finest integer bias int32 allows costs at least one output "
                f"LSB, so the integer model may differ from fake-quant by up to {lsb} LSB at "
                f"{quant.name}; more input/weight bits (or fewer output bits) restore the 1-LSB "
                "agreement",
                stacklevel=5)
        return True

    def read_by_tables(self, quant: fx.Node) -> bool:
        """Whether every user of ``quant`` is an elementwise unary function (a table)."""
        return bool(quant.users) and all(
            unary_op_name(_target(self.gm, u)) is not None for u in quant.users)

    def _chain(self, node: fx.Node
               ) -> tuple[list[fx.Node], fx.Node | None, str | None, fx.Node | None]:
        chain, bn, relu = [node], None, None
        nxt = self.sole_user(node)
        if nxt is not None and nxt.op == "call_module" and isinstance(
                self.gm.get_submodule(str(nxt.target)), nn.modules.batchnorm._BatchNorm):
            bn_mod = self.gm.get_submodule(str(nxt.target))
            if bn_mod.running_mean is not None:
                bn, nxt = nxt, self.sole_user(nxt)
                chain.append(bn)
        base = list(chain)
        if nxt is not None and self.key(nxt) in _RELU + _RELU6:
            relu = "relu" if self.key(nxt) in _RELU else "relu6"
            chain.append(nxt)
            nxt = self.sole_user(nxt)
        while nxt is not None and _eval_identity(self.gm, nxt):  # e.g. drop path before an add
            chain.append(nxt)
            nxt = self.sole_user(nxt)
        if nxt is not None and self.is_quant(nxt):
            chain.append(nxt)
            return chain, bn, relu, nxt
        return base, bn, None, None

    def merge(self, node: fx.Node) -> bool:
        """Integer add/concat of quantized operands whose output is quantized next."""
        quant = self.sole_user(node)
        if quant is None or not self.is_quant(quant):
            return False
        is_cat = self.key(node) in _CAT
        raw = node.args[0] if is_cat else node.args[:2]
        operands = list(raw) if isinstance(raw, (list, tuple)) else []
        found = [self.act.get(a.name) if isinstance(a, fx.Node) else None for a in operands]
        acts = [a for a in found if a is not None]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if not operands or len(acts) != len(operands) or (is_cat and dim != 1):
            return False
        if not is_cat and node.kwargs.get("alpha", 1) != 1:  # a + alpha*b: IntAdd has no alpha
            return False
        out = self.quant_act(quant)
        ins = tuple(self.env[_name(a)] for a in operands)
        if is_cat:
            scales = [a.scale for a in acts]
            mod: nn.Module = im.IntConcat(concat_rescales(scales, out.scale), scales, out.scale,
                                          out.bits, out.signed, 1)
        else:
            a, b = acts
            mod = im.IntAdd(add_rescale(a.scale, b.scale, out.scale),
                            (a.scale, b.scale, out.scale), out.bits, out.signed)
        new = self.module(f"{'cat' if is_cat else 'add'}_{node.name}", mod, ins)
        for n in (node, quant):
            self.done.add(n.name)
            self.env[n.name], self.act[n.name] = new, out
        return True

    def product(self, node: fx.Node) -> bool:
        """Integer multiply (``IntMul``) of two quantized tensors whose product a quantizer
        reads next (the squeeze-excite ``x * gate``)."""
        quant = self.sole_user(node)
        operands = list(node.args)
        if quant is None or not self.is_quant(quant) or node.kwargs or len(operands) != 2:
            return False
        acts = [self.act.get(a.name) if isinstance(a, fx.Node) else None for a in operands]
        if acts[0] is None or acts[1] is None:
            return False
        out = self.quant_act(quant)
        mod = im.IntMul((acts[0].scale, acts[1].scale, out.scale), out.bits, out.signed)
        new = self.module(f"mul_{node.name}", mod, tuple(self.env[_name(a)] for a in operands))
        for n in (node, quant):
            self.done.add(n.name)
            self.env[n.name], self.act[n.name] = new, out
        return True

    def on_codes(self, node: fx.Node) -> bool:
        """Ops that run on codes at the input's scale: pooling, ReLU, shape ops."""
        x = node.args[0] if node.args else None
        act = self.act.get(x.name) if isinstance(x, fx.Node) else None
        if act is None:
            return False
        if self.pool_requant(node, act):
            return True
        if self.key(node) in _RELU6 and not _on_grid(6.0, act.scale):
            return self.relu6_off_grid(node, act)
        mod = int_module_for(self.gm, node, act)
        if mod is not None:
            self.env[node.name] = self.module(f"op_{node.name}", mod, (self.env[_name(x)],))
            self.act[node.name] = act
            return True
        if self.lookup_table(node, act):
            return True
        if (self.key(node) in _SHAPE and (self.key(node) not in _PIECES or all(
                self.key(u) is operator.getitem for u in node.users))) or \
                _eval_identity(self.gm, node):
            self.copy_int(node, act)
            return True
        return False

    def lookup_table(self, node: fx.Node, act: Act) -> bool:
        """An elementwise unary function (``UNARY_OPS``) of codes with <= ``LUT_MAX_BITS`` bits
        read (through shape ops) by a quantizer: one :class:`IntLUT` whose entries are the
        reference's ``Quantize_out(f(Dequantize_in(q)))`` for every code ``q``, i.e. exactly
        what the float island would compute, in integers."""
        name = unary_op_name(_target(self.gm, node))
        if name is None or act.bits > LUT_MAX_BITS or node.all_input_nodes != [node.args[0]]:
            return False
        quant = self.quantizer_reading(node, _SHAPE)
        if quant is None:
            return False
        out = self.quant_act(quant)
        lo, hi = qrange(act.bits, act.signed)
        table = build_table(_unary_callable(self.gm, node), im.Dequantize(act.scale),
                            im.Quantize(out.scale, out.bits, out.signed), lo, hi)
        lut = IntLUT(table, name, act.scale, act.bits, act.signed, out.scale, out.bits,
                     out.signed)
        self.env[node.name] = self.module(f"lut_{node.name}", lut,
                                          (self.env[_name(node.args[0])],))
        self.act[node.name] = out
        self.lut_ops.append(node.name)
        return True

    def relu6_off_grid(self, node: fx.Node, act: Act) -> bool:
        """ReLU6 on codes whose grid misses 6.0: fake-quant's value 6.0 is between two codes.
        Read (through shape ops) by a quantizer: requantize to that quantizer's grid first and
        clip at ``round(6 / s_out)`` there, which is what quantizing 6.0 gives (one rounding).
        Otherwise it runs in float (its readers are float ops, which must see 6.0 itself)."""
        quant = self.quantizer_reading(node, _SHAPE)
        if quant is None:
            self.copy_float(node)
            return True
        out = self.quant_act(quant)
        x = self.env[_name(node.args[0])]
        if out != act:
            x = self.module(f"rq_{node.name}", im.Requantize(act.scale, out.scale, out.bits,
                                                            out.signed), (x,))
        lo, hi = qrange(out.bits, out.signed)
        six = int(torch.round(torch.tensor(6.0 / out.scale, dtype=torch.float64)))
        self.env[node.name] = self.module(f"op_{node.name}", im.IntClip(max(lo, 0), min(hi, six)),
                                          (x,))
        self.act[node.name] = out
        return True

    def pool_requant(self, node: fx.Node, act: Act) -> bool:
        """An average pool whose value reaches a quantizer or a float op (through shape ops,
        ReLUs and pools):
        the integer window sum, i.e. the exact average at scale ``s_in / count``; the
        quantizer then requantizes it once (rounding at the input's scale first would be off
        by up to ``s_in / s_out / 2`` LSB when the output grid is finer)."""
        reaches_sinks = self.sum_reaches_sinks(node)
        summed = window_sum(self.gm, node) if reaches_sinks else None
        if summed is not None and act.bits + (summed[1] - 1).bit_length() > 16:
            summed = None  # codes wider than 16 bits (pools of pools): the mean, not the sum
        if summed is None:
            if self.fused_pool_requant(node, act):
                return True
            if reaches_sinks and isinstance(pool_module(self.gm, node), (
                    im.IntAvgPool2d, im.IntAdaptiveAvgPool2d)):
                # uneven windows read by float ops (and quantizers): the exact mean in float,
                # as fake-quant computes it; those readers are float already
                self.copy_float(node)
                return True
            return False
        pool, count = summed
        x = self.env[_name(node.args[0])]
        self.env[node.name] = self.module(f"sum_{node.name}", pool, (x,))
        self.act[node.name] = Act(act.scale / count, act.bits + (count - 1).bit_length(),
                                  act.signed)
        return True

    def fused_pool_requant(self, node: fx.Node, act: Act) -> bool:
        """An average pool with uneven windows (partial ``ceil_mode`` windows, uncounted
        padding, uneven adaptive bins) whose value runs through shape ops and ReLUs (one user
        each) into a quantizer with another grid: pool and requantization in one
        ``IntPoolRequantize`` (exact sums, one multiplier per window divisor), so the codes
        reach that quantizer's grid with a single rounding."""
        pool = pool_module(self.gm, node)
        if not isinstance(pool, (im.IntAvgPool2d, im.IntAdaptiveAvgPool2d)) or (
                isinstance(pool, im.IntAvgPool2d) and pool.divisor_override is not None):
            return False
        shape = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) \
            else None
        quant = self.quantizer_reading(node, _SHAPE + _RELU + _RELU6)
        if quant is None or shape is None or len(shape.shape) != 4:
            return False
        out = self.quant_act(quant)
        if out == act:
            return False  # same grid: pooling at the input's scale rounds once already
        mod = im.IntPoolRequantize(pool, tuple(shape.shape[2:]), act.scale, act.bits,
                                   act.signed, out.scale, out.bits, out.signed)
        self.env[node.name] = self.module(f"pool_rq_{node.name}", mod,
                                          (self.env[_name(node.args[0])],))
        self.act[node.name] = out
        return True

    def run(self) -> Recorded[IntegerLowering]:
        for node in self.gm.graph.nodes:
            if node.name in self.done:
                continue
            if node.op in ("placeholder", "get_attr"):
                self.env[node.name], self.act[node.name] = self.graph.node_copy(node), None
            elif node.op == "output":
                self.graph.node_copy(node, lambda n: self.as_float(n))
            elif self.is_quant(node):
                self.quantizer(node)
            elif self.key(node) in _METADATA:  # sizes of codes == sizes of values
                self.env[node.name] = self.graph.node_copy(node, lambda n: self.env[n.name])
                self.act[node.name] = None
            elif self.key(node) in _ADD + _CAT and self.merge(node):
                continue
            elif self.key(node) in _MUL and self.product(node):
                continue
            elif self.layer_chain(node) or self.on_codes(node):
                continue
            else:
                self.copy_float(node)
        self.gm.add_module("djpq_int", self.bank)
        out = fx.GraphModule(self.gm, self.graph, "ConvertedModel")
        quant_map = {  # prepared quantizer node -> converted node of its codes
            n.name: self.env[n.name].name for n in self.gm.graph.nodes
            if self.is_quant(n) and self.act.get(n.name) is not None}
        lowered = cast(dict[str, dict[str, int]], self.layers)
        return Recorded(out, IntegerLowering(tuple(self.float_ops), tuple(self.lut_ops), lowered,
                                             self.bounds, quant_map))


def _name(arg: object) -> str:
    """The name of a node argument (every caller has checked it is a node)."""
    if not isinstance(arg, fx.Node):
        raise TypeError(f"expected an fx.Node, got {type(arg).__name__}")
    return arg.name


def _target(gm: fx.GraphModule, node: fx.Node) -> object:
    """The registry key of ``node``: module class, function, or ``torch.Tensor`` method."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target)))
    if node.op == "call_method":
        return getattr(torch.Tensor, str(node.target), None)
    return node.target


def _unary_callable(gm: fx.GraphModule, node: fx.Node) -> Any:
    """``node``'s computation as a function of its tensor input (other arguments fixed)."""
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return lambda x: module(x, *rest, **kwargs)
    if node.op == "call_method":
        return lambda x: getattr(x, str(node.target))(*rest, **kwargs)
    target: Any = node.target
    return lambda x: target(x, *rest, **kwargs)


def _eval_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is torchvision's stochastic depth (drop path) fixed to inference mode
    (``training=False`` or ``p == 0``): the identity, on codes as on values."""
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except ImportError:  # torchvision is optional
        return False
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return isinstance(module, StochasticDepth) and (not module.training or module.p == 0)
    if node.op != "call_function" or node.target is not stochastic_depth:
        return False
    args = dict(zip(("input", "p", "mode", "training"), node.args, strict=False)) | node.kwargs
    return args.get("training", True) is False or bool(args.get("p") == 0)


def _on_grid(value: float, scale: float) -> bool:
    """Whether ``value`` is (to float precision) a multiple of ``scale``."""
    k = round(value / scale)
    return abs(k * scale - value) <= 1e-6 * abs(value)


def int_module_for(gm: fx.GraphModule, node: fx.Node, act: Act) -> nn.Module | None:
    """The integer module computing ``node`` on codes at ``act``'s scale, if there is one."""
    key = type(gm.get_submodule(str(node.target))) if node.op == "call_module" else node.target
    lo, hi = qrange(act.bits, act.signed)
    if key in _RELU:
        return im.IntClip(max(lo, 0), hi)
    if key in _RELU6:
        return im.IntClip(max(lo, 0), min(hi, int(torch.round(torch.tensor(6.0 / act.scale)))))
    return pool_module(gm, node)


def to_integer(gm: fx.GraphModule, weight_grid: Mapping[str, tuple[float, int]],
               layer_scales: Mapping[str, torch.Tensor]) -> Recorded[IntegerLowering]:
    """Lower ``gm`` (see module docstring).

    Args:
        gm: The folded, pruned graph.
        weight_grid: ``{layer node: (d, bits)}`` (``strip_weight_quantizers``' record).
        layer_scales: ``{layer node: gate factor}`` (``fold_scales``' record); not modified.

    Returns:
        ``Recorded(converted, IntegerLowering)``: a new ``GraphModule`` and what was lowered.
    """
    gm.eval()
    with torch.no_grad():
        return _Lowering(gm, weight_grid, layer_scales).run()

