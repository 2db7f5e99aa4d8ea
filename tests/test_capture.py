"""Capture pass: shapes recorded, clear errors for untraceable models and wrong inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from djpq_compiler import CaptureError
from djpq_compiler.passes.capture import capture
from djpq_compiler.records import capture_record


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: not traceable
            return y
        return -y


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).flatten(1)


def test_shapes_and_static_values_recorded() -> None:
    gm = capture(Branch(), torch.randn(2, 3, 5, 5)).graph_module
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if "tensor_meta" in n.meta}
    assert shapes["conv"] == (2, 4, 5, 5) and shapes["flatten"] == (2, 100)
    assert capture_record(gm).how == "torch.fx.symbolic_trace"


def test_model_is_copied_not_modified() -> None:
    model = Branch()
    gm = capture(model, torch.randn(1, 3, 5, 5)).graph_module
    assert gm.conv is not model.conv
    with torch.no_grad():
        gm.conv.weight.zero_()
    assert model.conv.weight.abs().sum() > 0


def test_untraceable_model_names_location_and_fix() -> None:
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), torch.randn(1, 3, 4, 4))
    text = str(info.value)
    assert "test_capture.py" in text  # the offending user code location
    assert "leaf_modules" in text and "concrete_args" in text


def test_leaf_module_makes_it_traceable() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DataDependent()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    gm = capture(Wrapper(), torch.randn(1, 3, 4, 4), leaf_modules=(DataDependent,)).graph_module
    assert any(n.op == "call_module" and n.target == "inner" for n in gm.graph.nodes)


def test_wrong_input_shape_names_node() -> None:
    with pytest.raises(CaptureError, match="conv") as info:
        capture(Branch(), torch.randn(1, 5, 4, 4))
    assert "(1, 5, 4, 4)" in str(info.value)


def test_bad_example_inputs_type() -> None:
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(Branch(), "not a tensor")


def test_train_mode_preserved_and_bn_stats_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    gm = capture(model, torch.randn(4, 3, 4, 4) * 10).graph_module
    assert gm.training
    assert torch.equal(gm.get_submodule("1").running_mean, torch.zeros(4))
