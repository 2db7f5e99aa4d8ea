"""Bad-input catalogue (DESIGN invariant 6: nothing silently wrong).

Every case asserts three things: a :class:`~djpq_compiler.errors.DjpqError` subclass is raised,
its message names the node / argument / file at fault and says what to do, and nothing was
half-done (the user's model, or prepared model, is unchanged; a target file is untouched).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import InvertedResidual, Residual
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.config import DJPQConfig, GateSpec, Override, QuantSpec
from djpq_compiler.errors import (
    ArtifactError,
    BackendError,
    CaptureError,
    ConfigError,
    DataError,
    DjpqError,
    MissingExtraError,
    PlanError,
    PruningError,
    QuantizationError,
    UnsupportedOpError,
)
from djpq_compiler.records import capture_record, stage
from djpq_compiler.workflows import data, zoo

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class DataDependent(nn.Module):
    """A branch on tensor *values*: neither torch.fx nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class ShapeDependent(nn.Module):
    """A branch on a *shape*: torch.fx fails; capture specializes it on the example input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = self.conv(x)
        return F.relu(x)


class Flipped(nn.Module):
    """``torch.flip`` on channels has no channel rule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flip(self.conv(x), dims=[1]))


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], bool, str]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, model.training, repr(model)


def _assert_unchanged(model: nn.Module, snap: tuple[dict[str, torch.Tensor], bool, str]) -> None:
    state, training, text = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{key} was modified")
    assert model.training == training
    assert repr(model) == text


@pytest.fixture
def residual() -> Iterator[nn.Module]:
    model = Residual().eval()
    snap = _snapshot(model)
    yield model
    _assert_unchanged(model, snap)


def _prepared() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return djpq.prepare(Residual().eval(), X)


# --------------------------------------------------------------------------- capture
def test_every_error_type_is_a_djpq_error() -> None:
    for kind in (CaptureError, ConfigError, DataError, UnsupportedOpError, PruningError,
                 QuantizationError, ArtifactError):
        assert issubclass(kind, DjpqError)


@pytest.mark.parametrize("entry", ["analyze", "prepare"])
def test_data_dependent_control_flow(entry: str) -> None:
    model = DataDependent()
    snap = _snapshot(model)
    call = {"analyze": djpq.analyze, "prepare": djpq.prepare}[entry]
    with pytest.raises(CaptureError) as info:
        call(model, X)
    msg = str(info.value)
    assert "could not trace DataDependent" in msg
    assert "if x.sum() > 0:" in msg and "test_bad_inputs.py" in msg  # the user's line
    assert "torch.export could not capture it either" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg  # how to fix
    _assert_unchanged(model, snap)


def test_shape_branch_is_captured_specialized_and_guarded() -> None:
    """torch.fx cannot decide ``if x.shape[1] == 3``; capture decides it from the example input
    (as torch.export specializes static shapes), keeps a module-level graph and asserts the
    condition at run time (formerly: refused, torch.export's aten graph has no channel rules)."""
    model = ShapeDependent()
    snap = _snapshot(model)
    with pytest.warns(djpq.errors.CaptureWarning, match="1 shape condition"):
        report = djpq.analyze(model, X)
    gm = report.graph_module
    assert any(n.op == "call_module" and n.target == "conv" for n in gm.graph.nodes)
    assert any(n.target is torch._assert for n in gm.graph.nodes)
    assert capture_record(gm).how == "torch.fx.symbolic_trace, shapes specialized"
    with pytest.raises(AssertionError, match="captured for inputs where"):
        gm(torch.randn(2, 4, 8, 8))  # the other branch: loud, not silently wrong
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("bad,shown", [
    (torch.randn(2, 3), "(2, 3) torch.float32"),
    (torch.randn(2, 5, 8, 8), "(2, 5, 8, 8) torch.float32"),
    (torch.ones(2, 3, 8, 8, dtype=torch.int64), "(2, 3, 8, 8) torch.int64"),
])
def test_wrong_example_input_shape_or_dtype(residual: nn.Module, bad: torch.Tensor,
                                            shown: str) -> None:
    with pytest.raises(CaptureError) as info:
        djpq.analyze(residual, bad)
    msg = str(info.value)
    assert "node=%stem" in msg and "call_module[target=stem]" in msg  # the failing node
    assert "with meta=" not in msg  # no meta dump
    assert f"got {shown}" in msg and "shape and dtype" in msg


