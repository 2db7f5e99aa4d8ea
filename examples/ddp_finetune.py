"""DJPQ fine-tuning under DistributedDataParallel, launched with ``torchrun``.

::

    torchrun --standalone --nproc_per_node 2 examples/ddp_finetune.py --steps 40   # 2 CPU procs
    torchrun --standalone --nproc_per_node 8 examples/ddp_finetune.py --steps 2000 \\
        --batch-size 256 --train-subset 0                                         # 8 GPUs
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/ddp_finetune.py ...                                              # a cluster
    python examples/ddp_finetune.py --steps 5                                     # 1 process

What every process (rank) does:

1. Joins the process group from torchrun's environment: ``nccl`` with one GPU per process
   (``LOCAL_RANK``) when CUDA is available, ``gloo`` on CPU.
2. Builds the FP32 reference model and ``prepare`` s it with the same calibration batch on
   every rank (the first images of the unshuffled training set), so gates and quantizers start
   identical; wrapping in DDP also broadcasts rank 0's parameters and buffers.
3. Trains ``task loss + gamma * djpq_loss`` on its ``DistributedSampler`` shard (reshuffled each
   pass with ``set_epoch``); DDP averages the gradients, so the ranks stay identical. The budget
   is in steps, never in wall-clock time: every rank must run the same number of steps, or the
   gradient all-reduce waits forever for the rank that stopped.
4. For the last ``--finalize`` fraction of the steps, freezes gates and quantizers at what
   ``convert`` deploys (:func:`djpq_compiler.freeze_for_deployment`, as
   :func:`djpq_compiler.workflows.finetune.finetune` does) and re-wraps the model in DDP, which only
   synchronizes parameters that still get gradients.
5. Prints a fingerprint (SHA-256) of its parameters: equal fingerprints show the ranks agree.
   Rank 0 then saves the checkpoint (the prepared ``state_dict``), converts to the integer
   model, prints BOPs and accuracy, and exports ONNX.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import djpq_compiler as djpq
from djpq_compiler.backends import onnx as onnx_backend
from djpq_compiler.workflows.data import load_fashion_mnist
from djpq_compiler.workflows.finetune import FinetuneConfig, accuracy
from djpq_compiler.workflows.train import seed_everything
from djpq_compiler.workflows.zoo import load_pretrained


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DJPQ fine-tune under DistributedDataParallel "
                                            "(launch with torchrun).")
    p.add_argument("--model", default="vgg7", help="zoo model with an FP32 checkpoint")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps on every rank")
    p.add_argument("--batch-size", type=int, default=32, help="images per rank and step")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of djpq_loss")
    p.add_argument("--finalize", type=float, default=0.1,
                   help="fraction of the steps trained at the deployed bits and gates")
    p.add_argument("--train-subset", type=int, default=4096,
                   help="training images (0: all 60k)")
    p.add_argument("--test-subset", type=int, default=1000, help="test images (0: all 10k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/ddp"))
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export on rank 0")
    return p.parse_args(argv)


def datasets(train_n: int, test_n: int, seed: int) -> tuple[TensorDataset, TensorDataset, str]:
    """Seeded Fashion-MNIST subsets (the same on every rank), or random images without the data."""
    g = torch.Generator().manual_seed(seed)
    try:
        splits = [load_fashion_mnist(s) for s in ("train", "test")]
    except djpq.DataError:
        return (TensorDataset(torch.randn(train_n or 512, 1, 28, 28, generator=g),
                              torch.randint(0, 10, (train_n or 512,), generator=g)),
                TensorDataset(torch.randn(test_n or 256, 1, 28, 28, generator=g),
                              torch.randint(0, 10, (test_n or 256,), generator=g)), "synthetic")
    out = []
    for split, n in zip(splits, (train_n, test_n), strict=True):
        idx = torch.randperm(len(split), generator=g)[:n] if n else torch.arange(len(split))
        out.append(TensorDataset(split.images[idx], split.labels[idx]))
    return out[0], out[1], "Fashion-MNIST"


def batches(loader: DataLoader, sampler: DistributedSampler[int],
            device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shard, pass after pass, each pass reshuffled (the same way on every rank)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        epoch += 1


def wrap(prepared: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the parameters that currently require gradients (plain module when alone)."""
    if not dist.is_initialized():
        return prepared
    return DistributedDataParallel(prepared, device_ids=[device] if device.type == "cuda" else None)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter, in name order (equal on ranks that are in sync)."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def train(prepared: nn.Module, data: Iterator[tuple[torch.Tensor, torch.Tensor]],
          cfg: FinetuneConfig, device: torch.device, rank: int) -> None:
    """``cfg.steps`` DJPQ steps; the last ``cfg.finalize`` of them at the deployed form."""
    assert cfg.steps is not None
    model = wrap(prepared, device)
    opt = torch.optim.Adam(djpq.param_groups(prepared, weight_lr=cfg.weight_lr,
                                             djpq_lr=cfg.djpq_lr))
    final_step = round(cfg.steps * (1 - cfg.finalize))
    prepared.train()
    for step in range(1, cfg.steps + 1):
        if step == final_step + 1 and cfg.finalize:
            djpq.freeze_for_deployment(prepared)  # identical on every rank: a pure function
            del model
            model = wrap(prepared, device)  # gates/quantizers no longer get gradients
        x, y = next(data)
        task = F.cross_entropy(model(x), y)
        reg = djpq.djpq_loss(prepared) if step <= final_step else torch.zeros((), device=device)
        opt.zero_grad(set_to_none=True)
        (task + cfg.gamma * reg).backward()
        opt.step()
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            print(f"step {step:5d}  task {task.item():.3f}  R {reg.item():.4f}  "
                  f"{djpq.bops(prepared).gbops:.4f} GBOPs", flush=True)
    djpq.check_finite(prepared)
    prepared.eval()


