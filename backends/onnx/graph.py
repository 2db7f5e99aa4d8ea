"""ONNX graph builder, value kinds and the converter registry of the QDQ exporter.

A converted GraphModule is lowered node by node. Each converter is looked up by the *target
object* (the module class of a ``call_module`` node, the function of a ``call_function`` node, the
``torch.Tensor`` method of a ``call_method`` node) and has the signature
``(ctx: Emitter, node: fx.Node) -> Value``; the registry (:data:`CONVERTERS`), the context base and
the unsupported-node report are shared with every backend (``backends/lowering.py``).

Values flowing between converters:

* :class:`QValue` -- integer codes in an ONNX integer tensor (uint8/int8/uint16/int16), the output
  of a ``QuantizeLinear``; every code lies in ``[lo, hi]``; ``scale`` is the real value of one code.
* :class:`SumValue` -- unrounded codes held as a float tensor ``name`` (codes = ``name / scale``):
  the window sum of an average pool with ``divisor_override``, consumed by a ``Requantize``.
* :class:`FValue` -- a float32 tensor (graph input, float-output layer, float island).
* :class:`DimValue` -- a dynamic ``int64[1]`` size (``x.size(0)`` under a dynamic batch).
* Python ints/floats/tuples for static shape arithmetic.

The tensor carrying fx node ``n``'s result is named ``n.name`` wherever a converter produces a new
tensor, so :func:`~djpq_compiler.backends.onnx.verify` can compare intermediate values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import fx

from djpq_compiler.errors import BackendError
from djpq_compiler.registry import Registry

from .. import lowering
from ..lowering import Poison

__all__ = [
    "CONVERTERS",
    "DimValue",
    "Emitter",
    "FValue",
    "QValue",
    "SumValue",
    "Value",
    "converter_for",
    "register",
    "unsupported_nodes",
]

OPSET = 21


@dataclass(frozen=True)
class QValue:
    """Integer codes in ``[lo, hi]`` (ONNX integer tensor), real value = code * ``scale``."""

    name: str
    scale: float
    lo: int
    hi: int


@dataclass(frozen=True)
class SumValue:
    """Unrounded codes as a float tensor: codes = ``name / scale``, within ``[lo, hi]``."""

    name: str
    scale: float
    lo: int
    hi: int


@dataclass(frozen=True)
class FValue:
    """A float32 tensor."""

    name: str


@dataclass(frozen=True)
class DimValue:
    """A dynamic size as an ``int64`` tensor of shape ``[1]``."""

    name: str


Value = QValue | SumValue | FValue | DimValue | Poison | int | float | tuple | list | None
Converter = Callable[["Emitter", fx.Node], Value]

#: Every ONNX converter, keyed like every registry (module class, function, Tensor method).
CONVERTERS = Registry[Converter]("ONNX converter")
PACKAGE = "djpq_compiler.backends.onnx"

#: (ONNX element type name, lo, hi) of the activation containers, narrowest first.
CONTAINERS = (("UINT8", 0, 255), ("INT8", -128, 127), ("UINT16", 0, 65535),
              ("INT16", -32768, 32767))


def register(*targets: object) -> Callable[[Converter], Converter]:
    """Register a converter for module classes, functions or ``torch.Tensor`` methods."""
    return CONVERTERS.register(*targets)


def converter_for(gm: fx.GraphModule, node: fx.Node) -> Converter | None:
    """The converter of ``node``, or ``None`` if the exporter cannot lower it."""
    return CONVERTERS.lookup(gm, node)


def unsupported_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Every node without a converter, with the reason, in graph order."""
    return lowering.unsupported_nodes(gm, CONVERTERS, "ONNX")


def container(lo: int, hi: int) -> tuple[int, int, int]:
    """``(TensorProto type, container lo, container hi)`` of the narrowest container of
    ``[lo, hi]``."""
    from onnx import TensorProto

    for name, cmin, cmax in CONTAINERS:
        if cmin <= lo and hi <= cmax:
            return getattr(TensorProto, name), cmin, cmax
    raise BackendError(f"integer range [{lo}, {hi}] does not fit a 16-bit ONNX QDQ container "
                       "(QuantizeLinear supports at most int16/uint16)")


