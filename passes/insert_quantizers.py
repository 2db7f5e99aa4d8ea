"""Insert-quantizers pass: DQ quantizers on weights and on the activations that matter for BOPs.

Requires: a captured graph (``tensor_meta`` on tensor nodes), the conv/linear ``layers`` found on
it (``djpq_compiler.layers.find_layers``; gates may have been inserted since, node objects are
unchanged) and the resolved configuration of each layer, keyed by layer node name.
Guarantees:

* **Weights.** Every layer whose resolved ``weight`` spec is set gets a signed
  :class:`~djpq_compiler.modules.quantizers.DQQuantizer`. Module layers carry it as a
  ``torch.nn.utils.parametrize`` parametrization of ``weight`` (path
  ``<module>.parametrizations.weight.0``; the float weight stays at ``...weight.original``); a
  module called twice shares it. Functional layers get a ``call_module`` node
  ``djpq_quant.w_<weight node>`` right after the weight's node (usually a ``get_attr``).
* **Activations.** Every tensor read (as input 0) by a layer whose ``activation`` spec is set gets
  one quantizer node ``djpq_quant.a_<producer>`` directly after its producer, shared by *all*
  users of that producer (a tensor is quantized once, as in integer deployment). The spec is the
  one of the first such layer in graph order. Residual adds (two tensor operands) and concats
  get one on their output *and on each operand* (integer add/concat takes integer operands).
  The network input (a placeholder) is quantized at ``config.input_bits``, fixed.
* **Pre-activations** (``config.quantize_pre_activation``, default on) [choice]: the input of a
  non-ReLU elementwise activation (the ``UNARY_OPS`` of ``djpq_compiler/ir/lookup.py`` other
  than ReLU/ReLU6: sigmoid, hardsigmoid, hardswish, SiLU, GELU, tanh, hardtanh) that reads a
  conv/linear output (through its BN and gate) gets a quantizer ``a_<BN or gate or layer>``, so
  that ``convert`` lowers the layer with integer output codes and the activation to an exact
  lookup table. Its spec is the *producer* layer's resolved ``activation`` spec (overrides and
  ``fix_first_last_8bit`` of that layer apply; an ignored producer gets none), with
  ``max_bits`` capped at ``LUT_MAX_BITS`` (8) when its initial bits allow, since a wider input
  code cannot become a table. Such an activation whose every user is a tensor-tensor multiply
  (the squeeze-excite gate ``x * sigmoid(...)``) also gets a quantizer on its output, so that the
  gate itself is a table. These quantizers feed no conv/linear: they add no BOPs.
* **Signedness** [choice]: unsigned when the graph proves the value non-negative (ReLU, ReLU6,
  sigmoid, softmax, abs; then pooling, reshapes, slicing, concat of non-negative values, and
  arithmetic whose operands, scalars included, keep the sign — see
  :mod:`djpq_compiler.passes.sign_analysis`); otherwise the quantizer is built signed and listed in
  ``QuantizerPaths.auto_signed`` so that calibration makes it unsigned when every observed
  value is ``>= 0``. An explicit ``QuantSpec.signed`` always wins.
* The returned :class:`~djpq_compiler.records.QuantizerPaths` maps layer node names to their
  weight and input quantizer paths and producer node names to activation quantizer paths. All
  quantizers start calibrating (observers). The graph is linted and recompiled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from djpq_compiler import op_facts as facts
from djpq_compiler.config import DJPQConfig, QuantSpec, ResolvedLayerConfig
from djpq_compiler.ir.lookup import BINARY_OPS, LUT_MAX_BITS, UNARY_OPS
from djpq_compiler.layers import Layer, tensor_shape
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.passes.pipeline import Recorded
from djpq_compiler.passes.sign_analysis import NONNEG_RULES, nonnegative_nodes
from djpq_compiler.records import QuantizerPaths

__all__ = ["insert_quantizers", "nonnegative_nodes", "NONNEG_RULES", "QUANT_ATTR"]

#: Attribute of the prepared ``GraphModule`` holding the node quantizers.
QUANT_ATTR = "djpq_quant"

_RESIDUAL_OPS = facts.RESIDUAL_ADD
_CONCAT_OPS = facts.CONCAT


def _is_residual_or_concat(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or tensor_shape(node) is None:
        return False
    if node.target in _CONCAT_OPS:
        return True
    if node.target in _RESIDUAL_OPS:
        return sum(tensor_shape(a) is not None for a in node.args[:2]) == 2
    return False


class _Inserter:
    """Builds and places the quantizers of one graph (state of one pass invocation)."""

    def __init__(self, gm: fx.GraphModule, config: DJPQConfig) -> None:
        self.gm, self.config = gm, config
        self.bank = nn.ModuleDict()
        gm.add_module(QUANT_ATTR, self.bank)
        self.nonneg = nonnegative_nodes(gm)
        self.weight_q: dict[str, str] = {}
        self.input_q: dict[str, str] = {}
        self.act_q: dict[str, str] = {}
        self.auto: list[str] = []

    def _build(self, spec: QuantSpec, signed: bool, n_channels: int | None, dim: int,
               fixed_bits: int | None = None) -> DQQuantizer:
        if fixed_bits is not None:
            return DQQuantizer(spec.signed if spec.signed is not None else signed,
                               init_bits=fixed_bits, fixed_bits=True, max_bits=32)
        return DQQuantizer.from_spec(
            spec, signed, restricted=self.config.restricted,
            allowed_bits=self.config.allowed_bits,
            n_channels=n_channels if spec.per_channel else None, channel_dim=dim)

    def weight(self, layer: Layer, spec: QuantSpec) -> None:
        dim = 1 if layer.kind == "conv_transpose" else 0
        quant = self._build(spec, True, layer.weight_shape[dim], dim)
        node = layer.node
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            if not parametrize.is_parametrized(mod, "weight"):
                parametrize.register_parametrization(mod, "weight", quant)
            self.weight_q[node.name] = f"{node.target}.parametrizations.weight.0"
            return
        w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        if not isinstance(w, fx.Node):
            return
        if w.op == "call_module" and str(w.target).startswith(f"{QUANT_ATTR}.w_"):
            self.weight_q[node.name] = str(w.target)  # weight shared with an earlier layer
            return
        self.weight_q[node.name] = self._insert_after(w, f"w_{w.name}", quant)

    def activation(self, producer: fx.Node, spec: QuantSpec) -> str:
        if producer.name in self.act_q:
            return self.act_q[producer.name]
        nonneg = producer.name in self.nonneg
        shape = tensor_shape(producer)
        n_ch = shape[1] if shape is not None and len(shape) > 1 else None
        fixed = self.config.input_bits if producer.op == "placeholder" else None
        quant = self._build(spec, not nonneg, n_ch, 1, fixed)
        path = self._insert_after(producer, f"a_{producer.name}", quant)
        if spec.signed is None and not nonneg:
            self.auto.append(path)
        self.act_q[producer.name] = path
        return path

    def _insert_after(self, node: fx.Node, key: str, quant: DQQuantizer) -> str:
        self.bank[key] = quant
        path = f"{QUANT_ATTR}.{key}"
        with self.gm.graph.inserting_after(node):
            q = self.gm.graph.call_module(path, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        return path


def _merge_operands(node: fx.Node) -> list[fx.Node]:
    """Tensor operands of a residual add (args 0, 1) or a concat (the list in arg 0)."""
    args = node.args[0] if node.target in _CONCAT_OPS else node.args[:2]
    if not isinstance(args, (list, tuple)):
        return []
    return [a for a in args if isinstance(a, fx.Node) and tensor_shape(a) is not None]


def _is_activation_quantizer(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(f"{QUANT_ATTR}.a_")


#: Ops that commute with quantization (same values either way): the quantizer may sit before.
_COMMUTING = facts.COMMUTES_WITH_QUANTIZATION


def _commutes(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (nn.MaxPool2d, nn.Flatten,
                                                                nn.Dropout, nn.Identity))
    return node.op in ("call_function", "call_method") and node.target in _COMMUTING


def _layer_input(layer: Layer, gm: fx.GraphModule) -> fx.Node | None:
    """The node whose output is quantized for ``layer``: its input, looking back through
    ops that commute with quantization (reshapes, max pooling, dropout) so the
    producer itself is quantized — the same values, and the integer conv/linear before them
    then emits codes directly (max pooling is exact on codes)."""
    x = layer.node.args[0] if layer.node.args else layer.node.kwargs.get("input")
    while isinstance(x, fx.Node) and _commutes(gm, x) and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return x if isinstance(x, fx.Node) else None


#: Average pools: quantizing their output alone leaves the producer before them in float.
_AVG_POOLS = facts.AVG_POOLS.modules()
_AVG_POOL_FNS = facts.AVG_POOLS


def _avg_pool_source(gm: fx.GraphModule, x: fx.Node | None) -> fx.Node | None:
    """The input of ``x`` when ``x`` is a 2-D average pool (looking back through commuting ops),
    else ``None``.

    [choice] A layer reading ``act -> avg pool`` (MobileNet/EfficientNet heads) gets a second
    activation quantizer on the pool's input: the producer conv then emits integer codes and the
    pool runs on integers (mean of codes, rounded, then requantized to the layer's input scale).
    With the layer's quantizer alone, conv, activation and pool stayed a float island, which the
    TVM backend does not lower.
    """
    if x is None:
        return None
    is_pool = (x.op == "call_module" and isinstance(gm.get_submodule(str(x.target)), _AVG_POOLS)
               ) or (x.op == "call_function" and x.target in _AVG_POOL_FNS)
    if not is_pool or not x.args or not isinstance(x.args[0], fx.Node):
        return None
    src = x.args[0]
    while _commutes(gm, src) and src.args and isinstance(src.args[0], fx.Node):
        src = src.args[0]
    return src if tensor_shape(src) is not None else None


#: Unary ops handled by the layer chain itself (clip range), never given a pre-activation quantizer.
_CLIP_ACTIVATIONS = (facts.RELU_OP.name, facts.RELU6_OP.name)
_NORMS = facts.BATCH_NORMS.modules()


def _call_key(gm: fx.GraphModule, node: fx.Node) -> object:
    """The registry key of ``node``: module class, function, or ``torch.Tensor`` method."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target)))
    if node.op == "call_method":
        return getattr(torch.Tensor, str(node.target), None)
    return node.target if node.op == "call_function" else None


def _op_name(table: Mapping[object, str], gm: fx.GraphModule, node: fx.Node) -> str | None:
    try:
        return table.get(_call_key(gm, node))
    except TypeError:  # unhashable target
        return None


def _lut_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a non-ReLU elementwise unary op of one tensor (a table candidate)."""
    name = _op_name(UNARY_OPS, gm, node)
    return (name is not None and name not in _CLIP_ACTIVATIONS and bool(node.args)
            and isinstance(node.args[0], fx.Node) and node.all_input_nodes == [node.args[0]])


def _producer_layer(gm: fx.GraphModule, x: fx.Node, by_name: Mapping[str, Layer]
                    ) -> Layer | None:
    """The conv/linear layer whose output ``x`` is, looking back through a VIB gate and one
    BatchNorm module (the chain ``convert`` fuses into one integer layer); else ``None``."""
    node: object = x
    if isinstance(node, fx.Node) and node.op == "call_module" and \
            str(node.target).startswith("djpq_gates."):
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "call_module" and \
            isinstance(gm.get_submodule(str(node.target)), _NORMS):
        node = node.args[0]
    return by_name.get(node.name) if isinstance(node, fx.Node) else None


def _lut_spec(spec: QuantSpec) -> QuantSpec:
    """``spec`` with ``max_bits`` capped at :data:`LUT_MAX_BITS` where its bits allow."""
    if spec.max_bits <= LUT_MAX_BITS or spec.bits > LUT_MAX_BITS:
        return spec
    return replace(spec, max_bits=LUT_MAX_BITS, min_bits=min(spec.min_bits, LUT_MAX_BITS))


def _only_multiplied(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether every user of ``node`` multiplies it with another tensor (an SE gate)."""
    return bool(node.users) and all(
        _op_name(BINARY_OPS, gm, u) == "multiply"
        and sum(tensor_shape(a) is not None for a in u.args[:2]) == 2 for u in node.users)


def _pre_activation_producers(gm: fx.GraphModule, layers: Sequence[Layer],
                              layer_configs: Mapping[str, ResolvedLayerConfig]
                              ) -> dict[str, tuple[fx.Node, QuantSpec]]:
    """Inputs (and SE-gate outputs) of the table candidates fed by a layer (module docstring)."""
    by_name = {la.node.name: la for la in layers}
    out: dict[str, tuple[fx.Node, QuantSpec]] = {}
    for node in gm.graph.nodes:
        if not _lut_activation(gm, node) or tensor_shape(node) is None:
            continue
        x: fx.Node = node.args[0]
        layer = _producer_layer(gm, x, by_name)
        spec = layer_configs[layer.node.name].activation if layer is not None else None
        if spec is None:
            continue
        out.setdefault(x.name, (x, _lut_spec(spec)))
        if _only_multiplied(gm, node):
            out.setdefault(node.name, (node, _lut_spec(spec)))
    return out


def insert_quantizers(gm: fx.GraphModule, config: DJPQConfig, layers: Sequence[Layer],
                      layer_configs: Mapping[str, ResolvedLayerConfig]
                      ) -> Recorded[QuantizerPaths]:
    """Insert weight and activation DQ quantizers (see the module docstring for the rules).

    Args:
        gm: The captured (possibly gated) graph.
        config: The global configuration (``input_bits``, ``restricted``, ``allowed_bits``).
        layers: Its conv/linear layers, in graph order.
        layer_configs: ``{layer node name: resolved config}`` for every layer.

    Returns:
        ``Recorded(gm, QuantizerPaths)``.
    """
    ins = _Inserter(gm, config)
    for layer in layers:
        spec = layer_configs[layer.node.name].weight
        if spec is not None:
            ins.weight(layer, spec)
    producers: dict[str, tuple[fx.Node, QuantSpec]] = {}
    for layer in layers:
        x, spec = _layer_input(layer, gm), layer_configs[layer.node.name].activation
        if x is not None and spec is not None and x.name not in producers:
            producers[x.name] = (x, spec)
    merges = {n.name for n in gm.graph.nodes if config.quantize and _is_residual_or_concat(n)}
    for layer in layers:
        src = _avg_pool_source(gm, _layer_input(layer, gm))
        if (src is not None and layer_configs[layer.node.name].activation is not None
                and src.name not in producers and src.name not in merges
                and src.op != "placeholder"):
            producers[src.name] = (src, config.activation)
    if config.quantize and config.quantize_pre_activation:
        for name, entry in _pre_activation_producers(gm, layers, layer_configs).items():
            if name not in merges:
                producers.setdefault(name, entry)
    for node in list(gm.graph.nodes):  # before any insertion: shapes are known
        if node.name in merges:  # integer add/concat needs integer operands
            for operand in _merge_operands(node):
                if not _is_activation_quantizer(operand):
                    ins.activation(operand, config.activation)
        if node.name in producers:
            ins.activation(*producers[node.name])
        elif node.name in merges:
            ins.activation(node, config.activation)
    for layer in layers:
        x = _layer_input(layer, gm)  # now the quantizer node, when there is one
        if x is not None and _is_activation_quantizer(x):
            ins.input_q[layer.node.name] = str(x.target)
    gm.graph.lint()
    gm.recompile()
    paths = QuantizerPaths(ins.weight_q, ins.input_q, ins.act_q, tuple(ins.auto))
    return Recorded(gm, paths, bool(ins.weight_q or ins.act_q))
