"""DJPQ fine-tuning loop: budgets, logs, regulariser effect, deployed-form accuracy."""

from __future__ import annotations

import pytest
import tiny_models as T
import torch
from torch.utils.data import DataLoader, TensorDataset

import djpq_compiler as djpq
from djpq_compiler import ConfigError
from djpq_compiler.convert import convert
from djpq_compiler.finetune import FinetuneConfig, accuracy, finetune


def _data(n: int = 64) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def test_regulariser_lowers_bops_and_model_still_converts() -> None:
    torch.manual_seed(0)
    loader = _data()
    prepared = djpq.prepare(T.Residual().eval(), next(iter(loader))[0])
    before = djpq.bops(prepared).total
    logs = finetune(prepared, loader, FinetuneConfig(gamma=5.0, steps=40, minutes=None,
                                                     djpq_lr=0.1, log_every=10),
                    progress=False)
    assert [log.step for log in logs] == [10, 20, 30, 40]
    assert djpq.bops(prepared).total < before  # bits and/or channels went down
    assert logs[-1].regularizer < logs[0].regularizer
    converted = convert(prepared)
    assert 0.0 <= accuracy(converted, loader) <= 1.0
    assert djpq.bops(converted).total == djpq.bops(prepared).total


def test_budget_is_required_and_validated() -> None:
    with pytest.raises(ConfigError, match="steps or minutes"):
        FinetuneConfig(steps=None, minutes=None)
    with pytest.raises(ConfigError, match="gamma"):
        FinetuneConfig(gamma=-1.0)
