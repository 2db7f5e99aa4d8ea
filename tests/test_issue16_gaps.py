"""Issue #16 items the audit (``benchmarks/torchvision_zoo/ISSUE16_AUDIT.md``) found without a
regression test of their own: a net whose last layer is followed by a ReLU, ``bmm``/``matmul`` of
two activations, a bias beyond int32 in every backend, ``bops`` accepting the capture options
its ``CaptureError`` recommends, and an op with no sign rule after a ReLU staying signed."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_correctness_regressions import _big_bias_model, _ModeSwitch, _ValueBranch
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.errors import CaptureError, ConfigError
from djpq_compiler.passes.capture import capture
from djpq_compiler.passes.sign_analysis import nonnegative_nodes
from djpq_compiler.records import prepared_record
from djpq_compiler.serialize import load_converted, save_converted

X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
STAGES = ("convert", "agreement", "tvm", "onnx")


class _Bmm(nn.Module):
    """Two activations multiplied: ``bmm(p, qᵀ)``, softmax, ``matmul`` with ``q``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.a(x).flatten(2)  # (N, 8, 16)
        q = torch.relu(self.b(x)).flatten(2)
        s = torch.bmm(p, q.transpose(1, 2))  # (N, 8, 8)
        return self.head(torch.matmul(s.softmax(-1), q))


def _nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "conv_then_relu_ends_the_net": nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU()),
        "linear_then_relu6_ends_the_net": nn.Sequential(
            nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5), nn.ReLU6()),
        "bmm_and_matmul_of_two_activations": _Bmm(),
    }


@pytest.mark.parametrize("name", list(_nets()))
def test_every_backend_agrees(name: str) -> None:
    pytest.importorskip("tvm")
    pytest.importorskip("onnxruntime")
    from djpq_compiler.testing.backend_zoo import check_backends

    result = check_backends(name, _nets()[name].eval(), X)
    assert result.passed(*STAGES), {s: (o.status, o.detail) for s, o in result.stages.items()}
    if name.startswith("bmm"):
        assert {"bmm", "matmul", "softmax"} <= set(result.float_ops)  # float islands, named


@pytest.mark.parametrize("units", [3e9, 2**31 - 1000.0])  # beyond int32; next to it
def test_bias_beyond_int32_agrees_in_tvm_and_onnxruntime(units: float) -> None:
    """googlenet's defect: a clamped int32 bias wrapped in onnxruntime (255 LSB). The clamp
    leaves room for the accumulator, so TVM is bit-exact and onnxruntime within 1 LSB."""
    pytest.importorskip("tvm")
    pytest.importorskip("onnxruntime")
    from djpq_compiler.errors import BiasSaturationWarning
    from djpq_compiler.testing.backend_zoo import _onnx, check_tvm

    prepared, x = _big_bias_model(units)
    with pytest.warns(BiasSaturationWarning):
        converted = djpq.convert(prepared)
    tvm = check_tvm(converted, x)
    assert tvm.ok and tvm.detail == "bit-exact", tvm
    onnx = _onnx(converted, x)
    assert onnx.ok, onnx


def test_bops_accepts_the_capture_options_its_error_recommends() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 3, padding=1)
            self.block = _ValueBranch()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(torch.relu(self.stem(x)))

    torch.manual_seed(0)
    model = Wrapper().eval()
    with pytest.raises(CaptureError, match="leaf_modules="):
        djpq.bops(model, X)
    report = djpq.bops(model, X, leaf_modules=(_ValueBranch,))
    captured = djpq.analyze(model, X, leaf_modules=(_ValueBranch,)).graph_module
    assert report.total == djpq.bops(captured).total > 0
    switch = _ModeSwitch().eval()
    assert djpq.bops(switch, X, concrete_args={"mode": "pool"}).total == djpq.bops(switch, X).total
    prepared = djpq.prepare(switch, X)
    with pytest.raises(ConfigError, match="already captured"):
        djpq.bops(prepared, leaf_modules=(_ValueBranch,))


