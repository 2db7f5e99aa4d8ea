"""convert(): exact float pruning, integer model within 1 LSB of fake-quant, BOPs, bad input."""

from __future__ import annotations

import copy

import pytest
import tiny_models as T
import torch
from torch import nn

import djpq_compiler as djpq
from djpq_compiler import ConfigError, QuantizationError
from djpq_compiler.config import DJPQConfig, QuantSpec
from djpq_compiler.convert import convert
from djpq_compiler.prepared import gates, set_gates_deterministic, set_quantizers
from djpq_compiler.records import converted_record
from djpq_compiler.verify import integer_agreement
from djpq_compiler.workflows import zoo


def _prepare(model: nn.Module, x: torch.Tensor, seed: int = 0,
             config: DJPQConfig | None = None) -> torch.fx.GraphModule:
    """A prepared model whose gates prune ~30-70 % of every group, with jittered mu."""
    torch.manual_seed(seed)
    p = djpq.prepare(model.eval(), x, config)
    gen = torch.Generator().manual_seed(seed)
    for _, gate in gates(p):
        with torch.no_grad():
            frac = float(torch.empty(()).uniform_(0.3, 0.7, generator=gen))
            gate.mu[torch.rand(gate.mu.shape, generator=gen) < frac] = 1e-3
            gate.mu.mul_(torch.empty(gate.mu.shape).uniform_(0.5, 1.5, generator=gen))
            gate.mu[0] = 1.0  # never prune a whole group
    return p.eval()


def _float_error(p: torch.fx.GraphModule, x: torch.Tensor) -> float:
    ref = copy.deepcopy(p)
    set_quantizers(ref, False)
    set_gates_deterministic(ref, True)
    with torch.no_grad():
        a, b = ref(x), convert(p, integer=False)(x)
    return float((a - b).abs().max() / a.abs().max())


CASES = [
    ("Residual", lambda: T.Residual(), (4, 3, 8, 8)),
    ("InvertedResidual", lambda: T.InvertedResidual(), (4, 3, 8, 8)),
    ("Concat", lambda: T.Concat(), (4, 3, 8, 8)),
    ("SqueezeExcite", lambda: T.SqueezeExcite(), (4, 3, 8, 8)),
    ("FlattenLinear", lambda: T.FlattenLinear(), (4, 1, 6, 6)),
    ("resnet20", lambda: zoo.get_model("resnet20"), (4, 1, 28, 28)),
    ("mobilenetv2", lambda: zoo.get_model("mobilenetv2"), (4, 1, 28, 28)),
    ("vgg7", lambda: zoo.get_model("vgg7"), (4, 1, 28, 28)),
    ("inception", lambda: zoo.get_model("inception"), (4, 1, 28, 28)),
]


@pytest.mark.parametrize("name,factory,shape", CASES, ids=[c[0] for c in CASES])
def test_float_convert_equals_hard_gated_model(name: str, factory: object,
                                               shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    p = _prepare(factory(), x)  # type: ignore[operator]
    assert _float_error(p, x) < 1e-5


@pytest.mark.parametrize("name,factory,shape", CASES, ids=[c[0] for c in CASES])
def test_integer_model_within_one_lsb_of_fake_quant(name: str, factory: object,
                                                    shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    p = _prepare(factory(), x, seed=1)  # type: ignore[operator]
    converted = convert(p)
    lsb = integer_agreement(p, converted, x)
    assert lsb and max(lsb.values()) <= 1, lsb
    if not converted_record(converted).float_ops:
        assert djpq.bops(converted).total == djpq.bops(p).total


def test_mixed_bits_and_physical_pruning() -> None:
    x = torch.randn(4, 1, 28, 28)
    cfg = DJPQConfig(weight=QuantSpec(bits=4), activation=QuantSpec(bits=6))
    p = _prepare(zoo.get_model("resnet20"), x, config=cfg)
    converted = convert(p)
    assert max(integer_agreement(p, converted, x).values()) <= 1
    report = djpq.bops(converted)
    assert report.total == djpq.bops(p).total
    assert {r.b_w for r in report.rows[1:-1]} == {4}  # first/last follow the same global spec
    assert all(r.out_kept < r.out_total for r in report.rows[:-1])  # every gated layer shrank
    params = {n: m for n, m in converted.named_modules() if hasattr(m, "weight")}
    assert all(m.weight.dtype == torch.int64 for m in params.values())


def test_convert_leaves_prepared_untouched_and_refuses_twice() -> None:
    x = torch.randn(2, 3, 8, 8)
    p = _prepare(T.Residual(), x)
    before = p(x)
    converted = convert(p)
    assert torch.equal(p(x), before)
    with pytest.raises(ConfigError, match="convert"):
        convert(converted)
    with pytest.raises(ConfigError, match="prepare"):
        convert(T.Residual())


def test_group_pruned_to_nothing_keeps_one_channel_and_warns() -> None:
    x = torch.randn(2, 3, 8, 8)
    p = _prepare(T.Residual(), x)
    for _, gate in gates(p):
        with torch.no_grad():
            gate.mu.fill_(1e-4)
    with pytest.warns(UserWarning, match="would prune every channel"):
        converted = convert(p, integer=False)
    assert converted.conv1.out_channels == 1


def test_nan_parameters_are_refused() -> None:
    x = torch.randn(2, 3, 8, 8)
    p = _prepare(T.Residual(), x)
    with torch.no_grad():
        next(gates(p))[1].mu[0] = float("nan")
    with pytest.raises(QuantizationError, match="djpq_gates"):
        convert(p)


def test_per_channel_weight_quantizer_is_refused() -> None:
    x = torch.randn(2, 3, 8, 8)
    cfg = DJPQConfig(weight=QuantSpec(bits=8, per_channel=True))
    p = _prepare(T.Residual(), x, config=cfg)
    with pytest.raises(QuantizationError, match="per-channel"):
        convert(p)


tv = pytest.importorskip("torchvision")
TORCHVISION = ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "googlenet",
               "shufflenet_v2_x0_5", "regnet_x_400mf", "convnext_tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_convert(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64 if name == "googlenet" else 32, 64 if name == "googlenet" else 32)
    p = _prepare(tv.models.get_model(name, weights=None), x)
    assert _float_error(p, x) < 1e-4
    converted = convert(p)
    assert max(integer_agreement(p, converted, x).values()) <= 1


def test_model_size_counts_packed_bits() -> None:
    from djpq_compiler.size import model_size

    x = torch.randn(2, 1, 28, 28)
    cfg = DJPQConfig(weight=QuantSpec(bits=4), activation=QuantSpec(bits=8))
    p = _prepare(zoo.get_model("vgg7"), x, config=cfg)
    report = model_size(convert(p))
    fp32 = 4 * sum(q.numel() for q in zoo.get_model("vgg7").parameters())
    assert report.fp32_bytes == fp32
    weights = [r for r in report.rows if r.name.endswith(".weight")]
    assert weights and all(r.bits == 4 and r.bytes == (r.params * 4 + 7) // 8 for r in weights)
    assert report.ratio > 8  # 4-bit packed weights and pruned channels vs float32


def test_round_to_rounds_kept_channels_up_everywhere() -> None:
    x = torch.randn(2, 1, 28, 28)
    p = _prepare(zoo.get_model("vgg7"), x, config=DJPQConfig(round_to=8))
    converted = convert(p, integer=False)
    convs = [m for m in converted.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert djpq.bops(p).rows[0].out_kept % 8 == 0