class Emitter(lowering.LoweringContext):
    """State of one export: ONNX nodes and initializers, node values and static shapes.

    Args:
        gm: The converted GraphModule.
        shapes: Static shape of every tensor-valued fx node (from a run on the example inputs).
    """

    INT_TYPES = (QValue, SumValue)

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]]) -> None:
        super().__init__(gm)
        self.shapes = shapes
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.layers: dict[str, dict[str, Any]] = {}
        self._names: set[str] = set()

    # ------------------------------------------------------------------ names and nodes
    def fresh(self, hint: str) -> str:
        """A tensor name not used yet, based on ``hint``."""
        name, i = hint, 0
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def const(self, array: np.ndarray, hint: str, elem_type: int | None = None) -> str:
        """Add an initializer (``elem_type`` INT4 packs two codes per byte) and return its name."""
        from onnx import TensorProto, numpy_helper

        name = self.fresh(hint)
        if elem_type == TensorProto.INT4:
            self.initializers.append(_int4_tensor(name, np.asarray(array)))
        else:
            self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def scalar(self, value: float, hint: str) -> str:
        """A float32 scalar initializer."""
        return self.const(np.array(value, dtype=np.float32), hint)

    def op(self, op_type: str, inputs: Sequence[str], hint: str, **attrs: Any) -> str:
        """Append one single-output node and return its output name."""
        from onnx import helper

        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def shape(self, node: fx.Node | Any) -> tuple[int, ...]:
        """Static shape of a tensor-valued fx node (batch included, as in the example run)."""
        if not isinstance(node, fx.Node) or node not in self.shapes:
            raise BackendError(f"no static shape recorded for {node!r}")
        return self.shapes[node]

    # ------------------------------------------------------------------ quantization helpers
    def dequantize(self, v: QValue | SumValue, scale: float, hint: str) -> str:
        """A float tensor holding ``codes(v) * scale``."""
        if isinstance(v, SumValue):
            ratio = scale / v.scale
            if abs(ratio - 1.0) <= 1e-7:
                return v.name
            return self.op("Mul", [v.name, self.scalar(ratio, f"{hint}/ratio")], hint)
        s, z = self.qparams(scale, v.lo, v.hi, hint)
        return self.op("DequantizeLinear", [v.name, s, z], hint)

    def qparams(self, scale: float, lo: int, hi: int, hint: str) -> tuple[str, str]:
        """Scale and zero-point initializers of a per-tensor Q/DQ with container of ``[lo, hi]``."""
        from onnx import helper

        elem, _, _ = container(lo, hi)
        z = self.fresh(f"{hint}/zero_point")
        self.initializers.append(helper.make_tensor(z, elem, [], [0]))
        return self.scalar(scale, f"{hint}/scale"), z

    def quantize(self, real: str, scale: float, lo: int, hi: int, out: str) -> QValue:
        """``clip(round_half_even(real / scale), lo, hi)`` as [Clip] + QuantizeLinear.

        A range narrower than its container (sub-8-bit codes, narrow int8, fused ReLU6) is
        enforced by a ``Clip`` to ``[lo*scale, hi*scale]`` on the float value before
        the ``QuantizeLinear``; the container saturation does the rest.
        """
        _, cmin, cmax = container(lo, hi)
        if (lo, hi) != (cmin, cmax):
            bounds = [self.scalar(lo * scale, f"{out}/clip_lo"),
                      self.scalar(hi * scale, f"{out}/clip_hi")]
            real = self.op("Clip", [real, *bounds], f"{out}/clip")
        s, z = self.qparams(scale, lo, hi, out)
        return QValue(self.op("QuantizeLinear", [real, s, z], out), float(scale), lo, hi)

    def int_arg(self, node: fx.Node, index: int = 0) -> QValue | SumValue:
        """The ``index``-th positional argument of ``node`` as integer codes."""
        value: QValue | SumValue = super().int_arg(node, index)
        return value

    def as_qvalue(self, value: QValue | SumValue, hint: str) -> QValue:
        """Round a :class:`SumValue` into integer codes (identity on a :class:`QValue`)."""
        if isinstance(value, QValue):
            return value
        return self.quantize(value.name, value.scale, value.lo, value.hi, hint)

    def real(self, node: fx.Node, arg: Any) -> str:
        """A float argument's tensor name (a Python number becomes a scalar initializer)."""
        value = self.value(arg)
        if isinstance(value, FValue):
            return value.name
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self.scalar(float(value), f"{node.name}/const")
        raise BackendError(f"{node.format_node()}: float op expects float tensors, got "
                           f"{type(value).__name__} (integer codes must be dequantized first)")


def _int4_tensor(name: str, codes: np.ndarray) -> Any:
    """An INT4 TensorProto with two codes per byte in ``raw_data`` (low nibble first)."""
    from onnx import TensorProto, helper

    flat = codes.astype(np.int64).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise BackendError(f"{name}: codes outside int4 range [-8, 7]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, list(codes.shape), packed.tobytes(),
                              raw=True)
