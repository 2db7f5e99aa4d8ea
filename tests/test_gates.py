"""VIB gate: sampling statistics, hard gates, shared noise per step, index gather, penalty."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from djpq_compiler.config import GateSpec
from djpq_compiler.errors import ConfigError, PruningError, QuantizationError
from djpq_compiler.modules import VIBGate, attach_step_hook


def _gate(mu: list[float], log_sigma2: list[float], threshold: float = 1.0) -> VIBGate:
    gate = VIBGate(len(mu), threshold=threshold)
    with torch.no_grad():
        gate.mu.copy_(torch.tensor(mu))
        gate.log_sigma2.copy_(torch.tensor(log_sigma2))
    return gate


class _TwoProducers(nn.Module):
    """Two producers of one channel group sharing a gate; channels map to atoms via index."""

    def __init__(self, gate: VIBGate, index: torch.Tensor) -> None:
        super().__init__()
        self.gate = gate
        self.register_buffer("index", index)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(a), self.gate(b, self.index)


def test_initial_gates_are_open_and_near_one() -> None:
    gate = VIBGate(64)
    assert bool(((gate.mu - 1).abs() <= 0.01).all())
    assert bool((gate.log_sigma2 == -9.0).all())
    assert gate.n_kept() == 64 and bool(gate.keep_mask().all())


def test_sampling_mean_and_std_match_mu_and_sigma() -> None:
    torch.manual_seed(0)
    gate = _gate([1.0, -0.5, 2.0], [math.log(0.04), math.log(0.25), 0.0])
    z = gate.sample(20000).detach()
    assert z.shape == (20000, 3)
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -0.5, 2.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([0.2, 0.5, 1.0]), atol=0.03, rtol=0)


def test_training_noise_is_per_sample_and_channel_and_broadcast_over_space() -> None:
    torch.manual_seed(1)
    gate = _gate([1.0, 1.0], [0.0, 0.0])
    out = gate(torch.ones(4, 2, 3, 3))
    per_map = out[:, :, :1, :1]
    assert torch.equal(out, per_map.expand_as(out))  # same z over H x W
    assert per_map.flatten().unique().numel() == 8  # distinct per sample and channel


def test_eval_mask_keeps_log_alpha_above_log_tau() -> None:
    gate = _gate([2.0, 0.5, -3.0], [0.0, 0.0, 0.0])  # log alpha = log 4, log 0.25, log 9
    gate.eval()
    assert gate.keep_mask().tolist() == [True, False, True]
    assert gate.n_kept() == 2
    out = gate(torch.ones(2, 3, 5))
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0, -3.0]).reshape(1, 3, 1).expand(2, 3, 5))
    strict = _gate([2.0, 0.5, -3.0], [0.0, 0.0, 0.0], threshold=5.0)  # log 4 < log 5
    assert strict.keep_mask().tolist() == [False, False, True]


def test_deterministic_switch_gives_hard_gates_in_training_mode() -> None:
    gate = _gate([2.0, 0.5], [0.0, 0.0])
    gate.deterministic = True
    assert gate.training and not gate.stochastic
    out = gate(torch.ones(3, 2))
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0]]).expand(3, 2))


def test_producers_of_a_group_share_noise_within_one_step() -> None:
    torch.manual_seed(2)
    model = _TwoProducers(_gate([1.0, 1.0], [0.0, 0.0]), torch.tensor([0, 1]))
    handle = attach_step_hook(model)
    x = torch.ones(5, 2, 4)
    a1, b1 = model(x, x)
    assert torch.equal(a1, b1)
    a2, _ = model(x, x)
    assert not torch.equal(a1, a2)  # a new step draws new noise
    handle.remove()
    a3, b3 = model(x, x)
    assert not torch.equal(a3, b3)  # without the hook every call draws fresh noise


def test_batch_size_mismatch_within_a_step_raises() -> None:
    gate = VIBGate(2)
    gate.new_step()
    gate(torch.ones(4, 2))
    with pytest.raises(PruningError, match="batch"):
        gate(torch.ones(3, 2))


def test_index_gathers_atoms_for_each_channel() -> None:
    torch.manual_seed(3)
    gate = _gate([2.0, 0.5], [0.0, 0.0])
    index = torch.tensor([0, 0, 1, 1, 0])
    gate.new_step()
    out = gate(torch.ones(6, 5, 2), index)
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 0], out[:, 4])
    torch.testing.assert_close(out[:, 2], out[:, 3])
    assert not torch.equal(out[:, 0], out[:, 2])
    gate.eval()
    torch.testing.assert_close(
        gate(torch.ones(1, 5), index), torch.tensor([[2.0, 2.0, 0.0, 0.0, 2.0]])
    )


def test_channel_dim_last_for_token_inputs() -> None:
    gate = _gate([2.0, 0.5, 3.0], [0.0, 0.0, 0.0]).eval()
    out = gate(torch.ones(2, 4, 3), dim=-1)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0, 3.0]).expand(2, 4, 3))


@pytest.mark.parametrize(
    ("shape", "index", "dim"),
    [
        ((2, 3), None, 1),  # 3 channels, 2 atoms, no index
        ((2, 3), torch.tensor([0, 1]), 1),  # index too short
        ((2, 3), torch.tensor([0.0, 1.0, 1.0]), 1),  # not a LongTensor
        ((2, 2), None, 0),  # batch dim
        ((2,), None, 1),  # no batch
    ],
)
def test_bad_inputs_raise_pruning_error(
    shape: tuple[int, ...], index: torch.Tensor | None, dim: int
) -> None:
    with pytest.raises(PruningError, match="VIBGate"):
        VIBGate(2)(torch.ones(shape), index, dim)


def test_kl_value_and_gradients_reach_mu_and_log_sigma2() -> None:
    mu, ls2 = torch.tensor([1.0, -0.3, 0.0]), torch.tensor([-1.0, 0.5, 0.0])
    gate = _gate(mu.tolist(), ls2.tolist())
    kl = gate.kl()
    alpha = mu**2 / ls2.exp()
    torch.testing.assert_close(kl, 0.5 * torch.log1p(alpha))
    kl.sum().backward()
    assert gate.mu.grad is not None and gate.log_sigma2.grad is not None
    torch.testing.assert_close(gate.mu.grad, mu / (ls2.exp() + mu**2))
    torch.testing.assert_close(gate.log_sigma2.grad, -0.5 * alpha / (1 + alpha))
    assert bool(torch.isfinite(gate.mu.grad).all())  # finite at mu = 0


def test_soft_keep_is_sigmoid_of_scaled_log_alpha() -> None:
    gate = _gate([2.0, 0.5], [0.0, 0.0], threshold=2.0)
    expected = torch.sigmoid((torch.log(torch.tensor([4.0, 0.25])) - math.log(2.0)) / 0.5)
    torch.testing.assert_close(gate.soft_keep(0.5), expected)
    with pytest.raises(ConfigError, match="temperature"):
        gate.soft_keep(0.0)


def test_check_finite_names_the_gate() -> None:
    gate = VIBGate(3)
    gate.check_finite("layer1.gate")
    with torch.no_grad():
        gate.log_sigma2[1] = math.inf
    with pytest.raises(QuantizationError, match=r"layer1\.gate.*log_sigma2.*\[1\]"):
        gate.check_finite("layer1.gate")


def test_step_hook_survives_deepcopy_and_pickle() -> None:
    model = _TwoProducers(VIBGate(2), torch.tensor([1, 0]))
    attach_step_hook(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        x = torch.ones(3, 2)
        a, b = clone(x, x)
        torch.testing.assert_close(a, b.flip(1))


def test_from_spec_and_bad_arguments() -> None:
    gate = VIBGate.from_spec(4, GateSpec(mu_init=2.0, log_sigma2_init=-5.0, threshold=3.0))
    assert gate.threshold == 3.0 and bool((gate.log_sigma2 == -5.0).all())
    for kwargs in ({"threshold": 0.0}, {"mu_jitter": -1.0}, {"mu_init": math.nan}):
        with pytest.raises(ConfigError):
            VIBGate(2, **kwargs)
    with pytest.raises(ConfigError, match="n_atoms"):
        VIBGate(0)
