"""Save and load converted models without pickling arbitrary objects.

:func:`save_converted` stores the output of :func:`djpq_compiler.convert` as one self-contained
file; :func:`load_converted` rebuilds the ``GraphModule`` from it without the original model code.

File layout (``FORMAT_VERSION`` 2)::

    DJPQ-CONVERTED-MODEL\\n                      magic line
    {"format": ..., "version": 2, "sha256": ..., "model_bytes": N, "tensor_bytes": M, ...}\\n
    <N bytes: model JSON>                         graph, modules, meta (tagged JSON, safe_codec)
    <M bytes: tensor file>                        torch.save of {key: tensor}, read weights_only

The model JSON holds the fx graph (each node's op, name, target and args/kwargs with node
references), every submodule as an allow-listed class (integer modules of ``djpq_compiler/ir``,
float ``torch.nn`` layers) with its configuration (its plain attributes) and the keys of its
parameters and buffers, and ``gm.meta``: the model's one
:class:`~djpq_compiler.records.ConvertedRecord` (allow-listed with its ``PreparedLayer`` rows)
and any user entries that encode safely. Version 1 files kept the record as ~20 ``"djpq.*"``
keys; they still load: their keys are read with the records of that time allow-listed and turned
into a ``ConvertedRecord`` (:func:`_record_from_v1`).
``call_function`` / ``call_method`` targets must be in the allow-lists of
:mod:`djpq_compiler.safe_codec`: saving refuses anything else, naming the node, and loading checks
again, so a crafted file cannot make the loader import or call anything else. The SHA-256 covers
both payload parts, so truncation and tampering are reported before anything is decoded; writes go
through :func:`~djpq_compiler.artifacts.atomic_write`, so an interrupted save leaves no file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import reduce_graph_module

from djpq_compiler.artifacts import atomic_write
from djpq_compiler.errors import ArtifactError, ConfigError, UnsupportedOpError
from djpq_compiler.records import ConvertedRecord, stage, store
from djpq_compiler.safe_codec import (
    Decoder,
    Encoder,
    Json,
    Unencodable,
    allowed_method,
    legacy_dataclass_table,
    module_class_name,
    module_table,
    target_name,
    target_table,
)

__all__ = ["save_converted", "load_converted", "ConvertedGraphModule", "as_converted", "FORMAT",
           "FORMAT_VERSION", "MAGIC"]

FORMAT = "djpq-converted-model"
FORMAT_VERSION = 2
#: Versions :func:`load_converted` reads (1: the record as separate ``"djpq.*"`` meta keys).
READABLE_VERSIONS = (1, 2)
#: ``meta`` key listing the entries ``save_converted`` could not store.
META_NOT_SAVED = "djpq.meta_not_saved"
MAGIC = b"DJPQ-CONVERTED-MODEL\n"
_HEADER_LIMIT = 4096
_BASE_ATTRS = frozenset(nn.Module().__dict__)
_HOOKS = tuple(sorted(a for a in _BASE_ATTRS if "hook" in a and a != "_is_full_backward_hook"))
_TYPES: dict[str, type] = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool,
                          "str": str}
_WHAT_TO_DO = ("replace it with an allow-listed op or layer (see djpq_compiler.safe_codec), or "
               "reload through prepare() + load_state_dict(weights_only=True) + convert()")


class ConvertedGraphModule(fx.GraphModule):
    """The class of ``convert()``'s output: a ``GraphModule`` whose pickle (``torch.save`` of the
    whole model, loaded with ``torch.load(weights_only=False)``) keeps ``meta`` (plain
    ``GraphModule`` pickles drop it) and this class. The safe format of :func:`save_converted`
    does not pickle; prefer it for files from others."""

    def __reduce__(self) -> tuple[Any, ...]:
        _, args = super().__reduce__()  # (reduce_graph_module, (body, import_block))
        return (_unpickle_converted, args)


def _unpickle_converted(body: dict[str, Any], import_block: str) -> ConvertedGraphModule:
    gm = reduce_graph_module(body, import_block)
    if not isinstance(gm, fx.GraphModule):  # pragma: no cover - torch always rebuilds one
        raise ArtifactError(f"unpickling a converted model gave a {type(gm).__name__}")
    meta = body.get("meta")
    gm.meta = dict(meta) if isinstance(meta, dict) else {}
    return as_converted(gm)


def as_converted(gm: fx.GraphModule) -> ConvertedGraphModule:
    """``gm`` as a :class:`ConvertedGraphModule`: the same module tree, graph, ``meta`` and mode
    (its state moves over; do not use ``gm`` afterwards); ``gm`` itself when it already is one."""
    if isinstance(gm, ConvertedGraphModule):
        return gm
    out = ConvertedGraphModule.__new__(ConvertedGraphModule)  # its own per-instance class
    type(out).__name__ = type(gm).__name__  # e.g. "ConvertedModel", as GraphModule names it
    out.__dict__.update(gm.__dict__)
    out.graph = gm.graph  # the graph's owner becomes ``out``; recompiles its forward
    return out


def save_converted(converted: fx.GraphModule, path: str | os.PathLike[str]) -> Path:
    """Write a converted model to ``path`` atomically in the safe format; returns the path.

    Raises:
        ConfigError: ``converted`` is not the output of ``convert()``.
        UnsupportedOpError: a node's target, a module class or a value is not in the allow-lists
            (the message names the node or module); nothing is written then.
    """
    if not isinstance(converted, fx.GraphModule) or stage(converted) != "converted":
        raise ConfigError(f"save_converted() stores the output of djpq.convert(); got "
                          f"{type(converted).__name__} with stage {stage(converted)!r}")
    if type(converted.graph._codegen) is not fx.graph.CodeGen:
        raise UnsupportedOpError(f"the graph uses {type(converted.graph._codegen).__name__}, a "
                                 "custom code generator the safe format cannot store")
    tensors: dict[str, torch.Tensor] = {}
    enc = Encoder(tensors)
    model = {"class_name": type(converted).__name__, "graph": _encode_graph(converted, enc),
             "modules": _encode_modules(converted, enc), "meta": _encode_meta(converted, enc)}
    model_bytes = json.dumps(model, allow_nan=False, separators=(",", ":")).encode()
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return atomic_write(path, _pack(model_bytes, buffer.getvalue()))


def load_converted(path: str | os.PathLike[str],
                   map_location: str | torch.device | None = None) -> fx.GraphModule:
    """Rebuild a converted model saved by :func:`save_converted` (no pickle, no model code).

    Args:
        path: The file written by :func:`save_converted`.
        map_location: Where tensors are loaded (as in ``torch.load``); default: where they were.

    Raises:
        ArtifactError: the file is missing, not in this format, of another format version,
            truncated, tampered (SHA-256 mismatch), or names a target, class or value outside
            the allow-lists.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read converted model {path}: {exc}") from exc
    model_bytes, tensor_bytes, version = _unpack(data, path)
    try:
        tensors = torch.load(io.BytesIO(tensor_bytes), map_location=map_location,
                             weights_only=True)
        if not isinstance(tensors, dict) or \
                not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError("the tensor file does not hold a {key: tensor} dict")
        return _decode_model(json.loads(model_bytes), tensors, version)
    except ArtifactError as exc:
        raise ArtifactError(f"converted model {path}: {exc}") from exc
    except Exception as exc:  # malformed content of a file whose hash matched: crafted
        raise ArtifactError(f"converted model {path} is malformed ({type(exc).__name__}: {exc});"
                            " re-save it with djpq.save_converted()") from exc


