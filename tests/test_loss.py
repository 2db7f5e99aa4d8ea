"""djpq_loss: values at initialisation, gradients, and that optimizing it lowers the soft BOPs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import InvertedResidual, Residual
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.config import DJPQConfig, Override, QuantSpec
from djpq_compiler.errors import ConfigError
from djpq_compiler.loss import fp32_bops
from djpq_compiler.prepared import gates, prepared_layers, quantizers
from djpq_compiler.records import prepared_record

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _prepare(model: nn.Module, **cfg: object) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return djpq.prepare(model.eval(), X, DJPQConfig(**cfg))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["vib_bops", "soft_bops"])
@pytest.mark.parametrize("factory", [Residual, InvertedResidual])
def test_gradients_reach_gates_and_quantizers(factory: type[nn.Module], kind: str) -> None:
    gm = _prepare(factory())
    loss = djpq.djpq_loss(gm, kind)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, g in gates(gm):
        for p in (g.mu, g.log_sigma2):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # every quantizer a layer's BOPs depend on (its weights, its input); add/concat quantizers
    # cost no BOPs and learn from the task loss alone
    costed = set(prepared_record(gm).quantizers.weight.values()) | set(
        prepared_record(gm).quantizers.input.values())
    for name, q in quantizers(gm):
        if q.fixed_bits:  # the network input: fixed input_bits, nothing to learn
            assert name == "djpq_quant.a_x"
            continue
        if name not in costed:
            assert p_grad_none(q), name
            continue
        for p in (q.log_d, q.log_q_max):
            assert p is not None and p.grad is not None and p.grad.abs() > 0, name


def p_grad_none(q: nn.Module) -> bool:
    return all(p.grad is None for p in q.parameters())


def test_quantize_only_loss_is_the_bops_ratio() -> None:
    gm = _prepare(Residual(), prune=False)
    expected = djpq.bops(gm).total / fp32_bops(gm)  # 8x8 bits everywhere: 1/16
    assert expected == pytest.approx(1 / 16)
    for kind in ("vib_bops", "soft_bops"):
        assert djpq.djpq_loss(gm, kind).item() == pytest.approx(expected, rel=1e-4)


def test_prune_only_soft_bops_starts_at_one_and_vib_is_weighted_kl() -> None:
    gm = _prepare(Residual(), quantize=False)
    assert djpq.djpq_loss(gm, "soft_bops").item() == pytest.approx(1.0, abs=1e-3)
    # at init 0.5*log(1+alpha) ~ 0.5*(log mu^2 + 9) ~ 4.5 per gated channel; the fc output
    # (network output, ungated) counts 1 per channel
    vib = djpq.djpq_loss(gm, "vib_bops").item()
    assert 1.0 < vib < 4.6


def test_default_kind_comes_from_the_config() -> None:
    gm = _prepare(Residual(), loss_kind="soft_bops")
    assert djpq.djpq_loss(gm).item() == djpq.djpq_loss(gm, "soft_bops").item()


@pytest.mark.parametrize("kind", ["vib_bops", "soft_bops"])
def test_optimizing_the_loss_alone_lowers_the_soft_bops(kind: str) -> None:
    gm = _prepare(Residual())
    groups = djpq.param_groups(gm, weight_lr=0.0, djpq_lr=0.05)
    opt = torch.optim.Adam([g for g in groups if g["name"] == "djpq"])
    before = djpq.djpq_loss(gm, "soft_bops").item()
    for _ in range(15):
        opt.zero_grad()
        djpq.djpq_loss(gm, kind).backward()
        opt.step()
    after = djpq.djpq_loss(gm, "soft_bops").item()
    assert after < 0.9 * before


def test_bad_arguments() -> None:
    gm = _prepare(Residual())
    with pytest.raises(ConfigError, match="kind"):
        djpq.djpq_loss(gm, "bops")
    with pytest.raises(ConfigError, match="temperature"):
        djpq.djpq_loss(gm, temperature=0.0)
    with pytest.raises(ConfigError, match="prepare"):
        djpq.djpq_loss(Residual())


# ----------------------------------------------------------- per-layer strength (gamma_scale)
#: (overrides as {match: gamma_scale}, the factor each InvertedResidual layer's term gets).
#: Layer report names: stem, expand, dw, project, head.
PER_LAYER_SCALES = [
    ({}, {"stem": 1.0, "expand": 1.0, "dw": 1.0, "project": 1.0, "head": 1.0}),
    ({"dw": 0.5, "head": 2.0}, {"stem": 1.0, "expand": 1.0, "dw": 0.5, "project": 1.0,
                                "head": 2.0}),
    ({"*": 3.0}, {"stem": 3.0, "expand": 3.0, "dw": 3.0, "project": 3.0, "head": 3.0}),
    ({"*": 0.0, "expand": 1.5}, {"stem": 0.0, "expand": 1.5, "dw": 0.0, "project": 0.0,
                                 "head": 0.0}),
]


def _scaled(scales: dict[str, float], **cfg: object) -> torch.fx.GraphModule:
    overrides = tuple(Override(m, gamma_scale=s) for m, s in scales.items())
    return _prepare(InvertedResidual(), overrides=overrides, **cfg)


@pytest.mark.parametrize(("scales", "factors"), PER_LAYER_SCALES)
def test_gamma_scale_multiplies_each_layers_bops_term(scales: dict[str, float],
                                                      factors: dict[str, float]) -> None:
    """Quantize-only: R is the BOPs ratio, so each layer's term is its BOPs row / FP32 BOPs."""
    gm = _scaled(scales, prune=False)
    assert {r.name: r.gamma_scale for r in prepared_layers(gm)} == factors
    rows = {r.name: r.bops for r in djpq.bops(gm).rows}
    expected = sum(factors[name] * b for name, b in rows.items()) / fp32_bops(gm)
    for kind in ("vib_bops", "soft_bops"):
        assert djpq.djpq_loss(gm, kind).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["vib_bops", "soft_bops"])
