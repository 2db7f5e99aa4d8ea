"""Op facts as data, once: which ops are elementwise, ReLU, zero- or sign-preserving, shape-only.

An op is one :class:`Op` under all its spellings: the module class, the functions and the
``torch.Tensor`` methods that compute it (``nn.ReLU``, ``F.relu``, ``torch.relu``,
``x.relu()``). A fact is an :class:`OpSet` of ops. Membership is tested with the keys every
registry of this project uses (:func:`djpq_compiler.registry.node_key`): a module class, a
function, a ``torch.Tensor`` method, or a method *name* (``"relu" in RELU`` and
``torch.Tensor.relu in RELU`` are the same test, see :func:`~djpq_compiler.registry.op_key`).

Passes and backends read the same sets: ``passes/to_integer`` fuses :data:`RELU` into the layer
before it, ``passes/dependency`` lets channels through :data:`ZERO_PRESERVING`,
``passes/sign_analysis`` knows :data:`ALWAYS_NONNEG`, and the backends register their
converters for ``*RELU``, ``*SIGMOID``, .... Adding a spelling to an :class:`Op` adds it
everywhere the op is known.

A set lists exactly the spellings its users lower or reason about; in-place variants
(``relu_``) are separate ops, since an in-place op also changes its input.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import op_key

__all__ = [
    "ALWAYS_NONNEG", "AVG_POOLS", "BATCH_NORMS", "COMMUTES_WITH_QUANTIZATION", "CONCAT",
    "DROPOUTS", "ELEMENTWISE_BINARY", "ELEMENTWISE_UNARY", "IDENTITY", "LAYER_NORM", "LAYOUT",
    "MATMUL", "METADATA", "MULTIPLY", "NOT_ZERO_PRESERVING", "OPS", "Op", "OpSet", "PIECES",
    "RELU", "RELU6", "RESHAPE", "RESIDUAL_ADD", "SELECT", "SHAPE_ONLY", "SHAPE_READS",
    "SIGN_PRESERVING", "TUPLE_PRODUCERS", "ZERO_PRESERVING", "name_table", "op_name", "ops",
]


@dataclass(frozen=True)
class Op:
    """One op under all its spellings.

    Attributes:
        name: Canonical name (``"relu"``).
        modules: Module classes computing it (``nn.ReLU``).
        functions: Functions computing it (``F.relu``, ``torch.relu``, ``operator.add``).
        methods: ``torch.Tensor`` method names computing it (``"relu"``).
    """

    name: str
    modules: tuple[type, ...] = ()
    functions: tuple[object, ...] = ()
    methods: tuple[str, ...] = ()

    def keys(self) -> tuple[object, ...]:
        """Every registry key of the op (methods as ``torch.Tensor`` method objects)."""
        return (*self.modules, *self.functions, *(op_key(m) for m in self.methods))


class OpSet(frozenset[object]):
    """A frozen set of registry keys; ``in`` accepts any spelling (method names included) and
    never raises (an unhashable target is in no set)."""

    def __contains__(self, key: object) -> bool:
        try:
            return super().__contains__(op_key(key))
        except TypeError:  # unhashable target
            return False

    def __iter__(self) -> Iterator[object]:
        return super().__iter__()

    def __add__(self, other: Iterable[object]) -> OpSet:
        """The union (``+`` as on the tuples these sets replace)."""
        return ops(self, other)

    def modules(self) -> tuple[type, ...]:
        """The module classes of the set, for ``isinstance`` (sorted by name: stable)."""
        return tuple(sorted((k for k in self if isinstance(k, type)), key=lambda t: t.__name__))


def ops(*members: Op | Iterable[object] | object) -> OpSet:
    """An :class:`OpSet` of ops, other sets and single keys (functions, classes, method names)."""
    keys: list[object] = []
    for member in members:
        if isinstance(member, Op):
            keys.extend(member.keys())
        elif isinstance(member, (frozenset, set, tuple, list)):
            keys.extend(op_key(k) for k in member)
        else:
            keys.append(op_key(member))
    return OpSet(keys)


def _op(name: str, modules: tuple[type, ...] = (), functions: tuple[object, ...] = (),
        methods: tuple[str, ...] = ()) -> Op:
    return Op(name, modules, functions, methods)


# ------------------------------------------------------------------------------ the ops
# Elementwise activations.
RELU_OP = _op("relu", (nn.ReLU,), (F.relu, torch.relu), ("relu",))
RELU_INPLACE_OP = _op("relu_", (), (F.relu_, torch.relu_), ("relu_",))
RELU6_OP = _op("relu6", (nn.ReLU6,), (F.relu6,))
HARDTANH_OP = _op("hardtanh", (nn.Hardtanh,), (F.hardtanh,))
SIGMOID_OP = _op("sigmoid", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",))
HARDSIGMOID_OP = _op("hardsigmoid", (nn.Hardsigmoid,), (F.hardsigmoid,))
HARDSWISH_OP = _op("hardswish", (nn.Hardswish,), (F.hardswish,))
SILU_OP = _op("silu", (nn.SiLU,), (F.silu,))
GELU_OP = _op("gelu", (nn.GELU,), (F.gelu,))
TANH_OP = _op("tanh", (nn.Tanh,), (torch.tanh,), ("tanh",))
SOFTMAX_OP = _op("softmax", (nn.Softmax,), (F.softmax, torch.softmax), ("softmax",))

# Binary arithmetic and joins.
ADD_OP = _op("add", (), (operator.add, torch.add), ("add",))
SUB_OP = _op("subtract", (), (operator.sub, torch.sub), ("sub",))
MUL_OP = _op("multiply", (), (operator.mul, torch.mul), ("mul",))
DIV_OP = _op("divide", (), (operator.truediv, torch.div), ("div",))
CAT_OP = _op("cat", (), (torch.cat, torch.concat))

# Ops that move values without changing them.
FLATTEN_OP = _op("flatten", (nn.Flatten,), (torch.flatten,), ("flatten",))
VIEW_OP = _op("view", (), (), ("view",))
RESHAPE_OP = _op("reshape", (), (torch.reshape,), ("reshape",))
PERMUTE_OP = _op("permute", (), (torch.permute,), ("permute",))
TRANSPOSE_OP = _op("transpose", (), (torch.transpose,), ("transpose",))
SWAPAXES_OP = _op("swapaxes", (), (torch.swapaxes,), ("swapaxes",))
SQUEEZE_OP = _op("squeeze", (), (torch.squeeze,), ("squeeze",))
UNSQUEEZE_OP = _op("unsqueeze", (), (torch.unsqueeze,), ("unsqueeze",))
GETITEM_OP = _op("getitem", (), (operator.getitem,))
SPLIT_OP = _op("split", (), (torch.split,), ("split",))
CHUNK_OP = _op("chunk", (), (torch.chunk,), ("chunk",))
UNBIND_OP = _op("unbind", (), (torch.unbind,), ("unbind",))
TENSOR_SPLIT_OP = _op("tensor_split", (), (torch.tensor_split,), ("tensor_split",))
IDENTITY_OP = _op("identity", (nn.Identity,))
DROPOUT_OP = _op("dropout", (nn.Dropout,), (F.dropout,))
#: The other dropouts (identities at inference too; few passes know them).
DROPOUT_ND_OP = _op("dropout_nd", (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
                    (F.dropout1d, F.dropout2d, F.dropout3d))
ALPHA_DROPOUT_OP = _op("alpha_dropout", (nn.AlphaDropout, nn.FeatureAlphaDropout),
                       (F.alpha_dropout, F.feature_alpha_dropout))
NARROW_OP = _op("narrow", (), (torch.narrow,), ("narrow",))
DETACH_OP = _op("detach", (), (torch.detach,), ("detach",))
CLONE_OP = _op("clone", (), (torch.clone,), ("clone",))
MATMUL_OP = _op("matmul", (), (torch.matmul, operator.matmul, torch.bmm),
                ("matmul", "bmm", "__matmul__"))
MAX_POOL2D_OP = _op("max_pool2d", (nn.MaxPool2d,), (F.max_pool2d,))
AVG_POOL2D_OP = _op("avg_pool2d", (nn.AvgPool2d,), (F.avg_pool2d,))
ADAPTIVE_AVG_POOL2D_OP = _op("adaptive_avg_pool2d", (nn.AdaptiveAvgPool2d,),
                             (F.adaptive_avg_pool2d,))
LAYER_NORM_OP = _op("layer_norm", (nn.LayerNorm,), (F.layer_norm, torch.layer_norm))


# ------------------------------------------------------------------------------ the facts
#: max(x, 0) (out of place): fused into the integer layer before it as a clip of its range.
RELU = ops(RELU_OP)
#: clip(x, 0, 6): fused like :data:`RELU`.
RELU6 = ops(RELU6_OP)
#: Elementwise unary float functions a backend lowers per op (and an exact table on codes).
ELEMENTWISE_UNARY = ops(RELU_OP, RELU6_OP, HARDTANH_OP, SIGMOID_OP, HARDSIGMOID_OP,
                        HARDSWISH_OP, SILU_OP, GELU_OP, TANH_OP)
#: Elementwise binary float arithmetic (broadcasting, tensor-scalar too): float islands.
ELEMENTWISE_BINARY = ops(ADD_OP, SUB_OP, MUL_OP, DIV_OP)
#: A residual join: ``a + b``.
RESIDUAL_ADD = ops(ADD_OP)
#: ``a * b``.
MULTIPLY = ops(MUL_OP)
#: Concatenation along a dim.
CONCAT = ops(CAT_OP)
#: Ops returning a tuple of pieces of their input that the integer graph runs on codes.
PIECES = ops(SPLIT_OP, CHUNK_OP, UNBIND_OP)
#: Every op returning a tuple of tensors (pieces of its input).
TUPLE_PRODUCERS = PIECES + TENSOR_SPLIT_OP.keys()
#: Ops selecting part of their input (an index, a slice, a piece).
SELECT = ops(GETITEM_OP, NARROW_OP, TUPLE_PRODUCERS)
#: Reads of a tensor's sizes that a converted graph keeps next to integer codes.
METADATA = ops(builtins.getattr, "size", "dim")
#: Every read of a tensor's shape, never its values (registry keys).
SHAPE_READS = METADATA + ("ndimension", "numel", torch.numel)
#: Returns its input (``nn.Identity``) or does at inference (dropout in eval mode).
IDENTITY = ops(IDENTITY_OP)
#: Dropout in every form; the identity in eval mode or with ``p == 0``.
DROPOUTS = ops(DROPOUT_OP, DROPOUT_ND_OP, ALPHA_DROPOUT_OP, torch.dropout)
#: Rearranging ops whose channel index map follows from the shapes (no arithmetic).
LAYOUT = ops(FLATTEN_OP, PERMUTE_OP, TRANSPOSE_OP, SQUEEZE_OP, UNSQUEEZE_OP, CAT_OP,
             torch.concatenate, torch.stack, "expand", "expand_as", "repeat", nn.Unflatten,
             "unflatten", torch.movedim, "movedim", SWAPAXES_OP, "contiguous", "clone",
             "detach", torch.clone)
#: ``view``/``reshape``: a new shape for the same values.
RESHAPE = ops(VIEW_OP, RESHAPE_OP)
#: Matrix products of two tensors.
MATMUL = ops(MATMUL_OP)
#: Ops that move integer codes unchanged (same values, new layout), so they run on codes.
SHAPE_ONLY = ops(FLATTEN_OP, VIEW_OP, RESHAPE_OP, PERMUTE_OP, TRANSPOSE_OP, "contiguous",
                 GETITEM_OP, SQUEEZE_OP, UNSQUEEZE_OP, IDENTITY_OP, DROPOUT_OP, SWAPAXES_OP,
                 "expand", "expand_as", "reshape_as", "view_as", SPLIT_OP, CHUNK_OP, UNBIND_OP)
#: Ops that commute with quantization (quantize before or after: same codes).
COMMUTES_WITH_QUANTIZATION = ops(FLATTEN_OP, VIEW_OP, RESHAPE_OP, MAX_POOL2D_OP, DROPOUT_OP,
                                 IDENTITY_OP)
#: 2-D average pools (module and functional forms).
AVG_POOLS = ops(AVG_POOL2D_OP, ADAPTIVE_AVG_POOL2D_OP)
#: Batch norms.
BATCH_NORMS = ops(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Layer norm, module and functional.
LAYER_NORM = ops(LAYER_NORM_OP)

#: ``f(0) = 0`` elementwise (or a pool/resize of zeros): a pruned (zero) channel stays zero.
ZERO_PRESERVING = ops(
    RELU_OP, RELU_INPLACE_OP, RELU6_OP, HARDTANH_OP, HARDSWISH_OP, SILU_OP, GELU_OP, TANH_OP,
    IDENTITY_OP, DROPOUT_OP, MAX_POOL2D_OP, AVG_POOL2D_OP, ADAPTIVE_AVG_POOL2D_OP,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softsign, nn.Tanhshrink,
    nn.Hardshrink, nn.Softshrink, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
    F.leaky_relu, F.elu, F.selu, F.mish, F.dropout2d, F.max_pool1d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, F.tanh, torch.max_pool2d,
    torch.avg_pool1d, torch.adaptive_avg_pool1d, torch.dropout, "to", "float", "type_as",
)
#: Elementwise with ``f(0) != 0``: a pruned channel would not stay zero.
NOT_ZERO_PRESERVING = ops(
    SIGMOID_OP, HARDSIGMOID_OP, nn.Softplus, nn.LogSigmoid, F.softplus, torch.exp, torch.cos,
    "exp",
)
#: Output ``>= 0`` whatever the input.
ALWAYS_NONNEG = ops(RELU_OP, RELU_INPLACE_OP, RELU6_OP, SIGMOID_OP, SOFTMAX_OP, HARDSIGMOID_OP,
                    torch.abs, torch.exp, torch.square, "abs", "exp", "square")
#: Rearranging, selecting, pooling or averaging ops: output ``>= 0`` when every tensor input is
#: (their scalar arguments are dims or sizes, not operands).
SIGN_PRESERVING = ops(
    MAX_POOL2D_OP, AVG_POOL2D_OP, ADAPTIVE_AVG_POOL2D_OP, FLATTEN_OP, IDENTITY_OP, DROPOUT_OP,
    CAT_OP, PERMUTE_OP, TRANSPOSE_OP, GETITEM_OP, VIEW_OP, RESHAPE_OP,
    nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, F.max_pool1d, F.max_pool3d, F.avg_pool1d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d, F.interpolate,
    torch.mean, torch.sum, "contiguous", "mean", "sum", "max",
)

#: Every named op, by canonical name.
OPS: dict[str, Op] = {op.name: op for op in (
    RELU_OP, RELU_INPLACE_OP, RELU6_OP, HARDTANH_OP, SIGMOID_OP, HARDSIGMOID_OP, HARDSWISH_OP,
    SILU_OP, GELU_OP, TANH_OP, SOFTMAX_OP, ADD_OP, MUL_OP, CAT_OP, FLATTEN_OP, VIEW_OP,
    RESHAPE_OP, PERMUTE_OP, TRANSPOSE_OP, SWAPAXES_OP, SQUEEZE_OP, UNSQUEEZE_OP, GETITEM_OP,
    SPLIT_OP, CHUNK_OP, UNBIND_OP, TENSOR_SPLIT_OP, IDENTITY_OP, DROPOUT_OP, MAX_POOL2D_OP,
    AVG_POOL2D_OP, ADAPTIVE_AVG_POOL2D_OP, LAYER_NORM_OP, SUB_OP, DIV_OP, DROPOUT_ND_OP,
    ALPHA_DROPOUT_OP, NARROW_OP, DETACH_OP, CLONE_OP, MATMUL_OP,
)}
_NAMES: dict[object, str] = {key: op.name for op in OPS.values() for key in op.keys()}


def op_name(key: object) -> str | None:
    """The canonical name of the op ``key`` spells (any spelling), or ``None``."""
    try:
        return _NAMES.get(op_key(key))
    except TypeError:  # unhashable target
        return None


def name_table(facts: OpSet) -> dict[object, str]:
    """``{key: canonical op name}`` for every key of ``facts`` (e.g. :data:`ELEMENTWISE_UNARY`),
    in the order of :data:`OPS` (deterministic)."""
    table = {key: op.name for op in OPS.values() for key in op.keys() if key in facts}
    unnamed = [key for key in facts if key not in table]
    if unnamed:
        raise KeyError(f"{unnamed!r} belong to no named op of djpq_compiler.op_facts.OPS")
    return table
