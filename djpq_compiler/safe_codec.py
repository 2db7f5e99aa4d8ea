"""Allow-lists and a tagged-JSON codec for the safe converted-model format (``serialize.py``).

Nothing here imports or calls an object by a name read from a file unless that name is in one of
the allow-lists below, which are built from fixed namespaces when this module is first used:

* **call targets** (:func:`target_table`): public tensor ops of ``torch`` (the ATen functions and
  ``torch.functional``), ``torch.nn.functional``, ``operator``, ``math``, ``builtins.getattr``,
  ``torch._assert`` and the functions of the integer reference executor
  (``djpq_compiler.ir``);
  calls that take a callable or touch files (``torch.from_file``, ``operator.call``,
  ``operator.methodcaller``, ...) are left out;
* **method names** (:func:`allowed_method`): public ``torch.Tensor`` methods, minus the ones that
  take a Python callable (``apply_``, ``register_hook``, ...);
* **module classes** (:func:`module_table`): the integer modules of ``djpq_compiler/ir`` and the
  float ``torch.nn`` layers that can remain in float islands;
* **value classes** (:func:`dataclass_table`): the frozen records a converted model carries in its
  ``meta`` and attributes (``ConvertedRecord``, its ``PreparedLayer`` rows, ``AddRescale``);
  :func:`legacy_dataclass_table` adds the records format-1 files held in their 31 meta keys
  (``DJPQConfig``, ``ChannelGroup``, ...), accepted when reading such a file only.

Values are JSON with tagged objects ``{"$": kind, ...}`` for everything JSON lacks (tuples,
non-string dict keys, non-finite floats, slices, dtypes, node references, tensors, records).
Tensors are not inlined: the encoder hands them to a sink and stores their key.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import functools
import inspect
import math
import numbers
import operator
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Json",
    "Unencodable",
    "Encoder",
    "Decoder",
    "target_table",
    "target_name",
    "allowed_method",
    "module_table",
    "module_class_name",
    "dataclass_table",
    "legacy_dataclass_table",
]

Json = Any  # a JSON-compatible value (dict / list / str / int / float / bool / None)

_DENY_TORCH = frozenset({"from_file", "load", "save"})
_DENY_OPERATOR = frozenset({"attrgetter", "itemgetter", "methodcaller", "call"})
_DENY_METHODS = frozenset({"apply_", "map_", "map2_", "register_hook", "backward",
                           "register_post_accumulate_grad_hook", "share_memory_"})
_F_MODULES = frozenset({"torch.nn.functional", "torch", "torch._C._nn"})

_FLOAT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten,
    nn.Unflatten, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Linear, nn.Bilinear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softmax,
    nn.LogSoftmax, nn.Softplus, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ChannelShuffle, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.Embedding,
    # attention left as a float island (its out_proj is a Linear subclass, listed exactly)
    nn.MultiheadAttention, nn.modules.linear.NonDynamicallyQuantizableLinear,
)


class Unencodable(Exception):
    """Internal: a value has no safe encoding (``where`` says which one); callers re-raise it as
    a :class:`~djpq_compiler.errors.DjpqError` naming the node or module."""

    def __init__(self, where: str, value: object) -> None:
        super().__init__(f"{where} holds a {type(value).__module__}.{type(value).__qualname__} "
                         f"({_short(value)}), which the safe format cannot store")
        self.where = where


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


@functools.cache
def target_table() -> Mapping[str, Callable[..., Any]]:
    """Allow-listed ``call_function`` targets by qualified name (first name of an object wins)."""
    table: dict[str, Callable[..., Any]] = {}

    def add(prefix: str, namespace: object, names: Iterable[str]) -> None:
        for name in sorted(names):
            obj = getattr(namespace, name, None)
            if not name.startswith("_") and callable(obj) and not inspect.isclass(obj):
                table.setdefault(f"{prefix}.{name}", obj)

    add("torch", torch, set(dir(torch._C._VariableFunctions)) - _DENY_TORCH)
    add("torch", torch, torch.functional.__all__)
    add("torch.nn.functional", F, [n for n in dir(F)
                                   if getattr(getattr(F, n), "__module__", None) in _F_MODULES])
    add("operator", operator, set(dir(operator)) - _DENY_OPERATOR)
    add("math", math, dir(math))
    table["builtins.getattr"] = builtins.getattr
    table["torch._assert"] = torch._assert  # shape checks (x.ndim == 4) left in a traced graph
    from djpq_compiler import ir

    names = [n for n in ir.__all__ if inspect.isfunction(getattr(ir, n))]
    add("djpq_compiler.ir", ir, names)
    add(_LEGACY_IR, ir, names)  # artifacts written before the IR moved out of backends/
    return table


@functools.cache
def _target_names() -> Mapping[int, str]:
    names: dict[int, str] = {}
    for name, obj in target_table().items():
        names.setdefault(id(obj), name)
    return names


def target_name(target: object) -> str | None:
    """The allow-list name of a ``call_function`` target, or ``None`` when it is not allowed."""
    name = _target_names().get(id(target))
    return name if name is not None and target_table()[name] is target else None


def allowed_method(name: object) -> bool:
    """Whether ``call_method`` may call this ``torch.Tensor`` method."""
    return (isinstance(name, str) and not name.startswith("_") and name not in _DENY_METHODS
            and callable(getattr(torch.Tensor, name, None)))


@functools.cache
def module_table() -> Mapping[str, type[nn.Module]]:
    """Allow-listed module classes by qualified name (``torch.nn.Conv2d``, integer modules)."""
    from djpq_compiler.ir.modules import INTEGER_MODULES

    table = {f"torch.nn.{cls.__name__}": cls for cls in _FLOAT_MODULES}
    table.update({_qualname(cls): cls for cls in INTEGER_MODULES})
    table.update({_legacy(cls): cls for cls in INTEGER_MODULES})  # read-only aliases
    return table


def module_class_name(cls: type) -> str | None:
    """The allow-list name of a module class (exact class, not subclasses), or ``None``."""
    for name, allowed in module_table().items():
        if allowed is cls:
            return name
    return None


@functools.cache
def dataclass_table() -> Mapping[str, type]:
    """Allow-listed record classes (frozen dataclasses and enums) by qualified name: what a
    converted model carries (its ``ConvertedRecord`` and the IR's attribute records)."""
    from djpq_compiler.ir.elementwise import AddRescale
    from djpq_compiler.prepared import PreparedLayer
    from djpq_compiler.records import ConvertedRecord, PlanRecord

    classes = (AddRescale, ConvertedRecord, PlanRecord, PreparedLayer)
    table = {_qualname(cls): cls for cls in classes}
    table[_legacy(AddRescale)] = AddRescale
    return table


@functools.cache
def legacy_dataclass_table() -> Mapping[str, type]:
    """:func:`dataclass_table` plus the records a format-1 file kept in its meta keys (read
    only, then dropped: ``serialize`` rebuilds a ``ConvertedRecord`` from them)."""
    from djpq_compiler.config import DJPQConfig, GateSpec, Override, QuantSpec, ResolvedLayerConfig
    from djpq_compiler.passes.dependency.groups import ChannelGroup, Member
    from djpq_compiler.passes.dependency.state import Role, Zero

    classes = (DJPQConfig, GateSpec, Override, QuantSpec, ResolvedLayerConfig, ChannelGroup,
               Member, Role, Zero)
    return {**dataclass_table(), **{_qualname(cls): cls for cls in classes}}


_LEGACY_IR = "djpq_compiler.backends.reference"


def _legacy(cls: type) -> str:
    """The name an IR class had before the IR moved from ``backends/reference`` to
    ``djpq_compiler.ir``: accepted when loading, never written (new names come first)."""
    return _qualname(cls).replace("djpq_compiler.ir", _LEGACY_IR, 1)


def _dtype_names() -> Mapping[str, object]:
    return {str(v).removeprefix("torch."): v for v in vars(torch).values()
            if isinstance(v, torch.dtype | torch.memory_format | torch.layout)}


class Encoder:
    """Value -> JSON. Tensors go to ``tensors`` (shared objects stored once); node references
    are written as ``{"$": "node", "name": ...}``."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self._tensor_keys: dict[int, str] = {}
        self._keep_alive: list[torch.Tensor] = []

    def tensor(self, value: torch.Tensor) -> str:
        """Store a tensor (once per object) and return its key in the tensor file."""
        key = self._tensor_keys.get(id(value))
        if key is None:
            key = f"t{len(self.tensors)}"
            self.tensors[key] = value.detach()
            self._tensor_keys[id(value)] = key
            self._keep_alive.append(value)
        return key

    def encode(self, value: object, where: str) -> Json:  # noqa: C901 - one flat type switch
        """Encode ``value``; raises :class:`Unencodable` naming ``where`` on anything else."""
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            number = float(value)
            return number if math.isfinite(number) else {"$": "float", "v": repr(number)}
        if isinstance(value, torch.fx.Node):
            return {"$": "node", "name": value.name}
        if isinstance(value, torch.Tensor):
            return {"$": "tensor", "key": self.tensor(value)}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return {"$": "tuple", "v": [self.encode(v, f"{where}[{i}]")
                                        for i, v in enumerate(value)]}
        if isinstance(value, dict):
            return {"$": "dict", "v": [[self.encode(k, f"{where} key"),
                                        self.encode(v, f"{where}[{k!r}]")]
                                       for k, v in value.items()]}
        if isinstance(value, slice):
            return {"$": "slice", "v": [self.encode(getattr(value, a), where)
                                        for a in ("start", "stop", "step")]}
        if value is Ellipsis:
            return {"$": "ellipsis"}
        if isinstance(value, torch.dtype | torch.memory_format | torch.layout):
            return {"$": "torch", "name": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$": "device", "name": str(value)}
        return self._record(value, where)

    def _record(self, value: object, where: str) -> Json:
        if isinstance(value, type) and module_class_name(value) is not None:
            return {"$": "class", "name": module_class_name(value)}
        name = _qualname(type(value))
        if dataclass_table().get(name) is not type(value):
            raise Unencodable(where, value)
        if isinstance(value, enum.Enum):
            return {"$": "enum", "class": name, "name": value.name}
        fields = {f.name: self.encode(getattr(value, f.name), f"{where}.{f.name}")
                  for f in dataclasses.fields(value) if f.init}  # type: ignore[arg-type]
        return {"$": "record", "class": name, "fields": fields}


class Decoder:
    """JSON -> value, the inverse of :class:`Encoder`; raises ``ValueError`` on anything that
    is not a value the encoder writes (unknown tag, class not allow-listed, missing node)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor],
                 nodes: Mapping[str, torch.fx.Node] | None = None,
                 records: Mapping[str, type] | None = None) -> None:
        self.tensors, self.nodes = tensors, nodes
        self.records = dataclass_table() if records is None else records

    def decode(self, data: Json) -> Any:  # noqa: C901 - one flat tag switch
        if data is None or isinstance(data, bool | str | int | float):
            return data
        if isinstance(data, list):
            return [self.decode(v) for v in data]
        if not isinstance(data, dict):
            raise ValueError(f"unexpected JSON value {_short(data)}")
        tag = data.get("$")
        if tag == "tuple":
            return tuple(self.decode(v) for v in data["v"])
        if tag == "dict":
            return {self.decode(k): self.decode(v) for k, v in data["v"]}
        if tag == "float":
            return float(_choice(data["v"], ("nan", "inf", "-inf")))
        if tag == "node":
            if self.nodes is None or data["name"] not in self.nodes:
                raise ValueError(f"reference to node {data['name']!r}, which is not defined "
                                 "before its use")
            return self.nodes[data["name"]]
        if tag == "tensor":
            return self.tensors[data["key"]]
        if tag == "slice":
            return slice(*(self.decode(v) for v in data["v"]))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "torch":
            return _dtype_names()[_choice(data["name"], _dtype_names())]
        if tag == "device":
            return torch.device(str(data["name"]))
        if tag == "class":
            return module_table()[_choice(data["name"], module_table())]
        return self._record(data, tag)

    def _record(self, data: dict[str, Json], tag: object) -> Any:
        if tag not in ("enum", "record"):
            raise ValueError(f"unknown value tag {tag!r}")
        cls = self.records[_choice(data["class"], self.records)]
        if tag == "enum":
            return cls[str(data["name"])]  # type: ignore[index]
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        fields = data["fields"]
        if not isinstance(fields, dict) or not set(fields) <= names:
            raise ValueError(f"fields of {data['class']} do not match its definition")
        return cls(**{k: self.decode(v) for k, v in fields.items()})


def _choice(name: object, allowed: Container[str]) -> str:
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"{_short(name)} is not in the allow-list")
    return name
