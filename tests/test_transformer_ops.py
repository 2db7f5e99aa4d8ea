"""Transformer ops (layer norm, softmax, matmul, attention) as float islands in TVM and ONNX.

Tiny models are prepared, calibrated and converted with ``integer=True``; their convs and
linears (2-D and on tokens) run on integer codes, the transformer ops (layer norm, softmax,
attention) in float between a ``Dequantize`` and the next ``Quantize``. Tolerance, stated
honestly: TVM and onnxruntime compute those float ops with their own ``exp`` and reduction
order, a few float32 ulps away from PyTorch, so where a value lands on a rounding tie of the
next quantizer its code moves by one LSB. The tests therefore require the
output of the final integer layer to be within one input-LSB unit of it (``in_scale * w_scale *
sum|w|``, the change one flipped input code can cause) and nearly all elements equal; the shape
ops themselves are bit-exact (``tests/test_shape_ops.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import djpq_compiler as djpq
from djpq_compiler.convert import convert
from djpq_compiler.ir import modules as im
from djpq_compiler.records import converted_record


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first layer norm: permutes around a channels-last ``F.layer_norm``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-6)
        return x.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """Stem, a block with a depthwise conv, LayerNorm2d and a 1x1 MLP, a channels-last
    ``nn.LayerNorm`` and a conv head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = LayerNorm2d(c)
        self.pw1, self.pw2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1)
        self.act = nn.ReLU()
        self.ln = nn.LayerNorm(c)
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x)


class Attention(nn.Module):
    """timm-style attention: qkv linear, head split with reshape/permute/unbind, then either
    ``F.scaled_dot_product_attention`` or ``softmax(q @ k^T * scale) @ v``."""

    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        else:
            attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class ViTLike(nn.Module):
    """Patch embedding, class token, positional embedding, one pre-norm encoder block, head.

    ``forward`` takes ``attn_mask=None`` and ``is_causal=False`` like timm's blocks: the
    converted model must still have one input."""

    def __init__(self, dim: int = 16, heads: int = 2, fused: bool = True,
                 act: type[nn.Module] = nn.Identity, causal: bool = False,
                 masked: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.mask = nn.Buffer(torch.randn(1, 1, 5, 5)) if masked else None  # additive bias
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, fused)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), act(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls.expand(x.shape[0], -1, -1), x), dim=1) + self.pos
        mask = self.mask if self.mask is not None else attn_mask
        x = x + self.attn(self.ln1(x), mask, True if self.causal else is_causal)
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln3(x)[:, 0])


class MHABlock(nn.Module):
    """``nn.MultiheadAttention`` (sequence-first, returning weights) between two convs."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.mha = nn.MultiheadAttention(dim, 4)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).permute(2, 0, 1)  # (L, N, E)
        out, _ = self.mha(x, x, x)
        return self.head(out.transpose(0, 1)[:, 0])


def _converted(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    torch.manual_seed(0)
    prepared = djpq.prepare(model.eval(), x)
    return convert(prepared.eval())


def _unit(gm: fx.GraphModule) -> float:
    """One input-LSB unit of the last integer layer with a float output."""
    last = [m for m in gm.modules() if isinstance(m, (im.IntConv2d, im.IntLinear))][-1]
    w = last.weight.detach().double().abs().reshape(last.weight.shape[0], -1).sum(1)
    return float((last.in_scale * last.w_scale.detach().double().reshape(-1) * w).max())


def _check_close(got: torch.Tensor, want: torch.Tensor, unit: float) -> None:
    diff = (got.double() - want.double()).abs()
    assert float(diff.max()) <= unit * 1.01, (float(diff.max()), unit)
    assert float((diff > 1e-5 * unit).double().mean()) <= 0.1  # flips are rare


MODELS: dict[str, Any] = {
    "convnext_like": ConvNeXtLike,
    "vit_sdpa": lambda: ViTLike(fused=True),
    "vit_matmul_softmax": lambda: ViTLike(fused=False),
    "vit_causal": lambda: ViTLike(causal=True),
    "vit_additive_mask": lambda: ViTLike(masked=True),
    "mha": MHABlock,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_transformer_convert_keeps_one_input(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    converted = _converted(MODELS[name](), x)
    assert [n.op for n in converted.graph.nodes].count("placeholder") == 1
    assert any(isinstance(m, im.IntConv2d) for m in converted.modules())
    left = {getattr(n.target, "__name__", n.target) for n in converted.graph.nodes}
    assert not left & {"_assert", "floordiv", "eq"}


@pytest.mark.parametrize("name", list(MODELS))
def test_transformer_tvm(name: str) -> None:
    tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    converted = _converted(MODELS[name](), x)
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    unit = _unit(converted)
    for seed in (1, 2):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        _check_close(compiled(inp), converted(inp), unit)


@pytest.mark.parametrize("name", list(MODELS))
def test_transformer_onnx(name: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export, verify

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    converted = _converted(MODELS[name](), x)
    path = export(converted, tmp_path / "m.onnx", (x,))
    report = verify(converted, path, (x,))
    assert report["max_lsb_per_op"] <= 1
    out = report["outputs"][0]
    assert out.get("max_unit_ratio", 0.0) <= 1.01


def test_float_islands_listed() -> None:
    """What stays float is reported: layer norms and attention; the linears on tokens (q/k/v and
    output projections, the MLP) are integer layers (tests/test_token_linears.py)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    converted = _converted(ViTLike(), x)
    floats = set(converted_record(converted).float_ops)
    assert {"ln1", "scaled_dot_product_attention"} <= floats
    assert not {"attn_qkv", "attn_proj", "mlp_0", "mlp_2"} & floats
    assert sum(isinstance(m, im.IntLinear) for m in converted.modules()) == 5  # + the head


tv = pytest.importorskip("torchvision")


def _small_vit() -> nn.Module:
    model = tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                        hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zero-initializes the head
    return model


def test_torchvision_vit_small(tmp_path: Path) -> None:
    """torchvision's VisionTransformer at a small config: its shape asserts fold, it exports to
    ONNX within 1 LSB per op, and builds in TVM (GELU is a float island of float_ops.py)."""
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export, verify

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    converted = _converted(_small_vit(), x)
    left = {getattr(n.target, "__name__", n.target) for n in converted.graph.nodes}
    assert not left & {"_assert", "floordiv", "eq"}
    report = verify(converted, export(converted, tmp_path / "vit.onnx", (x,)), (x,))
    assert report["max_lsb_per_op"] <= 1
    tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    _check_close(compiled(x), converted(x), _unit(converted))


def _small_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


def test_torchvision_convnext_small(tmp_path: Path) -> None:
    """torchvision's ConvNeXt at a small config: LayerNorm2d (permute + F.layer_norm with
    get_attr weights), channels-last nn.LayerNorm, layer scale, stochastic depth; ONNX within
    1 LSB per op; TVM (GELU and the layer-scale mul are float islands of float_ops.py)."""
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export, verify

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    converted = _converted(_small_convnext(), x)
    assert {"layer_norm"} <= set(converted_record(converted).float_ops)
    report = verify(converted, export(converted, tmp_path / "cnx.onnx", (x,)), (x,))
    assert report["max_lsb_per_op"] <= 1
    tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    _check_close(compiled(x), converted(x), _unit(converted))
