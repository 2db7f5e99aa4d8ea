"""Exact BOPs counter: reference values from REFERENCE.md and counting rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from djpq_compiler import ConfigError, bops

tv = pytest.importorskip("torchvision")


def test_resnet18_reference_values() -> None:
    model = tv.models.resnet18(weights=None)
    x = torch.randn(1, 3, 224, 224)
    fp = bops(model, x)
    assert fp.macs == 1_814_073_344
    assert round(fp.fp32_total / 1e9, 1) == 1857.6 and fp.total == fp.fp32_total
    assert round(bops(model, x, weight_bits=8, act_bits=8).gbops, 1) == 116.1
    mixed = bops(model, x, weight_bits=4, act_bits=4, overrides={"conv1": (8, 8), "fc": (8, 8)})
    assert round(mixed.gbops, 1) == 34.7


def test_mobilenet_v2_reference_value() -> None:
    report = bops(tv.models.mobilenet_v2(weights=None), torch.randn(1, 3, 224, 224))
    assert report.macs == 300_774_272 and round(report.gbops, 1) == 308.0


def test_vgg7_reference_value() -> None:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1),
                nn.ReLU(), nn.MaxPool2d(2)]

    vgg7 = nn.Sequential(*block(3, 128), *block(128, 256), *block(256, 512), nn.Flatten(),
                         nn.Linear(512 * 16, 1024), nn.ReLU(), nn.Linear(1024, 10))
    report = bops(vgg7, torch.randn(1, 3, 32, 32))
    assert report.macs == 615_917_568 and round(report.gbops, 1) == 630.7


class Functional(nn.Module):
    """Weights fed to functions from get_attr (as in Swin)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 2, 3, 3))
        self.fc_w = nn.Parameter(torch.randn(5, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, padding=1, groups=2)  # 4 in -> 8 out, grouped
        return F.linear(y.mean((2, 3)), self.fc_w)


def test_functional_and_grouped_layers_counted() -> None:
    report = bops(Functional(), torch.randn(1, 4, 6, 6))
    conv, fc = report.rows
    assert conv.macs_fp == 8 * 36 * 9 * 2 and fc.macs_fp == 40
    assert report.total == (8 * 36 * 9 * 2 + 40) * 32 * 32


def test_depthwise_counts_one_input_per_output() -> None:
    report = bops(nn.Conv2d(6, 6, 3, padding=1, groups=6), torch.randn(1, 6, 5, 5))
    assert report.macs == 6 * 25 * 9


def test_linear_over_tokens_counts_every_token() -> None:
    report = bops(nn.Linear(4, 3), torch.randn(1, 7, 4))
    assert report.macs == 7 * 4 * 3


def test_batch_size_does_not_change_per_sample_count() -> None:
    model = nn.Conv2d(3, 4, 3)
    assert bops(model, torch.randn(1, 3, 8, 8)).total == bops(model, torch.randn(5, 3, 8, 8)).total


def test_table_and_errors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2))
    report = bops(model, torch.randn(1, 3, 8, 8), weight_bits=8, act_bits=8)
    text = report.table()
    assert "GBOPs" in text and "0" in text.splitlines()[3]
    assert report.ratio == pytest.approx(16.0)
    with pytest.raises(ConfigError, match="name no conv/linear"):
        bops(model, torch.randn(1, 3, 8, 8), overrides={"nope": (4, 4)})
    with pytest.raises(ConfigError, match="example_inputs"):
        bops(model)
