"""Training utilities: seeding, evaluation, one epoch with a regularizer, fit, schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from djpq_compiler.errors import ConfigError
from djpq_compiler.workflows import train


def blobs(n: int = 256, seed: int = 0) -> TensorDataset:
    """Two well-separated Gaussian blobs as (N, 1, 2, 2) 'images', labels 0/1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centers = torch.tensor([[-2.0, -2.0, 2.0, 2.0], [2.0, 2.0, -2.0, -2.0]])[labels]
    x = centers + 0.5 * torch.randn(n, 4, generator=g)
    return TensorDataset(x.reshape(n, 1, 2, 2), labels)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 2))


class Oracle(nn.Module):
    """Predicts class 1 iff the first pixel is positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x.flatten(1)[:, 0]
        return torch.stack([-first, first], dim=1)


def test_seed_everything_reproduces_torch_rng() -> None:
    train.seed_everything(123)
    a = torch.randn(5)
    train.seed_everything(123)
    assert torch.equal(a, torch.randn(5))


def test_evaluate_counts_exactly() -> None:
    x = torch.tensor([[1.0], [-1.0], [2.0], [-3.0]]).reshape(4, 1, 1, 1)
    y = torch.tensor([1, 0, 0, 0])  # the oracle gets 3 of 4 right
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    model = Oracle().train()
    assert train.evaluate(model, loader) == pytest.approx(0.75)
    assert not model.training
    with pytest.raises(ConfigError):
        train.evaluate(model, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=2))


def test_fit_learns_separable_data() -> None:
    train.seed_everything(0)
    loader = DataLoader(blobs(), batch_size=32, shuffle=True)
    test = DataLoader(blobs(seed=1), batch_size=64)
    lines: list[str] = []
    result = train.fit(tiny_cnn(), loader, test, epochs=3, lr=0.05, progress=False,
                       log=lines.append, channels_last=True)
    assert len(result.epochs) == 3 and len(lines) == 3
    assert result.test_acc >= 0.98
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss


def _one_epoch(regularizer: train.Regularizer | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = tiny_cnn()
    loader = DataLoader(blobs(64), batch_size=16)
    opt = train.make_optimizer(model.parameters(), "sgd", lr=0.1, weight_decay=0.0)
    sched = train.make_scheduler(opt, "cosine", total_steps=len(loader))
    train.train_epoch(model, loader, opt, sched, regularizer=regularizer, progress=False)
    return model, opt


def test_train_epoch_adds_regularizer_and_steps_scheduler() -> None:
    calls: list[int] = []

    def shrink_fc(m: nn.Module) -> torch.Tensor:
        calls.append(1)
        return 2.0 * m[4].weight.pow(2).sum()

    plain, _ = _one_epoch(None)
    regularized, opt = _one_epoch(shrink_fc)
    assert len(calls) == 4  # once per batch
    assert regularized[4].weight.norm() < 0.5 * plain[4].weight.norm()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reached 0


def test_onecycle_and_adam() -> None:
    model = tiny_cnn()
    opt = train.make_optimizer(model.parameters(), "adam", lr=1e-2)
    sched = train.make_scheduler(opt, "onecycle", total_steps=10)
    assert sched is not None
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(1e-2, rel=0.05) and lrs[-1] < 0.1 * max(lrs)
    assert train.make_scheduler(opt, "none", total_steps=10) is None


@pytest.mark.parametrize("kwargs", [dict(name="rmsprop"), dict(lr=0.0)])
def test_bad_optimizer_settings(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        train.make_optimizer(tiny_cnn().parameters(), **kwargs)


def test_bad_schedule_and_epochs() -> None:
    opt = train.make_optimizer(tiny_cnn().parameters())
    with pytest.raises(ConfigError, match="schedule"):
        train.make_scheduler(opt, "step", total_steps=5)
    loader = DataLoader(blobs(8), batch_size=4)
    with pytest.raises(ConfigError, match="epochs"):
        train.fit(tiny_cnn(), loader, None, epochs=0)
