"""Safe converted-model files: bit-identical round trips, allow-lists on save and load, integrity.

``djpq.save_converted`` / ``djpq.load_converted`` (``djpq_compiler/serialize.py``) must rebuild a
converted model without the original model code and without unpickling anything but tensors.
"""

from __future__ import annotations

import hashlib
import json
import operator
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as T
import torch
import torch.fx as fx
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.convert import convert
from djpq_compiler.errors import ArtifactError, ConfigError, UnsupportedOpError
from djpq_compiler.prepared import gates
from djpq_compiler.records import converted_record
from djpq_compiler.serialize import FORMAT_VERSION, MAGIC, load_converted, save_converted
from djpq_compiler.size import model_size
from djpq_compiler.workflows import zoo

TINY = {
    "Residual": (T.Residual, (2, 3, 8, 8)),
    "InvertedResidual": (T.InvertedResidual, (2, 3, 8, 8)),
    "Concat": (T.Concat, (2, 3, 8, 8)),
    "Split": (T.Split, (2, 3, 8, 8)),
    "SqueezeExcite": (T.SqueezeExcite, (2, 3, 8, 8)),
    "FlattenLinear": (T.FlattenLinear, (2, 1, 6, 6)),
    "Shuffle": (T.Shuffle, (2, 3, 8, 8)),
    "Unknown": (T.Unknown, (2, 3, 8, 8)),
    "Decoder": (T.Decoder, (2, 3, 8, 8)),
}
ZOO = ("resnet20", "mobilenetv2", "vgg7", "inception")


def _prepared(model: nn.Module, x: torch.Tensor, seed: int = 0) -> fx.GraphModule:
    """A prepared model whose gates prune ~30-70 % of every group (mu[0] stays open)."""
    torch.manual_seed(seed)
    p = djpq.prepare(model.eval(), x)
    gen = torch.Generator().manual_seed(seed)
    for _, gate in gates(p):
        with torch.no_grad():
            frac = float(torch.empty(()).uniform_(0.3, 0.7, generator=gen))
            gate.mu[torch.rand(gate.mu.shape, generator=gen) < frac] = 1e-3
            gate.mu[0] = 1.0
    return p.eval()


def _round_trip(converted: fx.GraphModule, x: torch.Tensor, path: Path,
                replay: bool = True) -> fx.GraphModule:
    """Save, load and check the loaded model computes and describes exactly the same thing
    (``replay``: also run the loaded graph through ``fx.Interpreter``)."""
    save_converted(converted, path)
    loaded = load_converted(path)
    with torch.no_grad():
        want, got = converted(x), loaded(x)
        if replay:
            assert torch.equal(fx.Interpreter(loaded).run(x), want)
    assert want.dtype == got.dtype and torch.equal(want, got)
    loaded.graph.lint()
    assert loaded.code == converted.code
    assert not loaded.training
    assert repr(loaded.meta) == repr(converted.meta)
    assert djpq.bops(loaded) == djpq.bops(converted)
    want_state, got_state = converted.state_dict(), loaded.state_dict()
    assert set(got_state) <= set(want_state)
    for key, value in got_state.items():
        assert value.dtype == want_state[key].dtype and torch.equal(value, want_state[key]), key
    used = {str(n.target) for n in converted.graph.nodes if n.op == "call_module"}
    assert used <= {name for name, _ in loaded.named_modules(remove_duplicate=False)}
    return loaded