class _Opaque(nn.Module):
    """A module with no sign rule (its forward happens to keep the sign; the analysis cannot
    know that)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() * 0.5


class _ReluThenUnknown(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.opaque = _Opaque()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        z = torch.cumsum(y, dim=3) if self.how == "cumsum" else self.opaque(y)
        return self.conv2(z)


@pytest.mark.parametrize("how", ["cumsum", "leaf_module"])
def test_an_op_without_a_sign_rule_after_a_relu_is_not_proven_nonnegative(how: str) -> None:
    """Unknown is "may be negative" (safe), never "non-negative": the quantizer starts signed
    and only calibration data can make it unsigned."""
    torch.manual_seed(0)
    model = _ReluThenUnknown(how).eval()
    leaves = (_Opaque,) if how == "leaf_module" else ()
    gm = capture(model, X, leaf_modules=leaves).graph_module
    value = next(n for n in gm.graph.nodes if n.target == "conv2").args[0]
    assert value.name not in nonnegative_nodes(gm)
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    assert relu.name in nonnegative_nodes(gm)  # the analysis does prove what it can
    prepared = djpq.prepare(model, X, leaf_modules=leaves)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unknown op stays a float island
        converted = djpq.convert(prepared)
    with torch.no_grad():
        ref = model(X)
        assert float((converted(X) - ref).abs().max()) <= 0.03 * float(ref.max() - ref.min())


class _Named(nn.Module):
    """A submodule with an odd (legal) name beside one called ``aA``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.odd = name
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.add_module(name, nn.Conv2d(8, 4, 1))
        self.aA = nn.Conv2d(8, 4, 1)  # noqa: N815 -- the name "a\x41" reads as, escaped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.odd)(torch.relu(self.stem(x)))


@pytest.mark.parametrize("name", ["class", 'say "hi"', "a\\x41", "a\nb"])
def test_a_name_torch_fx_cannot_write_is_a_capture_error_naming_it(name: str) -> None:
    """torch.fx writes ``self.class`` (a SyntaxError, raised raw by ``analyze``) or an
    unescaped ``getattr(self, "a\\x41")``, which reads attribute ``aA`` (was an
    AttributeError reported as "a bug in djpq-compiler" by ``prepare``): refused up front."""
    model = _Named(name).eval()
    entries: list[Callable[[nn.Module, torch.Tensor], object]] = [
        djpq.analyze, djpq.prepare, djpq.bops]
    for entry in entries:
        with pytest.raises(CaptureError, match="cannot generate code for the attribute") as info:
            entry(model, X)
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", ["block1-0", "with space", "ünï", "1st", "a:b", "x[0]", "match"])
def test_other_legal_names_convert_save_and_load(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Named(name).eval()
    prepared = djpq.prepare(model, X)
    converted: Any = djpq.convert(prepared)
    loaded: Any = load_converted(save_converted(converted, tmp_path / "m.djpq"))
    assert torch.equal(loaded(X), converted(X))


def test_agreement_check_shares_the_weights_and_leaves_the_prepared_model_alone() -> None:
    """``integer_agreement`` snaps quantizers and hardens gates on its own copy, which shares
    every other tensor with ``prepared`` (the second copy of vit_h_14's weights ran the zoo gate
    out of memory)."""
    from djpq_compiler.verify import _copy_for_readout, integer_agreement

    torch.manual_seed(0)
    prepared = djpq.prepare(_nets()["conv_then_relu_ends_the_net"].eval(), X)
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    copy_ = _copy_for_readout(prepared)
    weight = "0.parametrizations.weight.original"
    assert copy_.get_parameter(weight) is prepared.get_parameter(weight)
    quant = prepared_record(prepared).quantizers.input["_2"]
    assert copy_.get_submodule(quant) is not prepared.get_submodule(quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = djpq.convert(prepared)
    assert max(integer_agreement(prepared, converted, X).values()) <= 1
    after = prepared.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
