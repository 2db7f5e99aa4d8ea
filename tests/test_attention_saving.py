"""A converted model with ``nn.MultiheadAttention`` (a float island) saves in the safe format.

``save_converted`` refused it ("not in the safe-format allow-list"), so torchvision's ViT could
not be saved; the allow-list now has ``nn.MultiheadAttention`` and the Linear subclass of its
``out_proj`` (exact classes only, like every other entry).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.convert import convert
from djpq_compiler.serialize import load_converted, save_converted


class Attend(nn.Module):
    """Patch conv -> tokens -> ``nn.MultiheadAttention`` (options vary) -> linear head."""

    def __init__(self, batch_first: bool, bias_kv: bool, dim: int = 8) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=batch_first, add_bias_kv=bias_kv)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2)
        t = t.transpose(1, 2) if self.batch_first else t.permute(2, 0, 1)
        out, _ = self.mha(t, t, t)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out[:, 0])


def _roundtrip(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float-island warning
        converted = convert(djpq.prepare(model.eval(), x).eval())
    assert any(isinstance(m, nn.MultiheadAttention) for m in converted.modules())
    loaded = load_converted(save_converted(converted, path))
    mha = [m for m in loaded.modules() if isinstance(m, nn.MultiheadAttention)]
    assert mha and type(mha[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    for seed in (0, 1):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert torch.equal(loaded(inp), converted(inp))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias_kv", [False, True])
def test_multihead_attention_saves_and_loads(batch_first: bool, bias_kv: bool,
                                             tmp_path: Path) -> None:
    _roundtrip(Attend(batch_first, bias_kv), torch.randn(2, 3, 8, 8), tmp_path / "mha.djpq")


def test_torchvision_vit_saves_and_loads(tmp_path: Path) -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                        hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.2)
    _roundtrip(model, torch.randn(2, 3, 32, 32), tmp_path / "vit.djpq")

