"""A prepared model trains under DistributedDataParallel (gloo, 2 CPU processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import Residual
from torch.nn.parallel import DistributedDataParallel

import djpq_compiler as djpq

WORLD = 2
STEPS = 2


def _example() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(rank)  # different gate jitter per rank: DDP must broadcast rank 0's
        gm = djpq.prepare(Residual(), _example())
        model = DistributedDataParallel(gm)
        opt = torch.optim.SGD(djpq.param_groups(model, weight_lr=0.05, djpq_lr=0.01), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own batches
        for _ in range(STEPS):
            x = torch.randn(4, 3, 8, 8, generator=data)
            loss = model(x).square().mean() + 0.1 * djpq.djpq_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        djpq.check_finite(model)
        params = {k: v.detach().clone() for k, v in gm.named_parameters()}
        torch.save(params, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~30-50 s on 2 shared cores
def test_ddp_two_processes_stay_in_sync(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys()
    assert any("djpq_gates" in k for k in ranks[0]) and any("log_d" in k for k in ranks[0])
    for name, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][name], value, rtol=0, atol=0, msg=name)
    torch.manual_seed(0)  # rank 0's initial parameters
    start = dict(djpq.prepare(Residual(), _example()).named_parameters())
    for name in ("conv1.parametrizations.weight.original", "djpq_gates.g1.mu",
                 "djpq_quant.a_relu.log_d"):
        assert not torch.equal(ranks[0][name], start[name]), name  # training moved it
