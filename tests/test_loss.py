"""djpq_loss: values at initialisation, gradients, and that optimizing it lowers the soft BOPs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import InvertedResidual, Residual
from torch import nn

import djpq_compiler as djpq
from djpq_compiler.config import DJPQConfig
from djpq_compiler.errors import ConfigError
from djpq_compiler.loss import fp32_bops
from djpq_compiler.prepared import gates, quantizers
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