@pytest.mark.parametrize("bad", ["image.png", None, 3])
def test_example_inputs_of_the_wrong_type(residual: nn.Module, bad: object) -> None:
    with pytest.raises(CaptureError, match="example_inputs must be a tensor or a tuple"):
        djpq.analyze(residual, bad)


def test_model_that_is_not_a_module() -> None:
    with pytest.raises(CaptureError, match="must be a torch.nn.Module, got function"):
        djpq.analyze(lambda x: x, X)


# --------------------------------------------------------------------------- strict mode
def test_unsupported_op_in_strict_mode() -> None:
    model = Flipped()
    snap = _snapshot(model)
    with pytest.raises(UnsupportedOpError) as info:
        djpq.analyze(model, X, strict=True)
    msg = str(info.value)
    assert "%flip" in msg and "torch.flip" in msg  # node.format_node()
    assert "RULES.register(flip)" in msg and "strict=False" in msg
    with pytest.raises(UnsupportedOpError, match="%flip"):
        djpq.prepare(model, X, DJPQConfig(strict=True))
    _assert_unchanged(model, snap)
    assert "flip" in djpq.analyze(model, X).missing  # non-strict: a barrier, not an error


# --------------------------------------------------------------------------- config values
@pytest.mark.parametrize("make,names", [
    (lambda: QuantSpec(bits=1), ["QuantSpec", "bits", "[2, 32]", "1"]),
    (lambda: QuantSpec(bits=64), ["bits", "64"]),
    (lambda: QuantSpec(bits=8, min_bits=1), ["min_bits"]),
    (lambda: QuantSpec(bits=8.5), ["bits", "8.5"]),
    (lambda: DJPQConfig(input_bits=1), ["DJPQConfig.input_bits", "1"]),
    (lambda: GateSpec(threshold=-1.0), ["GateSpec.threshold", "> 0", "-1.0"]),
    (lambda: GateSpec(threshold=0.0), ["GateSpec.threshold"]),
    (lambda: GateSpec(mu_jitter=-0.1), ["GateSpec.mu_jitter", ">= 0"]),
    (lambda: GateSpec(mu_init=math.nan), ["GateSpec.mu_init", "finite"]),
    (lambda: GateSpec(mu_init=1e-4), ["gates would start closed"]),
    (lambda: DJPQConfig(round_to=0), ["round_to"]),
    (lambda: DJPQConfig(loss_kind="l2"), ["loss_kind", "'l2'"]),
    (lambda: DJPQConfig(calibration_batches=-1), ["calibration_batches"]),
    (lambda: Override("conv1"), ["sets nothing"]),
    (lambda: Override(""), ["non-empty"]),
])
def test_invalid_config_values(make: object, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        make()  # type: ignore[operator]
    for name in names:
        assert name in str(info.value)


def test_unknown_override_and_ignore_names(residual: nn.Module) -> None:
    cfg = DJPQConfig(overrides=(Override("conv9", prune=False),), ignore=("fc2",))
    with pytest.raises(ConfigError) as info:
        djpq.prepare(residual, X, cfg)
    msg = str(info.value)
    assert "'conv9'" in msg and "'fc2'" in msg and "did you mean" in msg and "conv1" in msg


def test_config_of_the_wrong_type(residual: nn.Module) -> None:
    with pytest.raises(ConfigError, match="config must be a DJPQConfig, got dict"):
        djpq.prepare(residual, X, {"prune": False})  # type: ignore[arg-type]


class _SharedConv(nn.Module):
    """One conv module called twice: on the input and on its own ReLU'd output."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c(torch.relu(self.c(x)))))


def test_a_conv_module_called_twice_is_refused_unless_ignored() -> None:
    """Shared weights used to crash convert deep in a pass; prepare now names the module."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedOpError, match=r"module 'c' is called at 2 nodes \(c, c_1\).*"
                                                 r"copy\.deepcopy.*ignore=\('c',\)"):
        djpq.prepare(_SharedConv(), x)
    prepared = djpq.prepare(_SharedConv().eval(), x, DJPQConfig(ignore=("c",)))  # float twice
    with pytest.warns(djpq.FloatOpsWarning, match="c, relu, c_1, relu_1"):
        converted = djpq.convert(prepared)
    want = prepared(x)  # the integer head may differ by a code or two from fake-quant
    assert (converted(x) - want).abs().max() <= 0.05 * want.abs().max()


# --------------------------------------------------------------------------- prepared models
def test_prepare_on_an_already_prepared_model() -> None:
    gm = _prepared()
    snap = _snapshot(gm)
    with pytest.raises(ConfigError, match="already prepared.*original float model"):
        djpq.prepare(gm, X)
    _assert_unchanged(gm, snap)


