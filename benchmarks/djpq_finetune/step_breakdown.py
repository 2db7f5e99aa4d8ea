"""Where a training step's saved memory and time go, FP32 vs DJPQ-prepared.

Memory: ``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd saves for
backward during one forward pass; bytes are counted once per unique storage and attributed to the
innermost module whose forward was running when the storage was first saved (grouped by module
kind: Conv2d, BatchNorm2d, VIBGate, DQQuantizer, ...). Time: ``torch.profiler`` over a few steps,
self CPU time per aten op.

Usage:
  python benchmarks/djpq_finetune/step_breakdown.py --model resnet20 --batch-size 128 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import djpq_compiler as djpq
from djpq_compiler.modules import saved
from djpq_compiler.workflows import zoo

sys.path.insert(0, str(Path(__file__).parent))
from step_cost import _batch, _build, _step  # noqa: E402  (the same models and step)


def _kind(module: nn.Module) -> str:
    name = type(module).__name__
    return name.removeprefix("Parametrized")


@contextmanager
def module_stack(model: nn.Module) -> Iterator[list[str]]:
    """Keep a stack of the kinds of the modules whose forward is running."""
    stack: list[str] = ["<functional>"]
    handles = []
    for mod in model.modules():
        if mod is model or isinstance(mod, nn.ModuleDict | nn.ModuleList):
            continue
        def enter(m: nn.Module, args: object, k: str = _kind(mod)) -> None:
            stack.append(k)

        def leave(m: nn.Module, args: object, out: object) -> None:
            stack.pop()

        handles.append(mod.register_forward_pre_hook(enter))
        handles.append(mod.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _storages(packed: object) -> list[torch.Tensor]:
    """The tensors a packed saved value keeps alive (a compact pack keeps codes or a base)."""
    if isinstance(packed, torch.Tensor):
        return [packed]
    return [v for v in packed if isinstance(v, torch.Tensor)]  # type: ignore[attr-defined]


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                kind: str) -> dict[str, tuple[int, int]]:
    """Bytes saved for backward by one forward pass: ``{module kind: (bytes, tensors)}``.

    Counts what is really kept: inside a prepared model's forward its compact-saving hooks
    (``djpq_compiler.modules.saved``) are wrapped so that their packed values are counted.
    """
    seen: dict[int, str] = {}
    per_kind: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    with module_stack(model) as stack:
        def count(packed: object) -> object:
            for t in _storages(packed):
                key = t.untyped_storage().data_ptr()
                if key not in seen and t.untyped_storage().nbytes() > 0:
                    seen[key] = stack[-1]
                    per_kind[stack[-1]][0] += t.untyped_storage().nbytes()
                    per_kind[stack[-1]][1] += 1
            return packed

        def compact() -> torch.autograd.graph.saved_tensors_hooks:
            return torch.autograd.graph.saved_tensors_hooks(
                lambda t: count(saved._pack(t)), saved._unpack)

        original = saved.compact_saving
        saved.compact_saving = compact  # type: ignore[assignment]
        try:
            with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
                loss = F.cross_entropy(model(x), y)
                if kind == "djpq":
                    loss = loss + djpq.djpq_loss(model)
        finally:
            saved.compact_saving = original  # type: ignore[assignment]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {k: (v[0], v[1]) for k, v in per_kind.items()}


def op_times(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             kind: str, steps: int) -> list[tuple[str, float, int]]:
    """Self CPU ms per step of each aten op (top ones), over ``steps`` profiled steps."""
    _step(model, opt, kind, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            _step(model, opt, kind, x, y)
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps)
            for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", choices=sorted(zoo.MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = _batch(args.batch_size)
    for kind in ("fp32", "djpq"):
        model, opt = _build(args.model, kind, args.batch_size)
        mem = saved_bytes(model, x, y, kind)
        total = sum(b for b, _ in mem.values())
        print(f"== {kind}: saved for backward {total / 2**20:.1f} MiB (unique storages)")
        for k, (b, n) in sorted(mem.items(), key=lambda kv: -kv[1][0]):
            print(f"   {k:<22} {b / 2**20:8.1f} MiB  {n:4d} tensors")
        rows = op_times(model, opt, x, y, kind, args.steps)
        print(f"   step self-CPU total {sum(r[1] for r in rows):.0f} ms; top ops (ms/step, calls):")
        for key, ms, count in rows[: args.top]:
            print(f"   {key:<45} {ms:8.1f} {count:5d}")


if __name__ == "__main__":
    main()