# --------------------------------------------------------------------------- container
def _pack(model_bytes: bytes, tensor_bytes: bytes) -> bytes:
    from djpq_compiler import __version__

    header = {"format": FORMAT, "version": FORMAT_VERSION, "model_bytes": len(model_bytes),
              "tensor_bytes": len(tensor_bytes), "torch": torch.__version__,
              "djpq_compiler": __version__,
              "sha256": hashlib.sha256(model_bytes + tensor_bytes).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + model_bytes \
        + tensor_bytes


def _unpack(data: bytes, path: object) -> tuple[bytes, bytes, int]:
    """Split and verify a file: magic, header, format version, length, SHA-256; returns the
    model bytes, the tensor bytes and the format version."""
    if not data.startswith(MAGIC):
        raise ArtifactError(f"{path} is not a djpq converted-model file (it does not start with "
                            f"{MAGIC!r}); write one with djpq.save_converted(converted, path)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _HEADER_LIMIT)
    try:
        header = json.loads(data[len(MAGIC):end]) if end >= 0 else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"converted model {path} has a corrupt header (truncated or "
                            "tampered); re-save it with djpq.save_converted()")
    version = header.get("version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"converted model {path} has format version {version!r}, but this "
            f"djpq-compiler reads version {FORMAT_VERSION} (and older: {READABLE_VERSIONS}); load"
            f" it with the djpq-compiler that wrote it ({header.get('djpq_compiler')!r}) or "
            "re-save it from the model")
    body = data[end + 1:]
    try:
        n_model, n_tensor, digest = (int(header["model_bytes"]), int(header["tensor_bytes"]),
                                     str(header["sha256"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"converted model {path} has a corrupt header ({exc!r})") from exc
    if len(body) != n_model + n_tensor:
        state = "truncated" if len(body) < n_model + n_tensor else "longer than recorded"
        raise ArtifactError(f"converted model {path} is {state}: the header records "
                            f"{n_model + n_tensor} payload bytes, the file holds {len(body)}; "
                            "re-save it (an interrupted copy or download?)")
    if hashlib.sha256(body).hexdigest() != digest:
        raise ArtifactError(f"converted model {path} does not match its SHA-256 (the file was "
                            "modified or corrupted after saving); re-save it from the model")
    return body[:n_model], body[n_model:], int(version)


# --------------------------------------------------------------------------- encode
def _encode_graph(gm: fx.GraphModule, enc: Encoder) -> list[Json]:
    nodes = []
    for node in gm.graph.nodes:
        target: Json = node.target
        if node.op == "call_function":
            target = target_name(node.target)
        elif node.op == "call_module":
            cls = type(gm.get_submodule(str(node.target)))
            if module_class_name(cls) is None:
                raise UnsupportedOpError(
                    f"cannot save node {node.format_node()}: module class "
                    f"{cls.__module__}.{cls.__qualname__} is not in the safe-format allow-list; "
                    + _WHAT_TO_DO)
        try:
            args = enc.encode(node.args, f"node {node.name} args")
            kwargs = enc.encode(node.kwargs, f"node {node.name} kwargs")
            _check_call(node.op, target, node.args)
        except (Unencodable, ValueError) as exc:
            raise UnsupportedOpError(f"cannot save node {node.format_node()}: {exc}; "
                                     + _WHAT_TO_DO) from exc
        nodes.append({"op": node.op, "name": node.name, "target": target, "args": args,
                      "kwargs": kwargs, "type": _encode_type(node.type)})
    return nodes


def _encode_type(annotation: object) -> Json:
    """A node's type annotation when it is a plain one (``torch.Tensor``, ``int``... as a class or
    as the string a ``from __future__ import annotations`` module gives), else ``None``."""
    if isinstance(annotation, str):
        return {"name": annotation, "string": True} if annotation in _TYPES else None
    name = next((k for k, t in _TYPES.items() if annotation is t), None)
    return None if name is None else {"name": name, "string": False}


def _decode_type(data: Json) -> object:
    if data is None:
        return None
    name = _allowed(data["name"], _TYPES, "type annotation")
    return name if data["string"] else _TYPES[name]


def _check_call(op: str, target: object, args: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless the call is allow-listed (shared by save and load)."""
    if op == "call_function":
        if not isinstance(target, str) or target not in target_table():
            raise ValueError(f"call target {target!r} is not in the allow-list (torch tensor "
                             "ops, torch.nn.functional, operator, math, getattr, djpq reference"
                             " ops)")
        if target == "builtins.getattr" and (len(args) != 2 or not isinstance(args[1], str)
                                             or args[1].startswith("_")):
            raise ValueError("getattr is allowed only for public attribute names")
    elif op == "call_method" and not allowed_method(target):
        raise ValueError(f"method {target!r} is not an allow-listed torch.Tensor method")
    elif op not in ("call_function", "call_method") and not isinstance(target, str):
        raise ValueError(f"{op} target {target!r} is not a string")


def _encode_modules(gm: fx.GraphModule, enc: Encoder) -> list[Json]:
    """The modules the graph uses (``call_module`` targets and ``get_attr`` owners, with their
    subtrees and ancestors), in pre-order; a module reached twice is stored as an alias. Modules
    the graph never reaches (e.g. leftover quantizers of a float convert) are not saved."""
    used = {str(n.target) if n.op == "call_module" else str(n.target).rpartition(".")[0]
            for n in gm.graph.nodes if n.op in ("call_module", "get_attr")} - {""}
    entries: list[Json] = []
    seen: dict[int, str] = {}

    def walk(path: str, module: nn.Module, inside: bool) -> None:
        inside = inside or path in used
        if not inside and path and not any(u.startswith(path + ".") for u in used):
            return
        if id(module) in seen:
            entries.append({"path": path, "alias": seen[id(module)]})
            return
        seen[id(module)] = path
        entries.append(_encode_module(path, module, enc))
        for name, child in module._modules.items():
            if child is not None:
                walk(f"{path}.{name}" if path else name, child, inside)

    walk("", gm, False)
    return entries


def _encode_module(path: str, module: nn.Module, enc: Encoder) -> Json:
    where = f"module '{path}'" if path else "the root module"
    cls_name = "root" if not path else module_class_name(type(module))
    if cls_name is None:
        cls = type(module)
        raise UnsupportedOpError(f"cannot save {where}: class {cls.__module__}.{cls.__qualname__}"
                                 " is not in the safe-format allow-list; " + _WHAT_TO_DO)
    if any(getattr(module, hook, None) for hook in _HOOKS):
        raise UnsupportedOpError(f"cannot save {where}: it has hooks registered (Python "
                                 "callables); remove them before saving")
    items = module.__dict__.items()
    attrs = {k: v for k, v in items if k not in _BASE_ATTRS
             and (path or isinstance(v, torch.Tensor))}  # root: GraphModule internals skipped
    try:
        encoded = {k: enc.encode(v, f"{where} attribute {k!r}") for k, v in attrs.items()}
    except Unencodable as exc:
        raise UnsupportedOpError(f"cannot save {where}: {exc}; " + _WHAT_TO_DO) from exc
    return {
        "path": path, "class": cls_name, "training": module.training, "attrs": encoded,
        "params": {n: None if p is None else {"key": enc.tensor(p), "grad": p.requires_grad}
                   for n, p in module._parameters.items()},
        "buffers": {n: None if b is None else enc.tensor(b) for n, b in module._buffers.items()},
        "non_persistent": sorted(module._non_persistent_buffers_set),
    }


def _encode_meta(gm: fx.GraphModule, enc: Encoder) -> Json:
    """``gm.meta`` entries; one that cannot be stored safely is left out with a warning and
    listed under ``djpq.meta_not_saved`` in the loaded model."""
    out: dict[str, Json] = {}
    dropped = []
    for key, value in gm.meta.items():
        try:
            if not isinstance(key, str):
                raise Unencodable("meta key", key)
            out[key] = enc.encode(value, f"meta[{key!r}]")
        except Unencodable as exc:
            dropped.append(str(key))
            warnings.warn(f"save_converted: {exc}; it is left out", stacklevel=3)
    if dropped:
        out[META_NOT_SAVED] = enc.encode(tuple(dropped), "meta")
    return out


# --------------------------------------------------------------------------- decode
def _decode_model(doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  version: int = FORMAT_VERSION) -> fx.GraphModule:
    class_name = str(doc["class_name"])
    if not class_name.isidentifier():
        raise ValueError(f"class name {class_name!r} is not an identifier")
    root = _decode_modules(doc["modules"], Decoder(tensors))
    graph = _decode_graph(doc["graph"], tensors)
    gm = ConvertedGraphModule(root, graph, class_name)
    # GraphModule copies only referenced attributes: restore the saved tree exactly.
    for slot in ("_modules", "_parameters", "_buffers"):
        getattr(gm, slot).clear()
        getattr(gm, slot).update(getattr(root, slot))
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    for key, value in root.__dict__.items():
        if isinstance(value, torch.Tensor):
            setattr(gm, key, value)
    gm.training = root.training
    records = legacy_dataclass_table() if version == 1 else None
    meta = Decoder(tensors, records=records).decode(
        {"$": "dict", "v": [[k, v] for k, v in doc["meta"].items()]})
    if version == 1:
        meta, record = _meta_from_v1(meta)
        gm.meta = meta
        store(gm, record)
    else:
        gm.meta = meta
    if stage(gm) != "converted":
        raise ArtifactError("the file carries no ConvertedRecord in its meta; re-save it with "
                            "djpq.save_converted() from the converted model")
    return gm


#: Version-1 meta keys that became :class:`ConvertedRecord` fields (key -> field).
_V1_FIELDS = {"djpq.integer": "integer", "djpq.layers": "layers", "djpq.keep": "keep",
              "djpq.float_ops": "float_ops", "djpq.lut_ops": "lut_ops",
              "djpq.lowered_layers": "lowered_layers",
              "djpq.agreement_bounds": "agreement_bounds", "djpq.quant_map": "quant_map",
              "djpq.source_class": "source_class", "djpq.source_params": "source_params"}


def _meta_from_v1(meta: dict[str, Any]) -> tuple[dict[str, Any], ConvertedRecord]:
    """A version-1 meta (one ``"djpq.*"`` key per fact) as today's: the user entries and one
    ``ConvertedRecord``; facts no consumer reads any more (groups, config, quantizer paths,
    ...) are dropped."""
    if meta.get("djpq.stage") != "converted":
        raise ArtifactError("this version-1 file does not record a converted model "
                            "(meta['djpq.stage']); re-save it with djpq.save_converted()")
    fields = {f: meta[k] for k, f in _V1_FIELDS.items() if k in meta}
    fields["integer"] = bool(fields.get("integer", True))
    for name in ("layers", "float_ops", "lut_ops"):
        if name in fields:
            fields[name] = tuple(fields[name])
    rest = {k: v for k, v in meta.items() if not k.startswith("djpq.") or k == META_NOT_SAVED}
    return rest, ConvertedRecord(**fields)


def _decode_modules(entries: list[Json], dec: Decoder) -> nn.Module:
    modules: dict[str, nn.Module] = {}
    params: dict[str, nn.Parameter] = {}  # tied parameters stay tied
    for entry in entries:
        path = str(entry["path"])
        module = modules[str(entry["alias"])] if "alias" in entry else \
            _decode_module(entry, dec, params)
        if path:
            parent, _, name = path.rpartition(".")
            if not name or "." in name or hasattr(type(modules[parent]), name):
                # nn.Module.add_module accepts any other name (block1-0, 0, ...)
                raise ValueError(f"module name {name!r} is invalid")
            modules[parent]._modules[name] = module
        elif "alias" in entry or entry["class"] != "root":
            raise ValueError("the first module entry must be the root")
        modules[path] = module
    return modules[""]


def _decode_module(entry: Mapping[str, Any], dec: Decoder,
                   params: dict[str, nn.Parameter]) -> nn.Module:
    cls: type[nn.Module] = nn.Module if entry["class"] == "root" else \
        module_table()[_allowed(entry["class"], module_table(), "module class")]
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in entry["attrs"].items():
        if not key.isidentifier() or key in _BASE_ATTRS or key.startswith("__") \
                or callable(getattr(cls, key, None)):
            raise ValueError(f"attribute {key!r} of a {entry['class']} is not allowed")
        module.__dict__[key] = dec.decode(value)
    module.training = bool(entry["training"])
    for name, spec in entry["params"].items():
        if spec is not None and spec["key"] not in params:
            params[spec["key"]] = nn.Parameter(dec.tensors[spec["key"]],
                                               requires_grad=bool(spec["grad"]))
        module._parameters[name] = None if spec is None else params[spec["key"]]
    for name, key in entry["buffers"].items():
        module._buffers[name] = None if key is None else dec.tensors[key]
    module._non_persistent_buffers_set = set(entry["non_persistent"]) & set(module._buffers)
    return module


def _decode_graph(entries: list[Json], tensors: Mapping[str, torch.Tensor]) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    dec = Decoder(tensors, nodes)
    for entry in entries:
        op, name, target = str(entry["op"]), str(entry["name"]), entry["target"]
        args, kwargs = dec.decode(entry["args"]), dec.decode(entry["kwargs"])
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ValueError(f"node {name}: args must be a tuple and kwargs a dict")
        try:
            _check_call(op, target, args)
        except ValueError as exc:
            raise ArtifactError(f"node {name!r} ({op}) is refused: {exc}; only files whose "
                                "calls are all allow-listed can be loaded") from exc
        resolved = target_table()[target] if op == "call_function" else target
        node = graph.create_node(op, resolved, args, kwargs, name=name,
                                 type_expr=_decode_type(entry.get("type")))
        if node.name != name or name in nodes:
            raise ValueError(f"node name {name!r} is invalid or repeated")
        nodes[name] = node
    graph.lint()
    return graph


def _allowed(name: object, table: Mapping[str, object], what: str) -> str:
    if not isinstance(name, str) or name not in table:
        raise ArtifactError(f"{what} {name!r} is not in the safe-format allow-list")
    return name
