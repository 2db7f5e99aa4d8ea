"""Reference models for 28x28 single-channel inputs (Fashion-MNIST), and their FP32 checkpoints.

Every model is built from standard modules (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU`` /
``nn.ReLU6``, ``nn.MaxPool2d``, ``nn.AdaptiveAvgPool2d``, ``nn.Linear``) plus ``torch.flatten``,
``torch.cat`` and ``+``, and traces with ``torch.fx.symbolic_trace``. Together they cover the
structures DJPQ must handle: plain chains (VGG7), residual adds with projection shortcuts
(ResNet-20), depthwise convs inside inverted residuals (MobileNetV2), and channel concatenation
(Inception).

Checkpoints (``state_dict`` only, float32) live in ``djpq_compiler/checkpoints/<name>.pt`` and are
produced by ``benchmarks/reference_models/train_reference.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from djpq_compiler.errors import ArtifactError, ConfigError

__all__ = [
    "CHECKPOINT_DIR",
    "MODELS",
    "vgg7",
    "resnet20",
    "mobilenetv2_small",
    "inception_small",
    "get_model",
    "checkpoint_path",
    "load_pretrained",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d -> act`` with 'same' padding for odd ``k``."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------- VGG7


class VGG7(nn.Module):
    """VGG7: ``2x(C3) - MP - 2x(C3) - MP - 2x(C3) - MP - FC - FC``.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        widths: channels of the three conv stages.
        fc: width of the hidden fully connected layer.
        bn: BatchNorm after every conv (the conv then has no bias).
        input_size: spatial size of the (square) input; fixes the flatten size.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: Sequence[int] = (16, 32, 64), fc: int = 256, bn: bool = True,
                 input_size: int = 28) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1 or fc < 1 or input_size < 8:
            raise ConfigError(f"vgg7 needs 3 positive widths, fc >= 1 and input_size >= 8; got "
                              f"widths={tuple(widths)}, fc={fc}, input_size={input_size}")
        layers: list[nn.Module] = []
        cin = in_channels
        for width in widths:
            for _ in range(2):
                layers.append(nn.Conv2d(cin, width, 3, padding=1, bias=not bn))
                if bn:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        spatial = input_size // 8
        self.fc1 = nn.Linear(cin * spatial * spatial, fc)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(fc, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(self.relu(self.fc1(x)))


def vgg7(in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
         fc: int = 256, bn: bool = True, input_size: int = 28) -> VGG7:
    """A VGG7. The defaults are a slim Fashion-MNIST variant; the paper's CIFAR-10 net is
    ``vgg7(in_channels=3, widths=(128, 256, 512), fc=1024, bn=False, input_size=32)``
    (615,917,568 MACs)."""
    return VGG7(in_channels, num_classes, widths, fc, bn, input_size)


# ----------------------------------------------------------------------------------- ResNet-20


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1x1 conv + BN projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, act=None)
        self.shortcut: nn.Module = (
            _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20: stem, 3 stages of ``blocks`` basic blocks, global pool, FC.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        widths: channels of the three stages (stages 2 and 3 downsample by 2).
        blocks: basic blocks per stage (3 gives ResNet-20).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: Sequence[int] = (16, 32, 64), blocks: int = 3) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1 or blocks < 1:
            raise ConfigError(f"resnet20 needs 3 positive widths and blocks >= 1; got "
                              f"widths={tuple(widths)}, blocks={blocks}")
        self.stem = _conv_bn(in_channels, widths[0], 3)
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, width in enumerate(widths):
            stage = [BasicBlock(cin if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1)
                     for j in range(blocks)]
            stages.append(nn.Sequential(*stage))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet20(in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
             blocks: int = 3) -> ResNet20:
    """A CIFAR-style ResNet-20 (0.27 M parameters at the default widths)."""
    return ResNet20(in_channels, num_classes, widths, blocks)


# --------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN.

    The residual add is used when ``stride == 1`` and the channel count is unchanged; with
    ``expansion == 1`` the expand conv is omitted (as in MobileNetV2's first block).
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        layers.append(_conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


# (expansion t, channels c, repeats n, first stride s), as in the MobileNetV2 paper's table
# (expansion 4 instead of 6 keeps CPU training affordable)
_MBV2_SMALL = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 1))