@pytest.mark.parametrize("integer", [True, False], ids=["integer", "float"])
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_round_trip_is_bit_identical(name: str, integer: bool, tmp_path: Path) -> None:
    factory, shape = TINY[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    p = _prepared(factory(), x)
    _round_trip(convert(p, integer=integer), x, tmp_path / "model.djpq")


@pytest.mark.parametrize("integer", [True, False], ids=["integer", "float"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_round_trip_is_bit_identical(name: str, integer: bool, tmp_path: Path) -> None:
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    converted = convert(_prepared(zoo.get_model(name), x), integer=integer)
    slow = name == "mobilenetv2" and integer  # ~8 s per run of its integer reference
    loaded = _round_trip(converted, x, tmp_path / f"{name}.djpq", replay=not slow)
    if integer:
        assert converted_record(loaded).float_ops == converted_record(converted).float_ops
        assert converted_record(loaded).lowered_layers == converted_record(converted).lowered_layers
        assert model_size(loaded) == model_size(converted)


@pytest.mark.slow
def test_torchvision_resnet18_round_trip(tmp_path: Path) -> None:
    tv = pytest.importorskip("torchvision")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    converted = convert(_prepared(tv.models.resnet18(weights=None), x))
    _round_trip(converted, x, tmp_path / "resnet18.djpq")


def test_loaded_model_exports_the_same_onnx_file(tmp_path: Path) -> None:
    """Backends read the loaded model's modules and meta exactly as the original's."""
    pytest.importorskip("onnx")
    from djpq_compiler.backends.onnx import export

    x = torch.randn(2, 3, 8, 8)
    converted = convert(_prepared(T.Concat(), x))
    loaded = load_converted(save_converted(converted, tmp_path / "m.djpq"))
    want = export(converted, tmp_path / "want.onnx", (x,)).read_bytes()
    assert export(loaded, tmp_path / "got.onnx", (x,)).read_bytes() == want


def test_resaving_a_loaded_model_gives_the_same_bytes(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    converted = convert(_prepared(T.Residual(), x))
    first = save_converted(converted, tmp_path / "a.djpq")
    second = save_converted(load_converted(first), tmp_path / "b.djpq")
    assert first.read_bytes() == second.read_bytes()


def test_tied_and_shared_modules_stay_shared(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    converted = convert(_prepared(T.Residual(), x), integer=False)
    shared = nn.ReLU()
    converted.add_submodule("act_a", shared)
    converted.add_submodule("act_b", shared)
    out = next(n for n in converted.graph.nodes if n.op == "output")
    with converted.graph.inserting_before(out):
        a = converted.graph.call_module("act_a", (out.args[0],))
        b = converted.graph.call_module("act_b", (a,))
    out.args = (b,)
    converted.recompile()
    loaded = _round_trip(converted, x, tmp_path / "shared.djpq")
    assert loaded.act_a is loaded.act_b


def test_loaded_model_needs_no_model_code(tmp_path: Path) -> None:
    """A fresh interpreter that cannot import the model's module loads and runs the file."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    converted = convert(_prepared(T.Residual(), x))
    path = save_converted(converted, tmp_path / "m.djpq")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(converted(x), tmp_path / "want.pt")
    script = (
        "import sys, torch; sys.modules['tiny_models'] = None\n"
        "import djpq_compiler as djpq\n"
        "m = djpq.load_converted('m.djpq')\n"
        "x = torch.load('x.pt', weights_only=True)\n"
        "assert torch.equal(m(x), torch.load('want.pt', weights_only=True))\n"
        "assert 'tiny_models' not in sys.modules or sys.modules['tiny_models'] is None\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert path.read_bytes().startswith(MAGIC)


# --------------------------------------------------------------------------- refused on save
def _custom_op(t: torch.Tensor) -> torch.Tensor:
    return t * 2


class _MyReLU(nn.ReLU):
    """A subclass of an allow-listed class is not allow-listed (its forward may differ)."""


def _with_extra_node(converted: fx.GraphModule, kind: str) -> fx.GraphModule:
    out = next(n for n in converted.graph.nodes if n.op == "output")
    with converted.graph.inserting_before(out):
        if kind == "function":
            node = converted.graph.call_function(_custom_op, (out.args[0],))
        else:
            converted.add_submodule("mine", _MyReLU())
            node = converted.graph.call_module("mine", (out.args[0],))
    out.args = (node,)
    converted.recompile()
    return converted


@pytest.mark.parametrize("kind,names", [
    ("function", ["%_custom_op", "test_serialize._custom_op", "not in the allow-list"]),
    ("module", ["%mine", "test_serialize._MyReLU", "not in the safe-format allow-list"]),
])
def test_save_refuses_targets_outside_the_allow_list(kind: str, names: list[str],
                                                     tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    converted = _with_extra_node(convert(_prepared(T.Residual(), x), integer=False), kind)
    path = tmp_path / "m.djpq"
    path.write_bytes(b"previous file")
    with pytest.raises(UnsupportedOpError) as info:
        save_converted(converted, path)
    for name in names:
        assert name in str(info.value)
    assert "load_state_dict(weights_only=True)" in str(info.value)  # what to do instead
    assert path.read_bytes() == b"previous file"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.djpq"]  # no temp file left


def test_save_refuses_a_model_that_is_not_converted(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="output of djpq.convert.*stage 'prepared'"):
        save_converted(_prepared(T.Residual(), x), tmp_path / "m.djpq")
    assert not (tmp_path / "m.djpq").exists()


def test_meta_that_cannot_be_stored_is_dropped_with_a_warning(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    converted = convert(_prepared(T.Residual(), x))
    converted.meta["user.callback"] = print
    with pytest.warns(UserWarning, match=r"meta\['user.callback'\].*builtin_function"):
        path = save_converted(converted, tmp_path / "m.djpq")
    loaded = load_converted(path)
    assert "user.callback" not in loaded.meta
    assert loaded.meta["djpq.meta_not_saved"] == ("user.callback",)


# --------------------------------------------------------------------------- refused on load
def _saved(tmp_path: Path) -> Path:
    x = torch.randn(2, 3, 8, 8)
    return save_converted(convert(_prepared(T.Residual(), x)), tmp_path / "m.djpq")


def _split(path: Path) -> tuple[dict, dict, bytes]:
    data = path.read_bytes()[len(MAGIC):]
    head, _, body = data.partition(b"\n")
    header = json.loads(head)
    model = json.loads(body[:header["model_bytes"]])
    return header, model, body[header["model_bytes"]:]


def _rewrite(path: Path, header: dict, model: dict, tensors: bytes) -> None:
    """Write a crafted file whose SHA-256 matches (a hash is not a signature)."""
    body = json.dumps(model).encode()
    header = {**header, "model_bytes": len(body), "tensor_bytes": len(tensors),
              "sha256": hashlib.sha256(body + tensors).hexdigest()}
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + body + tensors)


def test_truncated_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"m\.djpq is truncated: .* payload bytes.*re-save"):
        load_converted(path)
    path.write_bytes(path.read_bytes()[:30])  # cut inside the header
    with pytest.raises(ArtifactError, match="corrupt header"):
        load_converted(path)


def test_flipped_byte(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    for offset in (len(data) - 1, len(data) // 2):
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(ArtifactError, match="does not match its SHA-256.*re-save"):
            load_converted(path)


def test_version_1_files_with_one_meta_key_per_fact_still_load(tmp_path: Path) -> None:
    """Format 1 kept the converted record as ~20 ``"djpq.*"`` meta keys (and records such as
    ``DJPQConfig`` the format no longer allows): such a file loads, its facts become one
    ``ConvertedRecord``, the keys no consumer reads are dropped."""
    x = torch.randn(2, 3, 8, 8)
    converted = convert(_prepared(T.Residual(), x))
    path = save_converted(converted, tmp_path / "m.djpq")
    header, model, tensors = _split(path)
    assert header["version"] == FORMAT_VERSION == 2 and set(model["meta"]) == {"djpq.converted"}
    fields = model["meta"]["djpq.converted"]["fields"]
    model["meta"] = {f"djpq.{k}": v for k, v in fields.items()} | {
        "djpq.stage": "converted", "user.note": "kept",
        "djpq.config": {"$": "record", "class": "djpq_compiler.config.DJPQConfig", "fields": {}},
        "djpq.gates": {"$": "dict", "v": [[0, "djpq_gates.g0"]]}}
    _rewrite(path, {**header, "version": 1}, model, tensors)
    loaded = load_converted(path)
    assert converted_record(loaded) == converted_record(converted)
    assert set(loaded.meta) == {"djpq.converted", "user.note"}
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


def test_version_1_file_without_a_stage_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    header, model, tensors = _split(path)
    model["meta"] = {"djpq.float_ops": {"$": "tuple", "v": []}}
    _rewrite(path, {**header, "version": 1}, model, tensors)
    with pytest.raises(ArtifactError, match="does not record a converted model.*re-save"):
        load_converted(path)


def test_a_file_without_a_converted_record_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    header, model, tensors = _split(path)
    model["meta"] = {}
    _rewrite(path, header, model, tensors)
    with pytest.raises(ArtifactError, match="no ConvertedRecord.*re-save"):
        load_converted(path)


def test_wrong_format_version(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    header, model, tensors = _split(path)
    _rewrite(path, {**header, "version": FORMAT_VERSION + 1}, model, tensors)
    with pytest.raises(ArtifactError, match=rf"format version {FORMAT_VERSION + 1}.*reads "
                                            rf"version {FORMAT_VERSION}"):
        load_converted(path)


def test_not_a_converted_model_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ArtifactError, match="is not a djpq converted-model file.*save_converted"):
        load_converted(path)
    with pytest.raises(ArtifactError, match="cannot read converted model .*missing.djpq"):
        load_converted(tmp_path / "missing.djpq")


@pytest.mark.parametrize("edit,names", [
    (lambda n: n.update(op="call_function", target="os.system"),
     ["'os.system' is not in the allow-list"]),
    (lambda n: n.update(op="call_method", target="apply_"),
     ["method 'apply_' is not an allow-listed"]),
    (lambda n: n.update(op="call_function", target="builtins.getattr",
                        args={"$": "tuple", "v": [{"$": "node", "name": "x"}, "__class__"]}),
     ["getattr is allowed only for public attribute names"]),
])
def test_crafted_file_with_a_call_outside_the_allow_list(edit: object, names: list[str],
                                                         tmp_path: Path) -> None:
    path = _saved(tmp_path)
    header, model, tensors = _split(path)
    node = next(n for n in model["graph"] if n["op"] == "call_module")
    edit(node)  # type: ignore[operator]
    _rewrite(path, header, model, tensors)
    with pytest.raises(ArtifactError) as info:
        load_converted(path)
    assert f"node {node['name']!r}" in str(info.value) and "is refused" in str(info.value)
    for name in names:
        assert name in str(info.value)


def test_crafted_file_with_a_class_outside_the_allow_list(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    header, model, tensors = _split(path)
    entry = next(m for m in model["modules"] if m.get("class", "root") != "root")
    entry["class"] = "subprocess.Popen"
    _rewrite(path, header, model, tensors)
    with pytest.raises(ArtifactError, match="module class 'subprocess.Popen' is not in the "
                                            "safe-format allow-list"):
        load_converted(path)
    entry["class"] = "torch.nn.ReLU"
    entry["attrs"]["forward"] = "x"  # shadowing a method is refused too
    _rewrite(path, header, model, tensors)
    with pytest.raises(ArtifactError, match="attribute 'forward' of a torch.nn.ReLU is not "
                                            "allowed"):
        load_converted(path)


def test_operator_allow_list_is_by_identity() -> None:
    from djpq_compiler.safe_codec import target_name, target_table

    assert target_name(operator.add) == "operator.add"
    assert target_name(torch.flatten) == "torch.flatten"
    assert target_name(_custom_op) is None
    assert "operator.methodcaller" not in target_table()
    assert "torch.from_file" not in target_table()


def test_artifacts_written_before_the_ir_moved_still_load(tmp_path: Path) -> None:
    """The integer IR moved from ``backends/reference`` to ``djpq_compiler.ir``: class and function
    names written under the old path are accepted on load (and never written any more)."""
    from djpq_compiler.serialize import _pack, _unpack

    factory, shape = TINY["Residual"]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    converted = convert(_prepared(factory(), x), integer=True)
    path = save_converted(converted, tmp_path / "new.djpq")
    model_bytes, tensor_bytes, _ = _unpack(path.read_bytes(), path)
    assert b"djpq_compiler.ir." in model_bytes and b"backends.reference" not in model_bytes
    old = model_bytes.replace(b"djpq_compiler.ir.", b"djpq_compiler.backends.reference.")
    (tmp_path / "old.djpq").write_bytes(_pack(old, tensor_bytes))
    loaded = load_converted(tmp_path / "old.djpq")
    assert torch.equal(loaded(x), converted(x))