@pytest.mark.parametrize(("scales", "factors"), PER_LAYER_SCALES)
def test_gamma_scale_is_linear_in_the_layer_terms_with_gates(
        kind: str, scales: dict[str, float], factors: dict[str, float]) -> None:
    """With gates and bits: R(scales) = sum_l s_l * R(only layer l, scale 1)."""
    one_hot = {name: djpq.djpq_loss(_scaled({"*": 0.0, name: 1.0}), kind).item()
               for name in factors}
    expected = sum(factors[name] * term for name, term in one_hot.items())
    assert djpq.djpq_loss(_scaled(scales), kind).item() == pytest.approx(expected, rel=1e-5)
    assert sum(one_hot.values()) == pytest.approx(djpq.djpq_loss(_scaled({}), kind).item(),
                                                  rel=1e-5)


def test_gamma_scale_scales_the_gradient_of_the_layers_own_parameters() -> None:
    """Halving the depthwise conv's term halves the regulariser's gradient on its weight
    quantizer (the only term that quantizer's step appears in)."""
    grads = []
    for scale in (1.0, 0.5):
        gm = _scaled({"dw": scale})
        djpq.djpq_loss(gm).backward()
        path = prepared_record(gm).quantizers.weight["dw"]
        grads.append(gm.get_submodule(path).log_d.grad.item())
    assert grads[1] == pytest.approx(0.5 * grads[0], rel=1e-5)


@pytest.mark.parametrize(("bind", "lowest"), [(False, None), (True, 4.0)])
def test_a_bound_weight_floor_holds_while_the_regulariser_trains(bind: bool,
                                                                 lowest: float | None) -> None:
    """``QuantSpec(min_bits=4, bind_min_bits=True)`` on the depthwise conv: minimizing R alone
    takes every other weight below 4 bits, that one stops at 4 (unbound, it goes below too)."""
    floor = QuantSpec(bits=5, min_bits=4, bind_min_bits=bind)
    gm = _prepare(InvertedResidual(), weight=QuantSpec(bits=5),
                  overrides=(Override("dw", weight=floor),))
    groups = djpq.param_groups(gm, weight_lr=0.0, djpq_lr=0.1)
    opt = torch.optim.Adam([g for g in groups if g["name"] == "djpq"])
    for _ in range(30):
        opt.zero_grad()
        djpq.djpq_loss(gm).backward()
        opt.step()
    paths = prepared_record(gm).quantizers.weight
    bits = {name: gm.get_submodule(p).bits().item() for name, p in paths.items()}
    assert all(b < 4.0 for name, b in bits.items() if name != "dw"), bits
    if lowest is None:
        assert bits["dw"] < 4.0
    else:
        assert bits["dw"] == pytest.approx(lowest, abs=1e-5)
        assert gm.get_submodule(paths["dw"]).readout_bits() == 4
