"""DJPQ fine-tuning loop: budgets, logs, regulariser effect, deployed-form accuracy."""

from __future__ import annotations

import dataclasses
import math

import pytest
import tiny_models as T
import torch
from torch.utils.data import DataLoader, TensorDataset

import djpq_compiler as djpq
from djpq_compiler import ConfigError
from djpq_compiler.convert import convert
from djpq_compiler.modules import DQQuantizer, VIBGate
from djpq_compiler.prepared import gates, quantizers, snap_quantizers
from djpq_compiler.verify import integer_agreement
from djpq_compiler.workflows.finetune import FinetuneConfig, accuracy, finetune


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


def test_finalize_phase_trains_the_deployed_network() -> None:
    """After the finalization phase the prepared model in eval mode *is* the deployed network:
    snapping again changes nothing, its outputs equal the converted float model's with quantizers
    at read-out bits, and only the weights trained during the phase."""
    torch.manual_seed(0)
    loader = _data()
    x = next(iter(loader))[0]
    prepared = djpq.prepare(T.Residual().eval(), x)
    for _, g in gates(prepared):  # close a few atoms so pruning really happens
        g.mu.data[:1] = 1e-3
    seen: list[tuple[int, bool]] = []
    finetune(prepared, loader, FinetuneConfig(gamma=5.0, steps=20, minutes=None, djpq_lr=0.1,
                                              log_every=5, finalize=0.5),
             progress=False, on_log=lambda log: seen.append((log.step, log.finalizing)))
    assert seen == [(5, False), (10, False), (15, True), (20, True)]
    frozen = [p for m in prepared.modules()
              if isinstance(m, (VIBGate, DQQuantizer))
              for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    for _, q in quantizers(prepared):
        bits = q.continuous_bits().detach()
        assert torch.allclose(bits, bits.round(), atol=1e-4), bits  # exactly at read-out bits
    with torch.no_grad():
        before = prepared.eval()(x)
        snap_quantizers(prepared)
        assert torch.equal(prepared(x), before)
    agreement = integer_agreement(prepared, convert(prepared), x)
    assert max(agreement.values()) <= 1, agreement
    assert djpq.bops(convert(prepared)).total == djpq.bops(prepared).total


def test_finalize_is_validated() -> None:
    with pytest.raises(ConfigError, match="finalize"):
        FinetuneConfig(finalize=1.0)


def test_cosine_schedule_decays_every_group_to_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[float]] = []
    adam_step = torch.optim.Adam.step

    def spy(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        seen.append([group["lr"] for group in self.param_groups])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    loader = _data()
    for schedule in ("constant", "cosine"):
        seen.clear()
        prepared = djpq.prepare(T.Residual().eval(), next(iter(loader))[0])
        finetune(prepared, loader, FinetuneConfig(steps=8, minutes=None, weight_lr=1e-3,
                                                  djpq_lr=0.1, schedule=schedule),
                 progress=False)
        assert len(seen) == 8 and sorted(seen[0]) == [1e-3, 0.1]
        if schedule == "constant":
            assert all(lrs == seen[0] for lrs in seen)
        else:
            for step, lrs in enumerate(seen):
                factor = 0.5 * (1 + math.cos(math.pi * step / 8))
                assert lrs == pytest.approx([lr * factor for lr in seen[0]])
            assert max(seen[-1]) < 0.04 * 0.1
    with pytest.raises(ConfigError, match="schedule"):
        FinetuneConfig(schedule="linear")


def test_distillation_loss_mixes_cross_entropy_and_the_teachers_soft_targets() -> None:
    from djpq_compiler.workflows.finetune import distillation_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=gen)
    target = torch.randint(0, 5, (8,), generator=gen)
    ce = torch.nn.functional.cross_entropy(logits, target)
    # weight 0: plain cross-entropy; a teacher equal to the model adds nothing (KL = 0)
    assert distillation_loss(logits, torch.randn(8, 5), target, 0.0, 2.0) == pytest.approx(ce)
    same = distillation_loss(logits, logits.clone(), target, 0.7, 2.0)
    assert float(same) == pytest.approx(0.3 * float(ce), rel=1e-5)
    # a different teacher costs more, and its gradient pulls the model's logits toward it
    teacher = torch.randn(8, 5, generator=gen) * 3
    student = logits.clone().requires_grad_(True)
    loss = distillation_loss(student, teacher, target, 1.0, 2.0)
    assert loss.item() > 0
    loss.backward()
    assert student.grad is not None
    moved = (student - 0.5 * student.grad).detach()
    assert float(distillation_loss(moved, teacher, target, 1.0, 2.0)) < loss.item()


def test_distillation_is_validated_and_needs_a_teacher() -> None:
    with pytest.raises(ConfigError, match="distill must be in"):
        FinetuneConfig(distill=1.5)
    with pytest.raises(ConfigError, match="distill_temperature"):
        FinetuneConfig(distill=0.5, distill_temperature=0.0)
    loader = _data()
    prepared = djpq.prepare(T.Residual().eval(), next(iter(loader))[0])
    config = FinetuneConfig(steps=2, minutes=None, distill=0.5)
    with pytest.raises(ConfigError, match="needs a teacher"):
        finetune(prepared, loader, config, progress=False)


