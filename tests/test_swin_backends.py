"""torchvision's Swin (V1 and V2) and MaxViT through ``convert`` + TVM + ONNX.

Swin calls three ``torch.fx.wrap``-ed functions that stay leaf calls in the traced graph
(``shifted_window_attention``, ``_patch_merging_pad``, ``_get_relative_position_bias``); MaxViT
uses ``torch.einsum``. Both backends lower them (``backends/{tvm,onnx}/window_ops.py``, plans in
``backends/common_ops.py``): padding, rolls, window partition/merge, the bias gather and the
shift mask are exact; the attention is a float island. Tolerance, as in
``tests/test_transformer_ops.py``: a float island may move the next ``Quantize`` by one LSB
(TVM's/onnxruntime's own ``exp`` and summation order), so TVM's float output must be within one
input-LSB unit of the last integer layer (it was bit-exact on these seeds where developed), and
ONNX within 1 LSB per op.

Models are tiny (embed 16, two stages, window 4) at 32x32 (shifted windows in stage 1, the
shift dropped where the window covers the map) and 44x44 (padding to the window, odd patch
merging).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

from djpq_compiler.backends.common_ops import SWIN_ATTENTION
from djpq_compiler.errors import BackendError
from djpq_compiler.ir import modules as im
from djpq_compiler.records import converted_record
from djpq_compiler.testing.backend_zoo import pruned_converted

tv = pytest.importorskip("torchvision")
from torchvision.models.swin_transformer import (  # noqa: E402
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)


def _swin(v2: bool) -> nn.Module:
    torch.manual_seed(0)
    extra: dict[str, Any] = ({"block": SwinTransformerBlockV2,
                              "downsample_layer": PatchMergingV2} if v2 else {})
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                           window_size=[4, 4], num_classes=10, **extra).eval()


def _maxvit() -> nn.Module:
    torch.manual_seed(0)
    return tv.models.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2,
                            block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
                            stochastic_depth_prob=0.0, num_classes=10).eval()


def _converted(model: nn.Module, size: int) -> tuple[fx.GraphModule, torch.Tensor]:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    _, converted = pruned_converted(model, x)
    return converted, x


def _unit(gm: fx.GraphModule) -> float:
    """One input-LSB unit of the last integer layer (its float output moves at most this much
    when every input code moves by one LSB)."""
    last = [m for m in gm.modules() if isinstance(m, (im.IntConv2d, im.IntLinear))][-1]
    w = last.weight.detach().double().abs().reshape(last.weight.shape[0], -1).sum(1)
    return float((last.in_scale * last.w_scale.detach().double().reshape(-1) * w).max())


def _check_tvm(converted: fx.GraphModule, x: torch.Tensor) -> float:
    """Build for x86, run two inputs; return the largest |diff| (asserted within one unit)."""
    tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    worst = 0.0
    for seed in (1, 2):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        got, want = compiled(inp), converted(inp)
        assert got.shape == want.shape and got.dtype == want.dtype
        worst = max(worst, float((got.double() - want.double()).abs().max()))
    assert worst <= _unit(converted) * 1.01, worst
    return worst


def _check_onnx(converted: fx.GraphModule, x: torch.Tensor, tmp_path: Path) -> dict[str, Any]:
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export, verify

    report = verify(converted, export(converted, tmp_path / "m.onnx", (x,)), (x,))
    assert report["max_lsb_per_op"] <= 1
    assert report["outputs"][0].get("max_unit_ratio", 0.0) <= 1.01
    return report


SWIN_CASES = [("v1", 32), ("v1", 44), ("v2", 32)]


@pytest.mark.parametrize(("version", "size"), SWIN_CASES, ids=[f"{v}-{s}" for v, s in SWIN_CASES])
def test_swin_tvm(version: str, size: int) -> None:
    converted, x = _converted(_swin(version == "v2"), size)
    floats = set(converted_record(converted).float_ops)
    assert {"shifted_window_attention", "_get_relative_position_bias"} <= floats
    _check_tvm(converted, x)  # bit-exact on the developers' machine; the bound is one unit


@pytest.mark.parametrize(("version", "size"), SWIN_CASES, ids=[f"{v}-{s}" for v, s in SWIN_CASES])
def test_swin_onnx(version: str, size: int, tmp_path: Path) -> None:
    converted, x = _converted(_swin(version == "v2"), size)
    _check_onnx(converted, x, tmp_path)


def test_swin_v2_position_bias_mlp_is_folded() -> None:
    """Swin V2's position-bias MLP runs on a constant table: both backends take its float
    result from the reference executor once (``lowering.constant_subgraphs``) instead of
    lowering its integer linears (TVM's FoldConstant would compile a written x86 kernel for a
    generic CPU and abort the process)."""
    from djpq_compiler.backends.lowering import constant_subgraphs

    converted, _ = _converted(_swin(True), 32)
    folded, skipped = constant_subgraphs(converted)
    names = {n.name for n in folded}
    assert names == {"mul", "mul_1", "mul_2", "mul_3"}  # 16 * sigmoid(bias), one per block
    assert any(n.name.startswith("djpq_int_linear_features_1_0_attn_cpb_mlp") for n in skipped)
    assert not any(n.target in SWIN_ATTENTION for n in [*folded, *skipped])


def test_maxvit_tvm_and_onnx(tmp_path: Path) -> None:
    """A tiny MaxViT (MBConv with SE, block and grid attention via ``torch.einsum``)."""
    converted, x = _converted(_maxvit(), 32)
    assert any("einsum" in name for name in converted_record(converted).float_ops)
    _check_onnx(converted, x, tmp_path)
    _check_tvm(converted, x)


class _PadRollEinsum(nn.Module):
    """``F.pad`` and ``torch.roll`` on integer codes, ``torch.einsum`` of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.c, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.nn.functional.pad(x, (1, 2, 0, 1))
        x = torch.roll(self.b(x), shifts=(2, -1), dims=(2, 3))
        gate = torch.einsum("b c h w, b c h w -> b h w", x, self.c(x)).unsqueeze(1)
        return self.head(x * gate)


def test_pad_roll_einsum(tmp_path: Path) -> None:
    converted, x = _converted(_PadRollEinsum().eval(), 12)
    targets = {n.target for n in converted.graph.nodes}
    assert {torch.nn.functional.pad, torch.roll, torch.einsum} <= targets
    _check_onnx(converted, x, tmp_path)
    _check_tvm(converted, x)


def _with_training_dropout(converted: fx.GraphModule) -> fx.GraphModule:
    node = next(n for n in converted.graph.nodes if n.target in SWIN_ATTENTION)
    node.kwargs = {**node.kwargs, "attention_dropout": 0.1, "training": True}
    converted.recompile()
    return converted


def test_window_attention_in_training_mode_is_refused(tmp_path: Path) -> None:
    """Dropout in a traced training-mode attention zeroes random values: both backends refuse
    it, naming the node, instead of dropping it silently."""
    pytest.importorskip("onnx")
    from djpq_compiler.backends.onnx import export
    from djpq_compiler.backends.tvm.emit import lower

    converted, x = _converted(_swin(False), 32)
    converted = _with_training_dropout(converted)
    with pytest.raises(BackendError, match="shifted_window_attention.*training=True"):
        export(converted, tmp_path / "m.onnx", (x,))
    pytest.importorskip("tvm")
    with pytest.raises(BackendError, match="shifted_window_attention.*training=True"):
        lower(converted, (x,))