def report(model: nn.Module, prepared: nn.Module, test: TensorDataset, x: torch.Tensor,
           args: argparse.Namespace) -> None:
    """Rank 0: checkpoint, convert, BOPs, accuracy, ONNX."""
    prepared.cpu()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(prepared.state_dict(), args.out / "prepared.pt")
    print(f"checkpoint: {args.out / 'prepared.pt'}", flush=True)
    compressed = djpq.convert(prepared)
    fp32, ours = djpq.bops(model, x[:1]), djpq.bops(compressed)
    loader = DataLoader(test, batch_size=500)
    print(f"FP32: {fp32.gbops:.4f} GBOPs, accuracy {100 * accuracy(model, loader):.2f} %")
    print(f"DJPQ integer: {ours.gbops:.4f} GBOPs ({fp32.total / ours.total:.1f}x fewer), "
          f"accuracy {100 * accuracy(compressed, loader):.2f} %", flush=True)
    if not args.no_onnx:
        path = onnx_backend.export(compressed, args.out / "model.onnx", (x[:1],))
        print(f"ONNX: {path}")


def join() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (nccl on GPUs, gloo on CPU); ``(rank, world, device)``."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # launched by torchrun; plain `python` runs one process
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def main(argv: Sequence[str] | None = None) -> None:
    """Every rank: prepare, train in lockstep, fingerprint; rank 0: checkpoint and convert."""
    args = parse_args(argv)
    rank, world, device = join()
    try:
        seed_everything(args.seed)  # same seed everywhere: same subsets, same calibration
        train_set, test_set, source = datasets(args.train_subset, args.test_subset, args.seed)
        model = load_pretrained(args.model)
        x = train_set.tensors[0][:args.batch_size]  # the same calibration batch on every rank
        prepared = djpq.prepare(model, x, djpq.DJPQConfig()).to(device)
        sampler: DistributedSampler[int] = DistributedSampler(
            train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                            pin_memory=device.type == "cuda")
        if rank == 0:
            backend = dist.get_backend() if dist.is_initialized() else "no"
            print(f"{world} process(es), {backend} backend; "
                  f"{source}: {len(train_set)} training images, {len(sampler)} per rank; "
                  f"initial parameters {fingerprint(prepared)}", flush=True)
        cfg = FinetuneConfig(gamma=args.gamma, steps=args.steps, minutes=None,
                             finalize=args.finalize, log_every=max(1, args.steps // 10))
        train(prepared, batches(loader, sampler, device), cfg, device, rank)
        # one write per line, so that the ranks' lines do not interleave on a shared stdout
        sys.stdout.write(f"rank {rank}/{world} finished {args.steps} steps, parameters "
                         f"{fingerprint(prepared)}\n")
        sys.stdout.flush()
        if rank == 0:
            report(model, prepared, test_set, x, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
