"""Reference model zoo: traceability, structure, exact MACs, checkpoint loading."""

from __future__ import annotations

import operator
import os
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils.data import DataLoader

from djpq_compiler import bops
from djpq_compiler.errors import ArtifactError, ConfigError
from djpq_compiler.workflows import zoo
from djpq_compiler.workflows.data import DEFAULT_ROOT, load_fashion_mnist, make_loader
from djpq_compiler.workflows.train import evaluate


def _targets(gm: fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _modules(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_traces_and_matches_eager(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.get_model(name).eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(3, 1, 28, 28)
    out = gm(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, model(x))


def test_paper_vgg7_macs_are_exact() -> None:
    model = zoo.vgg7(in_channels=3, widths=(128, 256, 512), fc=1024, bn=False, input_size=32)
    report = bops(model, torch.randn(1, 3, 32, 32))
    assert report.macs == 615_917_568
    assert round(report.fp32_total / 1e9, 1) == 630.7
    assert not _modules(model, nn.BatchNorm2d)


def test_resnet20_structure() -> None:
    model = zoo.resnet20()
    convs = _modules(model, nn.Conv2d)
    assert len([c for c in convs if c.kernel_size == (3, 3)]) == 19  # stem + 9 blocks x 2
    projections = [c for c in convs if c.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in projections] == [
        (16, 32, (2, 2)), (32, 64, (2, 2))]
    assert _targets(fx.symbolic_trace(model)).count(operator.add) == 9


def test_mobilenetv2_structure() -> None:
    model = zoo.mobilenetv2_small()
    depthwise = [c for c in _modules(model, nn.Conv2d) if c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert _modules(model, nn.ReLU6)
    # residual adds only where stride 1 and channels unchanged
    blocks = _modules(model, zoo.InvertedResidual)
    adds = _targets(fx.symbolic_trace(model)).count(operator.add)
    assert adds == sum(b.use_residual for b in blocks) > 0


def test_inception_concatenates_branches() -> None:
    model = zoo.inception_small()
    gm = fx.symbolic_trace(model)
    assert _targets(gm).count(torch.cat) == 4
    block = _modules(model, zoo.InceptionBlock)[0]
    assert block(torch.randn(1, 32, 14, 14)).shape[1] == block.out_channels


def test_factory_arguments_are_validated() -> None:
    with pytest.raises(ConfigError, match="known models"):
        zoo.get_model("alexnet")
    with pytest.raises(ConfigError):
        zoo.vgg7(widths=(8, 8))
    with pytest.raises(ConfigError):
        zoo.resnet20(blocks=0)
    assert zoo.get_model("resnet20", widths=(8, 16, 32)).fc.in_features == 32


def test_load_pretrained_reports_missing_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found.*train_reference.py"):
        zoo.load_pretrained("vgg7", tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="cannot be loaded"):
        zoo.load_pretrained("vgg7", corrupt)
    wrong = tmp_path / "wrong.pt"
    torch.save(zoo.resnet20().state_dict(), wrong)
    with pytest.raises(ArtifactError, match="does not match"):
        zoo.load_pretrained("vgg7", wrong)
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ArtifactError, match="not a state_dict"):
        zoo.load_pretrained("vgg7", not_a_dict)


def test_load_pretrained_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = zoo.inception_small()
    path = tmp_path / "inception.pt"
    torch.save(model.state_dict(), path)
    loaded = zoo.load_pretrained("inception", path)
    assert not loaded.training
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x))



@pytest.fixture(scope="module")
def test_subset() -> DataLoader:
    """1,000 seeded random Fashion-MNIST test images (skips if the data set is not installed)."""
    if not DEFAULT_ROOT.is_dir() and "DJPQ_DATA" not in os.environ:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return make_loader(load_fashion_mnist("test"), batch_size=500, subset=1000, seed=0)


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_committed_checkpoint_is_accurate(name: str, test_subset: DataLoader) -> None:
    """The committed FP32 checkpoints exist, are plain float32 state_dicts and are accurate."""
    state = torch.load(zoo.checkpoint_path(name), map_location="cpu", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    assert evaluate(zoo.load_pretrained(name), test_subset) > 0.90
