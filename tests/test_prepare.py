"""prepare(): gate and quantizer placement, calibration, equivalence, state and helpers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import Concat, InvertedResidual, Residual
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.config import DJPQConfig, Override, QuantSpec
from djpq_compiler.errors import ConfigError, QuantizationError
from djpq_compiler.modules.gates import VIBGate
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.prepared import gates, quantizers
from djpq_compiler.records import converted_record, prepared_record, stage
from djpq_compiler.workflows.zoo import mobilenetv2_small, resnet20

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _prepare(model: nn.Module, x: torch.Tensor = X, **cfg: object) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return djpq.prepare(model.eval(), x, DJPQConfig(**cfg))  # type: ignore[arg-type]


def _gate_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and str(n.target).startswith("djpq_gates.")]


def _act_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return {str(n.target): n for n in gm.graph.nodes
            if n.op == "call_module" and str(n.target).startswith("djpq_quant.a_")}


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.w, padding=1))
        return self.fc(y.mean((2, 3)))


def test_gates_follow_bn_and_residual_group_shares_one_gate() -> None:
    gm = _prepare(Residual())
    placed = {n.args[0].name: str(n.target) for n in _gate_nodes(gm)}
    assert set(placed) == {"bn0", "bn1", "bn2"}  # after the BN, never directly after the conv
    assert placed["bn0"] == placed["bn2"]  # stem and conv2 feed one residual group
    assert placed["bn1"] != placed["bn0"]
    assert len(list(gates(gm))) == 2
    stem = next(n for n in gm.graph.nodes if n.name == "stem")
    assert [u.name for u in stem.users] == ["bn0"]
    bn0 = next(n for n in gm.graph.nodes if n.name == "bn0")
    assert [str(u.target) for u in bn0.users] == [placed["bn0"]]  # every user reads the gate


def test_gate_index_buffer_for_concat_members() -> None:
    gm = _prepare(Concat())
    nodes = {n.args[0].name: n for n in _gate_nodes(gm)}
    assert set(nodes) == {"a", "b"}
    assert nodes["a"].target == nodes["b"].target
    index_b = nodes["b"].args[1]
    assert index_b is not None and index_b.op == "get_attr"
    assert getattr(gm, str(index_b.target)).tolist() == [4, 5, 6, 7, 8, 9]
    assert nodes["b"].kwargs == {"dim": 1}
    assert "_djpq_gate_index_b" not in gm.state_dict()  # derived data, not state


def test_depthwise_conv_and_its_producer_share_a_gate() -> None:
    gm = _prepare(InvertedResidual())
    placed = {n.args[0].name: str(n.target) for n in _gate_nodes(gm)}
    assert placed["bn_e"] == placed["bn_d"]
    assert placed["stem"] == placed["bn_p"]  # residual: stem (no BN) and the projection


def test_quantizers_one_per_producer_shared_by_users() -> None:
    gm = _prepare(Residual())
    acts = _act_nodes(gm)
    # layer inputs (the fc input is quantized before the flatten, on the pooled producer), the
    # residual add's gated operand and the add's output (integer add needs integer operands),
    # and the average pool's input relu_2 (so the pool runs on integer codes)
    assert set(acts) == {"djpq_quant.a_x", "djpq_quant.a_relu", "djpq_quant.a_relu_1",
                         "djpq_quant.a_djpq_gates_g0_1", "djpq_quant.a_add",
                         "djpq_quant.a_relu_2", "djpq_quant.a_adaptive_avg_pool2d"}
    users = {u.name for u in acts["djpq_quant.a_relu"].users}
    assert users == {"conv1", "add"}  # conv1 and the residual read the same quantized tensor
    weights = dict(quantizers(gm))
    assert {k for k in weights if "parametrizations" in k} == {
        f"{m}.parametrizations.weight.0" for m in ("stem", "conv1", "conv2", "fc")}
    assert weights["djpq_quant.a_relu"].signed is False  # after ReLU: provably unsigned
    assert weights["djpq_quant.a_x"].signed is True  # randn input: calibrated signed
    assert weights["djpq_quant.a_x"].fixed_bits and weights["djpq_quant.a_x"].init_bits == 8
    assert all(weights[k].signed for k in weights if "parametrizations" in k)


def test_residual_add_and_concat_outputs_are_quantized() -> None:
    assert "djpq_quant.a_add" in _act_nodes(_prepare(InvertedResidual()))
    assert "djpq_quant.a_cat" in _act_nodes(_prepare(Concat()))


def test_calibration_sets_ranges_and_unsigned_from_data() -> None:
    gm = _prepare(Residual(), X.abs(), input_bits=6)
    q = dict(quantizers(gm))
    assert q["djpq_quant.a_x"].signed is False  # all observed inputs >= 0
    assert q["djpq_quant.a_x"].readout_bits() == 6
    q_in = float(q["djpq_quant.a_x"].q_max().detach())
    assert q_in == pytest.approx(float(X.abs().max()), rel=1e-5)
    w = gm.get_submodule("conv1").parametrizations.weight.original.detach()
    wq = q["conv1.parametrizations.weight.0"]
    assert float(wq.q_max().detach()) == pytest.approx(float(w.abs().max()), rel=1e-5)
    assert wq.readout_bits() == 8 and not wq.calibrating


def test_functional_layer_weight_gets_a_quantizer_node() -> None:
    gm = _prepare(Functional())
    conv = next(n for n in gm.graph.nodes if n.target is F.conv2d)
    assert conv.args[1].op == "call_module" and conv.args[1].target == "djpq_quant.w_w"
    assert conv.args[1].args[0].op == "get_attr"
    rec = prepared_record(gm).layers[0]
    assert rec.weight_quantizer == "djpq_quant.w_w" and rec.input_quantizer == "djpq_quant.a_x"


def _tiny_resnet() -> nn.Module:
    return resnet20(widths=(4, 8, 8), blocks=1)


def _tiny_mobilenet() -> nn.Module:
    return mobilenetv2_small(setting=((1, 8, 1, 1), (2, 8, 2, 1)), stem=8, last=16)


@pytest.mark.parametrize("factory,shape", [
    (Residual, (2, 3, 8, 8)), (InvertedResidual, (2, 3, 8, 8)), (Concat, (2, 3, 8, 8)),
    (_tiny_resnet, (2, 1, 12, 12)), (_tiny_mobilenet, (2, 1, 12, 12)),
])
def test_prepared_equals_original_with_quantizers_off_and_gates_open(factory, shape) -> None:
    torch.manual_seed(1)
    model = factory().eval()
    x = torch.randn(shape)
    gm = djpq.prepare(model, x).eval()
    djpq.set_quantizers(gm, enabled=False)
    djpq.open_gates(gm)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    djpq.set_quantizers(gm, enabled=True)
    assert not torch.equal(gm(x), model(x))  # the quantizers do act once enabled


def test_prepare_rejects_prepared_models_and_unknown_names() -> None:
    gm = _prepare(Residual())
    with pytest.raises(ConfigError, match="already prepared"):
        djpq.prepare(gm, X)
    with pytest.raises(ConfigError, match="conv9"):
        djpq.prepare(Residual(), X, DJPQConfig(overrides=(Override("conv9", prune=False),)))
    wrapped = nn.Sequential(nn.Conv2d(3, 3, 1), DQQuantizer(signed=True))
    with pytest.raises(ConfigError, match="DQQuantizer"):
        djpq.prepare(wrapped, X)


def test_config_switches_and_overrides() -> None:
    assert not list(quantizers(_prepare(Residual(), quantize=False)))
    assert not list(gates(_prepare(Residual(), prune=False)))
    gm = _prepare(Residual(), overrides=(Override("conv1", prune=False),))
    assert {n.args[0].name for n in _gate_nodes(gm)} == {"bn0", "bn2"}
    gm = _prepare(Residual(), ignore=("fc",))
    assert prepared_record(gm).layers[-1].weight_quantizer is None
    gm = _prepare(Residual(), fix_first_last_8bit=True, weight=QuantSpec(bits=4))
    q = dict(quantizers(gm))
    assert q["stem.parametrizations.weight.0"].fixed_bits
    assert q["conv1.parametrizations.weight.0"].readout_bits() == 4


def test_state_dict_round_trip_and_deepcopy() -> None:
    a = _prepare(Residual())
    with torch.no_grad():
        for _, g in gates(a):
            g.mu.uniform_(-1.0, 1.0)  # some gates closed, some negative
        for _, q in quantizers(a):
            q.log_q_max.add_(0.3)
    a.eval()
    b = _prepare(Residual()).eval()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(X), a(X), rtol=0, atol=0)
    c = copy.deepcopy(a)
    torch.testing.assert_close(c(X), a(X), rtol=0, atol=0)
    with torch.no_grad():
        next(g for _, g in gates(c)).mu.zero_()
    assert not torch.equal(c(X), a(X))  # the copy owns its parameters
    assert stage(c) == "prepared" and djpq.bops(c).total < djpq.bops(a).total


def test_train_samples_eval_is_deterministic() -> None:
    gm = _prepare(Residual())
    with torch.no_grad():
        for _, g in gates(gm):
            g.log_sigma2.fill_(-2.0)
    gm.train()
    assert not torch.equal(gm(X), gm(X))
    gm.eval()
    torch.testing.assert_close(gm(X), gm(X), rtol=0, atol=0)
    gm.train()
    djpq.set_gates_deterministic(gm, True)
    torch.testing.assert_close(gm(X), gm(X), rtol=0, atol=0)


def test_param_groups_partition_parameters() -> None:
    gm = _prepare(Residual())
    groups = djpq.param_groups(gm, weight_lr=0.1, djpq_lr=0.01, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    ours = {id(p) for m in gm.modules() if isinstance(m, (VIBGate, DQQuantizer))
            for p in m.parameters()}
    assert {id(p) for p in by_name["djpq"]["params"]} == ours
    assert len(by_name["weights"]["params"]) + len(ours) == len(list(gm.parameters()))
    assert by_name["djpq"]["weight_decay"] == 0.0 and by_name["weights"]["lr"] == 0.1
    torch.optim.SGD(groups, lr=0.5)  # accepted as is
    with pytest.raises(ConfigError):
        djpq.param_groups(gm, weight_lr=math.nan)


def test_check_finite_names_the_culprit() -> None:
    gm = _prepare(Residual())
    djpq.check_finite(gm)
    with torch.no_grad():
        gm.djpq_gates.g1.mu[2] = math.nan
    with pytest.raises(QuantizationError, match="djpq_gates.g1"):
        djpq.check_finite(gm)
    gm = _prepare(Residual())
    with torch.no_grad():
        gm.djpq_quant.a_relu.log_q_max.fill_(math.inf)
    with pytest.raises(QuantizationError, match="a_relu"):
        djpq.check_finite(gm)


def test_calibration_data_is_limited_to_calibration_batches() -> None:
    small, big = X.abs(), 10 * X.abs()
    for batches, expected in ((1, small), (2, big)):
        torch.manual_seed(0)
        gm = djpq.prepare(Residual().eval(), X, DJPQConfig(calibration_batches=batches),
                          calibration_data=iter([small, big, 100 * X]))
        q_max = float(gm.get_submodule("djpq_quant.a_x").q_max().detach())
        assert q_max == pytest.approx(float(expected.max()), rel=1e-5)


def test_pruned_float_model_can_be_prepared_again_integer_model_cannot() -> None:
    """Two-stage training: VIB-only, convert(integer=False), then a DQ-only stage on the pruned
    float model. An integer converted model is refused with a message saying so."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    stage1 = djpq.prepare(Residual().eval(), x, DJPQConfig(quantize=False))
    for _, g in gates(stage1):
        g.mu.data[:1] = 1e-3
    pruned = djpq.convert(stage1, integer=False)
    stage2 = djpq.prepare(pruned, x, DJPQConfig(prune=False))
    assert stage(stage2) == "prepared" and not list(gates(stage2))
    assert list(quantizers(stage2))
    converted = djpq.convert(stage2)
    assert djpq.bops(converted).total == djpq.bops(stage2).total
    with pytest.raises(ConfigError, match="already converted to integers.*integer=False"):
        djpq.prepare(converted, x)


def test_act_then_avg_pool_head_is_fully_integer() -> None:
    """conv -> ReLU6 -> global average pool -> linear (the MobileNetV2 head): the pool's input is
    quantized too, so the head lowers to integers instead of staying a float island."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    p = djpq.prepare(mobilenetv2_small().eval(), x)
    pool = next(n for n in p.graph.nodes if n.target == "pool")
    assert str(pool.args[0].target).startswith("djpq_quant.a_")  # quantizer before the pool
    converted = djpq.convert(p)
    assert converted_record(converted).float_ops == ()