@pytest.mark.parametrize("kind,param,names", [
    ("gate", "mu", ["gate 'djpq_gates.g", "mu is not finite", "lower the learning rate"]),
    ("gate", "log_sigma2", ["log_sigma2 is not finite"]),
    ("quantizer", "log_q_max", ["quantizer '", "log_q_max is not finite", "learning rate"]),
    ("quantizer", "log_d", ["parameter log_d is not finite"]),  # +Inf was hidden by a clamp
])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_in_gate_or_quantizer_parameters(kind: str, param: str, names: list[str],
                                                    value: float) -> None:
    gm = _prepared()
    djpq.check_finite(gm)  # healthy first
    from djpq_compiler.prepared import gates, quantizers

    items = list(gates(gm) if kind == "gate" else quantizers(gm))
    path, module = next((p, m) for p, m in items if getattr(m, param, None) is not None)
    with torch.no_grad():
        getattr(module, param).view(-1)[0] = value
    snap = _snapshot(gm)
    with pytest.raises(QuantizationError) as info:
        djpq.check_finite(gm)
    for name in names:
        assert name in str(info.value)
    assert f"'{path}'" in str(info.value)
    _assert_unchanged(gm, snap)


# --------------------------------------------------------------------------- pruning requests
def test_prune_keeping_zero_channels(residual: nn.Module) -> None:
    gid = djpq.analyze(residual, X).prunable_groups[0].id
    with pytest.raises(PruningError, match=rf"keep\[{gid}\] is empty.*at least one channel"):
        djpq.prune(residual, X, keep={gid: []})


def test_prune_with_bad_group_or_indices(residual: nn.Module) -> None:
    report = djpq.analyze(residual, X)
    fixed = next(g for g in report.groups if not g.prunable)
    group = report.prunable_groups[0]
    with pytest.raises(PruningError, match=r"keep names group 99, but groups are 0\.\."):
        djpq.prune(residual, X, keep={99: [0]})
    with pytest.raises(PruningError, match=rf"group {fixed.id} .* is not prunable"):
        djpq.prune(residual, X, keep={fixed.id: [0]})
    with pytest.raises(PruningError, match=rf"distinct channel indices in 0\.\.{group.size - 1}"):
        djpq.prune(residual, X, keep={group.id: [0, 0]})
    with pytest.raises(PruningError, match="distinct channel indices"):
        djpq.prune(residual, X, keep={group.id: [group.size]})


# --------------------------------------------------------------------------- bops
@pytest.mark.parametrize("kwargs,names", [
    ({"weight_bits": 0}, ["weight_bits", "(0, 32]", "0"]),
    ({"act_bits": -4}, ["act_bits", "-4"]),
    ({"weight_bits": "8"}, ["weight_bits", "'8'"]),
    ({"act_bits": math.nan}, ["act_bits", "nan"]),
    ({"overrides": {"conv9": (8, 8)}}, ["conv9", "layers are", "conv1"]),
    ({"overrides": {"conv1": 8}}, ["overrides['conv1']", "(b_w, b_a) pair"]),
    ({"overrides": {"conv1": (8, 0)}}, ["overrides['conv1'] b_a"]),
])
def test_bops_with_wrong_arguments(residual: nn.Module, kwargs: dict[str, object],
                                   names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        djpq.bops(residual, X, **kwargs)  # type: ignore[arg-type]
    for name in names:
        assert name in str(info.value)


def test_bops_needs_example_inputs_for_a_plain_model(residual: nn.Module) -> None:
    with pytest.raises(ConfigError, match="example_inputs are required"):
        djpq.bops(residual)


def test_bops_of_a_prepared_model_takes_no_bits() -> None:
    gm = _prepared()
    with pytest.raises(ConfigError, match="carries its own bit-widths"):
        djpq.bops(gm, weight_bits=4)


# --------------------------------------------------------------------------- data, checkpoints
def test_missing_data_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(data.ENV_VAR, str(missing))
    with pytest.raises(DataError) as info:
        data.load_fashion_mnist("test")
    msg = str(info.value)
    assert str(missing) in msg and "t10k-images-idx3-ubyte" in msg
    assert "DJPQ_DATA" in msg and "apt-get install" in msg


def test_corrupt_data_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"not an idx file")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is not an IDX file"):
        data.load_fashion_mnist("test")