def test_distilled_finetune_runs_the_teacher_in_eval_mode_without_training_it() -> None:
    torch.manual_seed(0)
    loader = _data()
    x = next(iter(loader))[0]
    teacher = T.Residual()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    calls: list[bool] = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(m.training))
    prepared = djpq.prepare(T.Residual().eval(), x)
    finetune(prepared, loader, FinetuneConfig(gamma=1.0, steps=4, minutes=None, distill=0.7),
             progress=False, teacher=teacher)
    assert calls == [False] * 4  # one eval-mode forward per step
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats and weights kept


class _Stop(Exception):
    pass


def _shuffled(n: int = 64) -> DataLoader:
    """A loader reshuffled every epoch by its own seeded generator (as ``make_loader``'s)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(1))


def _prepared() -> torch.nn.Module:
    torch.manual_seed(0)
    return djpq.prepare(T.Residual().eval(), next(iter(_data()))[0])


@pytest.mark.parametrize(("stop", "later_logs"), [(4, [8, 12]), (8, [12])])
def test_a_run_stopped_after_a_save_resumes_to_the_uninterrupted_result(
        tmp_path, stop: int, later_logs: list[int]) -> None:
    """Stopped at step 4 or 8 of 14 (after the save there), a freshly prepared model resumes from
    the state file and ends bit for bit where the run that was never stopped ends: the same
    weights, gates, quantizers, BN statistics, across epoch boundaries (4 batches an epoch,
    reshuffled), the sampled gates' noise (steps 5-7) and the finalization phase (from step 7:
    stopped at 8, the resumed model must be frozen as deployed before it trains on)."""
    config = FinetuneConfig(gamma=5.0, steps=14, minutes=None, djpq_lr=0.1, weight_lr=1e-3,
                            schedule="cosine", finalize=0.5, log_every=4)
    whole = _prepared()
    finetune(whole, _shuffled(), config, progress=False)

    saved = dataclasses.replace(config, state_file=str(tmp_path / "run.pt"), save_every=4)
    stopped = _prepared()

    def stop_there(log: object) -> None:
        if log.step == stop:  # type: ignore[attr-defined]
            raise _Stop

    with pytest.raises(_Stop):
        finetune(stopped, _shuffled(), saved, progress=False, on_log=stop_there)
    torch.manual_seed(123)  # the resumed run takes the saved RNG state, not the process's
    resumed = _prepared()
    logs = finetune(resumed, _shuffled(), saved, progress=False)
    assert [(log.step, log.finalizing) for log in logs] == [(s, True) for s in later_logs]
    want, got = whole.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [
        k for k in want if not torch.equal(want[k], got[k])]
    assert all(g.deterministic for _, g in gates(resumed))  # finalizing: frozen as deployed
    # a finished state resumes to no further steps
    again = _prepared()
    assert finetune(again, _shuffled(), saved, progress=False) == []
    assert all(torch.equal(want[k], again.state_dict()[k]) for k in want)


def test_a_state_file_is_resumed_only_under_its_own_config(tmp_path) -> None:
    """A state saved under one recipe, a file that is no state, a state of another model and a
    wall-clock budget are refused with a message naming the file, the field and the way out."""
    with pytest.raises(ConfigError, match="needs a step budget"):
        FinetuneConfig(steps=10, minutes=1.0, state_file=str(tmp_path / "x.pt"))
    with pytest.raises(ConfigError, match="save_every must be >= 1"):
        FinetuneConfig(steps=10, minutes=None, state_file="x.pt", save_every=0)
    path = tmp_path / "run.pt"
    config = FinetuneConfig(gamma=1.0, steps=2, minutes=None, state_file=str(path))
    finetune(_prepared(), _data(), config, progress=False)
    assert path.exists() and not (tmp_path / "run.pt.tmp").exists()
    other = dataclasses.replace(config, gamma=2.0, log_every=7)  # log_every does not count
    with pytest.raises(ConfigError, match=r"run\.pt: it was saved under another config "
                                          r"\(gamma=1\.0, now 2\.0\); delete the file"):
        finetune(_prepared(), _data(), other, progress=False)
    torch.manual_seed(0)
    other_model = djpq.prepare(T.InvertedResidual().eval(), torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in other_model.state_dict().items()}
    with pytest.raises(ConfigError, match="saved for another model"):
        finetune(other_model, _data(), config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in other_model.state_dict().items())  # untouched
    fit_state = tmp_path / "fit.pt"  # format 1 too, but written by workflows.train.fit
    torch.save({"format": 1, "settings": {}, "epoch": 1, "log": [], "model": {},
                "optimizer": {}, "scheduler": None, "rng": {}}, fit_state)
    with pytest.raises(ConfigError, match=r"not a saved training state \(a resume state of "
                                          r"another loop\)"):
        finetune(_prepared(), _data(), dataclasses.replace(config, state_file=str(fit_state)),
                 progress=False)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a saved training state"):
        finetune(_prepared(), _data(), config, progress=False)
