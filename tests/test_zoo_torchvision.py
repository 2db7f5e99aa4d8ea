"""The pruning oracle on torchvision classification models (``weights=None``, eval mode).

A representative subset runs by default; the rest of the zoo is marked ``slow`` (``.ci/run``
runs it too). Every model must analyse without error, prune exactly (pruned == masked) and, for
CNNs, have a prunable fraction > 0. Known failures are listed with their reason.
"""

from __future__ import annotations

import pytest
import torch

from djpq_compiler.verify import pruning_oracle

tv = pytest.importorskip("torchvision")

#: Models the compiler cannot handle yet, with the reason. Empty: every model passes.
KNOWN_FAILURES: dict[str, str] = {}

#: Models whose structure leaves no prunable conv/linear channel (with the reason).
NOTHING_PRUNABLE: dict[str, str] = {}

REPRESENTATIVE = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "googlenet",
    "shufflenet_v2_x0_5", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny",
    "squeezenet1_0", "mnasnet0_5", "resnext50_32x4d",
]
HEAVY = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf"}
ALL = tv.models.list_models(module=tv.models)


def _input_size(name: str) -> int:
    if name.startswith(("vit", "swin", "maxvit")):
        return 224
    if name.startswith("inception"):
        return 96
    return 32 if name not in {"googlenet", "squeezenet1_0", "squeezenet1_1", "alexnet"} else 64


def _params(name: str) -> object:
    marks = [] if name in REPRESENTATIVE else [pytest.mark.slow]
    if name in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=True))
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_params(n) for n in ALL if n not in HEAVY])
def test_zoo_oracle(name: str) -> None:
    torch.manual_seed(0)
    model = tv.models.get_model(name, weights=None).eval()
    size = _input_size(name)
    report, err, n0, n1 = pruning_oracle(model, torch.randn(2, 3, size, size))
    assert err < 1e-4, f"pruned model differs from the masked model by {err:.2e}"
    if name not in NOTHING_PRUNABLE:
        assert report.prunable_fraction > 0
        assert n1 < n0


def test_representative_models_exist() -> None:
    assert set(REPRESENTATIVE) <= set(ALL)