def test_unknown_split() -> None:
    with pytest.raises(ConfigError, match="use 'train' or 'test'"):
        data.load_fashion_mnist("validation")


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "vgg7.pt"
    torch.save(zoo.get_model("vgg7").state_dict(), path)
    return path


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError) as info:
        zoo.load_pretrained("vgg7", path)
    msg = str(info.value)
    assert f"checkpoint {path} cannot be loaded" in msg and "train_reference.py" in msg


def test_checkpoint_of_another_model_or_not_a_state_dict(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    with pytest.raises(ArtifactError, match="does not match model 'resnet20'"):
        zoo.load_pretrained("resnet20", path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ArtifactError, match="holds a list, not a state_dict"):
        zoo.load_pretrained("vgg7", path)


def test_missing_checkpoint_and_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found at .*missing.pt"):
        zoo.load_pretrained("vgg7", tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="unknown zoo model 'vgg8'; known models: .*vgg7"):
        zoo.load_pretrained("vgg8")


# --------------------------------------------------------------------------- convert
def test_convert_rejects_a_model_that_is_not_prepared(residual: nn.Module) -> None:
    with pytest.raises(ConfigError) as info:
        djpq.convert(residual)
    msg = str(info.value)
    assert "convert() expects a model returned by djpq_compiler.prepare()" in msg  # the fix
    assert "got Residual with stage None" in msg  # the argument at fault


def test_convert_twice() -> None:
    gm = _prepared()
    converted = djpq.convert(gm)
    snap = _snapshot(converted)
    with pytest.raises(ConfigError) as info:
        djpq.convert(converted)
    msg = str(info.value)
    assert "got ConvertedModel with stage 'converted'" in msg
    assert "convert it only once" in msg and "djpq_compiler.prepare()" in msg
    _assert_unchanged(converted, snap)
    assert stage(converted) == "converted"


def test_convert_rejects_non_finite_parameters_without_half_converting() -> None:
    gm = _prepared()
    from djpq_compiler.prepared import gates

    path, gate = next(iter(gates(gm)))
    with torch.no_grad():
        gate.mu[0] = math.nan
    snap = _snapshot(gm)
    with pytest.raises(QuantizationError) as info:
        djpq.convert(gm)
    msg = str(info.value)
    assert f"gate '{path}'" in msg and "mu is not finite" in msg and "learning rate" in msg
    _assert_unchanged(gm, snap)
    assert stage(gm) == "prepared"  # not half-converted


# --------------------------------------------------------------------------- compression plans
def _plan_text() -> str:
    from djpq_compiler.plan import plan_from

    return plan_from(_prepared()).to_json()


def test_malformed_or_mismatched_plan(residual: nn.Module, tmp_path: Path) -> None:
    from djpq_compiler.plan import CompressionPlan, apply_plan

    text = _plan_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(PlanError) as info:
        CompressionPlan.load(cut)
    assert "not a valid compression plan" in str(info.value)
    assert "re-create it with djpq_compiler.plan.plan_from(prepared)" in str(info.value)
    assert cut.read_text() == text[: len(text) // 2]  # loading never rewrites the file

    plan = CompressionPlan.from_json(text)
    other = InvertedResidual().eval()
    snap = _snapshot(other)
    with pytest.raises(PlanError) as info:
        apply_plan(other, X, plan)
    msg = str(info.value)
    assert "made for another model (tiny_models.Residual" in msg and "InvertedResidual" in msg
    assert "use the same model definition and input shape" in msg
    _assert_unchanged(other, snap)
    with pytest.raises(PlanError, match="another model"):  # same class, other input shape
        apply_plan(residual, torch.randn(2, 3, 16, 16), plan)


def _tampered_plans() -> list[str]:
    data = json.loads(_plan_text())
    gid = next(iter(data["groups"]))
    wrong_version = {**data, "version": 2}
    wrong_size = {**data, "groups": {**data["groups"], gid: data["groups"][gid] + 3}}
    duplicate = {**data, "keep": {**data["keep"], gid: [0, 0]}}
    return [json.dumps(d) for d in (wrong_version, wrong_size, duplicate)]


def test_tampered_plan_says_what_to_do(residual: nn.Module) -> None:
    from djpq_compiler.plan import CompressionPlan, apply_plan

    for text in _tampered_plans():
        with pytest.raises(PlanError) as info:
            apply_plan(residual, X, CompressionPlan.from_json(text))
        assert "plan_from(prepared)" in str(info.value), str(info.value)


def test_tampered_plan_is_refused(residual: nn.Module) -> None:
    """The part of the entry above that holds today: each tampered plan is a PlanError."""
    from djpq_compiler.plan import CompressionPlan, apply_plan

    names = ["plan version 2", "plan group 0 (size", "kept [0, 0] of a group of size"]
    for text, name in zip(_tampered_plans(), names, strict=True):
        with pytest.raises(PlanError, match=re.escape(name)):
            apply_plan(residual, X, CompressionPlan.from_json(text))


# --------------------------------------------------------------------------- backends
@pytest.fixture
def no_tvm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Simulate a missing ``tvm`` extra: ``import tvm`` fails while the fixture is active."""
    from djpq_compiler.backends.tvm import adapter

    adapter.load_tvm.cache_clear()
    monkeypatch.setitem(sys.modules, "tvm", None)
    monkeypatch.setitem(sys.modules, "tvm.relax", None)
    yield
    adapter.load_tvm.cache_clear()  # the next caller imports the real TVM again


def test_tvm_backend_unknown_target() -> None:
    from djpq_compiler.backends.tvm import build

    converted = djpq.convert(_prepared())
    snap = _snapshot(converted)
    with pytest.raises(BackendError) as info:
        build(converted, target="riscv", example_inputs=(X,))
    msg = str(info.value)
    assert "unknown TVM target 'riscv'" in msg
    assert "choose one of x86, x86-avx2, x86-avx512, aarch64, cuda" in msg
    with pytest.raises(BackendError, match="did you mean 'x86-avx2'"):
        build(converted, target="x86_avx2", example_inputs=(X,))
    _assert_unchanged(converted, snap)


def test_tvm_backend_missing_extra(no_tvm: None) -> None:
    from djpq_compiler.backends.tvm import build

    converted = djpq.convert(_prepared())
    snap = _snapshot(converted)
    with pytest.raises(MissingExtraError) as info:
        build(converted, target="x86", example_inputs=(X,))
    assert isinstance(info.value, ImportError)  # still catchable as an ImportError
    assert "pip install 'djpq-compiler[tvm]'" in str(info.value)
    _assert_unchanged(converted, snap)


def test_onnx_int4_below_opset_21(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from djpq_compiler.backends.onnx import export

    torch.manual_seed(0)
    prepared = djpq.prepare(Residual().eval(), X, DJPQConfig(weight=QuantSpec(bits=4)))
    converted = djpq.convert(prepared)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(BackendError) as info:
        export(converted, path, (X,), opset=20)
    msg = str(info.value)
    assert "opset 20 has no INT4 QuantizeLinear/DequantizeLinear" in msg  # the argument
    assert "export with opset >= 21" in msg  # the fix
    assert path.read_bytes() == b"previous export"  # not touched
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left


# --------------------------------------------------------------------------- converted models
def _saved_converted(tmp_path: Path) -> Path:
    return djpq.save_converted(djpq.convert(_prepared()), tmp_path / "model.djpq")


@pytest.mark.parametrize("damage,names", [
    (lambda b: b[: len(b) - 64], ["is truncated", "payload bytes", "re-save it"]),
    (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), ["does not match its SHA-256", "re-save it"]),
    (lambda b: b[:10], ["is not a djpq converted-model file", "save_converted"]),
])
def test_truncated_or_tampered_converted_model(damage: object, names: list[str],
                                               tmp_path: Path) -> None:
    path = _saved_converted(tmp_path)
    bad = damage(path.read_bytes())  # type: ignore[operator]
    path.write_bytes(bad)
    with pytest.raises(ArtifactError) as info:
        djpq.load_converted(path)
    assert str(path) in str(info.value)
    for name in names:
        assert name in str(info.value)
    assert path.read_bytes() == bad  # loading never rewrites the file


def test_unsaveable_converted_model_leaves_the_old_file(tmp_path: Path) -> None:
    path = _saved_converted(tmp_path)
    before = path.read_bytes()
    converted = djpq.convert(_prepared(), integer=False)
    out = next(n for n in converted.graph.nodes if n.op == "output")
    with converted.graph.inserting_before(out):
        node = converted.graph.call_function(_double, (out.args[0],))
    out.args = (node,)
    converted.recompile()
    with pytest.raises(UnsupportedOpError) as info:
        djpq.save_converted(converted, path)
    assert "%_double" in str(info.value) and "not in the allow-list" in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.djpq"]


def _double(t: torch.Tensor) -> torch.Tensor:
    return 2 * t