class MobileNetV2Small(nn.Module):
    """A small MobileNetV2 for 28x28 inputs (stride-1 stem, two downsamplings to 7x7).

    Args:
        in_channels: input channels.
        num_classes: output classes.
        setting: ``(t, c, n, s)`` rows, as in the MobileNetV2 paper.
        stem: channels of the stem conv.
        last: channels of the final 1x1 conv before pooling.
        stem_stride: stride of the stem conv.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 setting: Sequence[tuple[int, int, int, int]] = _MBV2_SMALL, stem: int = 16,
                 last: int = 128, stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, stem, 3, stem_stride, act=nn.ReLU6)
        blocks: list[nn.Module] = []
        cin = stem
        for t, c, n, s in setting:
            for j in range(n):
                blocks.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, last, 1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


def mobilenetv2_small(in_channels: int = 1, num_classes: int = 10,
                      setting: Sequence[tuple[int, int, int, int]] = _MBV2_SMALL, stem: int = 16,
                      last: int = 128, stem_stride: int = 1) -> MobileNetV2Small:
    """A small MobileNetV2 (inverted residuals, depthwise convs, residual adds)."""
    return MobileNetV2Small(in_channels, num_classes, setting, stem, last, stem_stride)


# ----------------------------------------------------------------------------------- Inception


class InceptionBlock(nn.Module):
    """Four branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3 (the "5x5");
    3x3 max-pool -> 1x1. Output channels: ``c1 + c3 + c5 + pool``."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int,
                 pool: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn(cin, c1, 1)
        self.branch3 = nn.Sequential(_conv_bn(cin, c3r, 1), _conv_bn(c3r, c3, 3))
        self.branch5 = nn.Sequential(_conv_bn(cin, c5r, 1), _conv_bn(c5r, c5, 3),
                                     _conv_bn(c5, c5, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                         _conv_bn(cin, pool, 1))
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x),
                          self.branch_pool(x)], dim=1)


class InceptionSmall(nn.Module):
    """Stem conv + max-pool (28 -> 14), two inception blocks, max-pool (14 -> 7), two more
    blocks, global average pool and a linear classifier.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        stem: channels of the stem conv.
        width: multiplier on every branch width (1 = the default table).
    """

    _TABLE = (  # c1, c3r, c3, c5r, c5, pool
        (16, 16, 24, 8, 8, 8),
        (24, 24, 32, 8, 16, 16),
        (32, 24, 48, 12, 24, 24),
        (48, 32, 64, 16, 32, 32),
    )

    def __init__(self, in_channels: int = 1, num_classes: int = 10, stem: int = 32,
                 width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ConfigError(f"inception width multiplier must be > 0, got {width}")
        self.stem = nn.Sequential(_conv_bn(in_channels, stem, 3), nn.MaxPool2d(2))
        cin = stem
        blocks: list[nn.Module] = []
        for i, row in enumerate(self._TABLE):
            block = InceptionBlock(cin, *(max(1, round(c * width)) for c in row))
            blocks.append(block)
            cin = block.out_channels
            if i == 1:
                blocks.append(nn.MaxPool2d(2))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def inception_small(in_channels: int = 1, num_classes: int = 10, stem: int = 32,
                    width: float = 1.0) -> InceptionSmall:
    """A small GoogLeNet-style net (branch concatenation with ``torch.cat``)."""
    return InceptionSmall(in_channels, num_classes, stem, width)


# ------------------------------------------------------------------------------------ registry

MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg7": vgg7,
    "resnet20": resnet20,
    "mobilenetv2": mobilenetv2_small,
    "inception": inception_small,
}


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build a zoo model by registry name (randomly initialized).

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown zoo model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return factory(**kwargs)


def checkpoint_path(name: str) -> Path:
    """Where the committed FP32 checkpoint of zoo model ``name`` lives."""
    return CHECKPOINT_DIR / f"{name}.pt"


def load_pretrained(name: str, path: str | Path | None = None) -> nn.Module:
    """Build zoo model ``name`` and load its FP32 checkpoint (``weights_only=True``), in eval mode.

    Args:
        name: registry name.
        path: checkpoint file; defaults to :func:`checkpoint_path`.

    Raises:
        ConfigError: unknown name.
        ArtifactError: checkpoint missing, unreadable or not matching the model.
    """
    model = get_model(name)
    path = Path(path) if path is not None else checkpoint_path(name)
    retrain = (f"reinstall djpq-compiler, or regenerate it with `python "
               f"benchmarks/reference_models/train_reference.py --model {name} --epochs N "
               f"--out {path}` (the exact commands are in benchmarks/reference_models/RESULTS.md)")
    if not path.is_file():
        raise ArtifactError(f"checkpoint for {name!r} not found at {path}; {retrain}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/tampered files
        raise ArtifactError(f"checkpoint {path} cannot be loaded ({exc}); {retrain}") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict; "
                            f"{retrain}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"checkpoint {path} does not match model {name!r}: {exc}; "
                            f"{retrain}") from exc
    return model.eval()
