"""Quickstart: DJPQ in about 20 lines of API.

The FP32 VGG-7 reference checkpoint is prepared (VIB gates + DQ quantizers, calibrated),
fine-tuned for a few steps on ``task loss + gamma * djpq_loss``, converted to an integer model,
measured in BOPs and exported to ONNX (QDQ). Data: a 2,048-image Fashion-MNIST training subset
(``djpq_compiler.workflows.data``), or random images when Fashion-MNIST is not installed (then the
accuracies mean nothing, but every API call runs the same). Well under a minute on 2 CPU cores::

    python examples/quickstart.py [--steps 20] [--gamma 1] [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import djpq_compiler as djpq
from djpq_compiler.backends import onnx as onnx_backend
from djpq_compiler.workflows.data import fashion_mnist_loaders
from djpq_compiler.workflows.finetune import accuracy
from djpq_compiler.workflows.zoo import load_pretrained


def loaders() -> tuple[DataLoader, DataLoader, str]:
    """Fashion-MNIST subsets, or random 28x28 images when the data set is absent."""
    try:
        train, test = fashion_mnist_loaders(32, train_subset=2048, test_subset=500)
        return train, test, "Fashion-MNIST"
    except djpq.DataError:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(512, 1, 28, 28, generator=g),
                             torch.randint(0, 10, (512,), generator=g))
        return DataLoader(data, 32, shuffle=True), DataLoader(data, 256), "synthetic"


def batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def main(argv: Sequence[str] | None = None) -> None:
    """Prepare -> fine-tune -> convert -> BOPs -> ONNX, printing what each step measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="fine-tune steps (default 20)")
    parser.add_argument("--gamma", type=float, default=1.0, help="DJPQ loss weight (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train, test, source = loaders()

    model = load_pretrained("vgg7")                          # FP32 Fashion-MNIST checkpoint
    x = next(iter(train))[0]
    fp32 = djpq.bops(model, x[:1])                           # FP32 = 32x32 bits per MAC
    prepared = djpq.prepare(model, x, djpq.DJPQConfig())     # gates + quantizers, calibrated on x
    opt = torch.optim.Adam(djpq.param_groups(prepared, weight_lr=2e-4, djpq_lr=1e-2))
    prepared.train()
    for xb, yb in itertools.islice(batches(train), args.steps):
        loss = F.cross_entropy(prepared(xb), yb) + args.gamma * djpq.djpq_loss(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prepared.eval()
    compressed = djpq.convert(prepared)                      # pruned, integer weights, learned bits
    report = djpq.bops(compressed)
    onnx_path = onnx_backend.export(compressed, args.out / "quickstart.onnx", (x[:1],))

    print(report.table())
    print(f"data: {source}; {args.steps} fine-tune steps, gamma {args.gamma:g}")
    print(f"FP32: {fp32.gbops:.4f} GBOPs, accuracy {100 * accuracy(model, test):.2f} %")
    print(f"DJPQ integer: {report.gbops:.4f} GBOPs ({fp32.total / report.total:.1f}x fewer), "
          f"accuracy {100 * accuracy(compressed, test):.2f} %")
    print(f"ONNX: {onnx_path}")


if __name__ == "__main__":
    main()
