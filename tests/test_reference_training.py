"""Resumable reference training: a run stopped after epoch k and resumed ends where an
uninterrupted run ends (weights, optimizer, log), and a state refuses other settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from djpq_compiler.errors import ConfigError
from djpq_compiler.workflows import train
from djpq_compiler.workflows.data import RandomCropFlip

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "train_reference", ROOT / "benchmarks/reference_models/train_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = torch.randn(n, 1, 6, 6, generator=g) + labels.float()[:, None, None, None]
    return TensorDataset(x, labels)


def _loaders() -> tuple[DataLoader, DataLoader]:
    """Shuffled by a seeded generator, with random crop + flip (both RNG streams matter)."""
    train_loader = DataLoader(_data(), batch_size=16, shuffle=True,
                              generator=torch.Generator().manual_seed(3),
                              collate_fn=RandomCropFlip(padding=1, fill=0.0))
    return train_loader, DataLoader(_data(48, seed=1), batch_size=24)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.Flatten(), nn.Linear(64, 3))


def _fit(model: nn.Module, state: Path | None, **kwargs) -> train.FitResult:
    train.seed_everything(0)
    train_loader, test_loader = _loaders()
    return train.fit(model, train_loader, test_loader, epochs=4, lr=0.05, schedule="cosine",
                     progress=False, log=None, resume=state, **kwargs)


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _accs(result: train.FitResult) -> list[float]:
    return [e.test_acc for e in result.epochs]


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resume_after_epoch_k_matches_uninterrupted_run(tmp_path: Path, stop_after: int) -> None:
    reference = _model()
    full = _fit(reference, None)
    assert full.finished and len(full.epochs) == 4

    state = tmp_path / "state.pt"
    first = _fit(_model(), state, until=lambda e: e.epoch >= stop_after)
    assert not first.finished and len(first.epochs) == stop_after
    # a new process: fresh model (other init), RNGs seeded again; everything comes from the state
    torch.manual_seed(123)
    resumed_model = nn.Sequential(*_model())
    torch.manual_seed(456)
    resumed = _fit(resumed_model, state)
    assert resumed.finished and [e.epoch for e in resumed.epochs] == [1, 2, 3, 4]
    _same(reference, resumed_model)
    assert _accs(resumed) == _accs(full)
    assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in full.epochs]
    assert [e.lr for e in resumed.epochs] == [e.lr for e in full.epochs]
    assert resumed.epochs[-1].lr < 0.01 * 0.05  # the cosine reached its end
    saved = train.load_resume_state(state)
    assert saved["epoch"] == 4 and len(saved["log"]) == 4


def test_interrupted_by_an_exception_resumes_from_the_last_saved_epoch(tmp_path: Path) -> None:
    reference = _model()
    _fit(reference, None)
    state = tmp_path / "state.pt"

    def crash(line: str) -> None:  # the log line comes after the state is written
        if line.startswith("epoch 2/"):
            raise KeyboardInterrupt

    model = _model()
    train.seed_everything(0)
    train_loader, test_loader = _loaders()
    with pytest.raises(KeyboardInterrupt):
        train.fit(model, train_loader, test_loader, epochs=4, lr=0.05, schedule="cosine",
                  progress=False, log=crash, resume=state)
    assert train.load_resume_state(state)["epoch"] == 2
    model = _model()
    _fit(model, state)
    _same(reference, model)


def test_resume_state_refuses_other_settings_and_bad_files(tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    _fit(_model(), state, until=lambda e: True)
    train.seed_everything(0)
    train_loader, test_loader = _loaders()
    with pytest.raises(ConfigError, match="epochs: state 4 vs now 5"):
        train.fit(_model(), train_loader, test_loader, epochs=5, lr=0.05, schedule="cosine",
                  progress=False, log=None, resume=state)
    with pytest.raises(ConfigError, match="lr"):
        train.fit(_model(), train_loader, test_loader, epochs=4, lr=0.1, schedule="cosine",
                  progress=False, log=None, resume=state)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read resume state"):
        train.load_resume_state(bad)
    torch.save({"format": 999}, bad)
    with pytest.raises(ConfigError, match="not a resume state"):
        train.load_resume_state(bad)


def test_converged_rule() -> None:
    converged = _script().converged
    assert not converged([0.80, 0.90, 0.91])  # too short to tell
    assert converged([0.80, 0.90, 0.925, 0.9255, 0.9258, 0.9259])  # +0.09 pt in the last 3
    assert not converged([0.80, 0.90, 0.92, 0.925, 0.926, 0.93])  # +1.0 pt in the last 3
    assert converged([0.80, 0.93, 0.92, 0.925, 0.928])  # no gain over the best before


@pytest.mark.slow
def test_train_reference_cli_resumes_to_the_same_checkpoint(tmp_path: Path) -> None:
    from djpq_compiler.errors import DataError
    from djpq_compiler.workflows.data import fashion_mnist_loaders

    try:
        fashion_mnist_loaders(train_subset=8, test_subset=8)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")
    script = _script()
    common = ["--model", "vgg7", "--epochs", "3", "--schedule", "cosine", "--lr", "0.05",
              "--train-subset", "192", "--test-subset", "64", "--batch-size", "64"]
    assert script.main([*common, "--out", str(tmp_path / "full.pt")]) == 0
    state, log = tmp_path / "run" / "state.pt", tmp_path / "run" / "log.json"
    resumed = [*common, "--out", str(tmp_path / "resumed.pt"), "--state", str(state),
               "--log-json", str(log)]
    assert script.main([*resumed, "--stop-at-epoch", "1"]) == 0
    assert not (tmp_path / "resumed.pt").exists()
    record = json.loads(log.read_text())
    assert record["epochs_done"] == 1 and not record["finished"]
    assert script.main(resumed) == 0
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads(log.read_text())
    assert record["finished"] and record["epochs_done"] == 3
    assert len(record["epoch_log"]) == 3 and record["reloaded_test_acc"] >= 0.0
    summary = json.loads((tmp_path / "resumed.json").read_text())
    full = json.loads((tmp_path / "full.json").read_text())
    assert summary["test_acc"] == full["test_acc"]
    assert [e["test_acc"] for e in summary["epoch_log"]] == \
        [e["test_acc"] for e in full["epoch_log"]]
