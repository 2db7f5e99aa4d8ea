"""Random architectures for property tests: a *recipe* (a list of block specs) -> ``nn.Module``.

A recipe is plain frozen data, so hypothesis shrinks a failure to a minimal recipe and prints it
readably, e.g. ``Recipe(blocks=(Conv(out=4, k=3, stride=1, groups='depthwise', bn=True,
act='relu'), NoRule(op='flip_c')), head='pool_linear', seed=0)``. Every recipe builds: a block
adapts to the channels and spatial size it receives (a grouped conv uses the largest of its
groups that divides the input, pooling below 2x2 is skipped, ...), so shrinking never produces
an invalid recipe.

Coverage: plain / grouped / depthwise convs (1x1, 3x3, stride 1/2) with optional BatchNorm and an
activation (relu, relu6, hardswish, gelu, sigmoid, tanh), residual blocks (identity shortcut or
1x1 projection), concatenated branches, split/chunk + per-branch convs + cat, squeeze-excite
multiply, channel shuffle, max/avg pooling, flatten -> linear heads, arithmetic with a scalar
operand of either sign (``x * -0.5``, ``-1.0 + x``, ``torch.rsub(x, 2.0)``, ``x.clamp(max=-1.0)``,
...), and ops with no channel rule (``torch.cumsum`` along width, ``torch.flip`` /
``Tensor.roll`` on channels) that must become barriers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from djpq_compiler.errors import require

require("hypothesis", "test")

from hypothesis import strategies as st  # noqa: E402

__all__ = [
    "Conv", "Act", "Residual", "Concat", "SplitCat", "SqueezeExcite", "Shuffle", "Pool", "NoRule",
    "Scalar", "Block", "Recipe", "RecipeNet", "build", "example_input", "recipes", "blocks",
    "ACTIVATIONS", "NO_RULE_OPS", "SCALAR_OPS", "SCALAR_VALUES",
]

ACTIVATIONS = ("relu", "relu6", "hardswish", "gelu", "sigmoid", "tanh")
NO_RULE_OPS = ("cumsum_w", "flip_c", "roll_c")
#: Arithmetic with one scalar operand ``v`` (see :class:`Scalar`).
SCALAR_OPS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "mul": lambda x, v: x * v,
    "rmul": lambda x, v: v * x,
    "torch_mul": lambda x, v: torch.mul(x, v),
    "add": lambda x, v: x + v,
    "radd": lambda x, v: v + x,
    "add_alpha": lambda x, v: torch.add(x, 1.0, alpha=v),
    "add_tensor_alpha": lambda x, v: x.add(F.relu(x), alpha=v),
    "sub": lambda x, v: x - v,
    "rsub": lambda x, v: v - x,
    "torch_rsub": lambda x, v: torch.rsub(x, v),
    "div": lambda x, v: x / v,
    "div_method": lambda x, v: x.div(v),
    "clamp": lambda x, v: x.clamp(v, v + 1.0),
    "clamp_min": lambda x, v: torch.clamp(x, min=v),
    "clamp_max": lambda x, v: x.clamp(max=v),
}
#: Scalars of both signs (no zero: ``x / 0`` is not a network).
SCALAR_VALUES = (-2.0, -1.0, -0.5, 0.25, 1.0, 3.0)
IN_CHANNELS = 3
BATCH = 2

_ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "gelu": F.gelu,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh}


# --------------------------------------------------------------------------- block specs
@dataclass(frozen=True)
class Conv:
    """Conv (+ BN) (+ activation). ``groups``: 1, 2, 4 or ``"depthwise"`` (then ``out`` = input)."""

    out: int
    k: int = 3
    stride: int = 1
    groups: int | Literal["depthwise"] = 1
    bn: bool = True
    act: str | None = "relu"


@dataclass(frozen=True)
class Act:
    """A standalone activation."""

    name: str


@dataclass(frozen=True)
class Residual:
    """``act(x + bn(conv(act(bn(conv(x))))))``; ``proj``: the shortcut is a 1x1 conv + BN."""

    mid: int
    out: int
    stride: int = 1
    proj: bool = False
    act: str = "relu"


@dataclass(frozen=True)
class Concat:
    """``cat([conv_i(x) for each branch], dim=1)``; branches are ``(out, k)`` pairs."""

    branches: tuple[tuple[int, int], ...]
    act: str | None = "relu"


@dataclass(frozen=True)
class SplitCat:
    """Split channels into ``pieces`` (chunk or split), a 1x1/3x3 conv per piece, cat."""

    pieces: int
    how: Literal["chunk", "split"] = "chunk"
    k: int = 3


@dataclass(frozen=True)
class SqueezeExcite:
    """``x * sigmoid(conv(relu(conv(avgpool(x)))))``."""

    squeeze: int


@dataclass(frozen=True)
class Shuffle:
    """Channel shuffle with ``groups`` groups (view / transpose / reshape)."""

    groups: int


@dataclass(frozen=True)
class Pool:
    """Pooling: ``max``/``avg`` 2x2 (skipped below 2x2); and average pools whose windows differ
    or hold padding: ``avg_pad`` 3x3/1 padding 1 not counted, ``avg_counted`` the same with the
    padding counted, ``avg_ceil`` 3x3/2 in ``ceil_mode`` (partial last windows; skipped below
    3x3), ``adaptive`` to ``size - 1`` (overlapping, uneven bins; skipped below 3x3)."""

    kind: Literal["max", "avg", "avg_pad", "avg_counted", "avg_ceil", "adaptive"]


@dataclass(frozen=True)
class Scalar:
    """``op(x, value)`` from :data:`SCALAR_OPS`: mul/add/sub/div/rsub/clamp with a scalar operand
    of either sign, as an operator, a ``torch`` function or a method (``add_alpha``: ``x + value``
    through ``alpha``; ``add_tensor_alpha``: ``x + value * relu(x)``)."""

    op: str
    value: float


@dataclass(frozen=True)
class NoRule:
    """An op with no channel rule: ``cumsum_w``, ``flip_c`` or ``roll_c``."""

    op: str


Block = (Conv | Act | Residual | Concat | SplitCat | SqueezeExcite | Shuffle | Pool | Scalar
         | NoRule)


@dataclass(frozen=True)
class Recipe:
    """A whole network: blocks, a head and the weight seed.

    ``head``: ``"pool_linear"`` (global average pool -> flatten -> linear), ``"flatten_linear"``
    (flatten the feature map -> linear) or ``"conv"`` (a 1x1 conv, the map is the output).
    """

    blocks: tuple[Block, ...]
    head: Literal["pool_linear", "flatten_linear", "conv"] = "pool_linear"
    size: int = 8
    seed: int = 0


# --------------------------------------------------------------------------- modules
def _act(name: str | None) -> nn.Module:
    return _Fn(name) if name is not None else nn.Identity()


class _Fn(nn.Module):
    """A functional activation (traced as ``call_function``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ACT_FNS[self.name](x)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             bn: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers)


def _groups_for(spec: Conv, cin: int) -> tuple[int, int]:
    """(groups, out channels) a conv spec resolves to for ``cin`` input channels."""
    if spec.groups == "depthwise":
        return cin, cin
    g = max(d for d in (1, 2, 4) if d <= spec.groups and cin % d == 0)
    return g, math.ceil(spec.out / g) * g


class _ResidualBlock(nn.Module):
    def __init__(self, spec: Residual, cin: int) -> None:
        super().__init__()
        cout = spec.out if spec.proj or spec.stride != 1 else cin
        self.body1 = _conv_bn(cin, spec.mid, 3, spec.stride)
        self.act = _Fn(spec.act)
        self.body2 = _conv_bn(spec.mid, cout, 3)
        needs_proj = spec.proj or spec.stride != 1 or cout != cin
        self.shortcut = _conv_bn(cin, cout, 1, spec.stride) if needs_proj else nn.Identity()
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body2(self.act(self.body1(x))) + self.shortcut(x))


class _ConcatBlock(nn.Module):
    def __init__(self, spec: Concat, cin: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_conv_bn(cin, c, k) for c, k in spec.branches)
        self.act = _act(spec.act)
        self.out_channels = sum(c for c, _ in spec.branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.act(b(x)) for b in self.branches], dim=1)


def _split_sizes(cin: int, pieces: int) -> list[int]:
    pieces = max(1, min(pieces, cin))
    base, extra = divmod(cin, pieces)
    return [base + (1 if i < extra else 0) for i in range(pieces)]


class _SplitCatBlock(nn.Module):
    def __init__(self, spec: SplitCat, cin: int) -> None:
        super().__init__()
        self.how = spec.how
        self.chunks = max(1, min(spec.pieces, cin))
        sizes = _split_sizes(cin, spec.pieces)
        if spec.how == "chunk":  # torch.chunk's own sizes: ceil(cin / chunks) per chunk
            step = math.ceil(cin / self.chunks)
            sizes = [min(step, cin - i) for i in range(0, cin, step)]
        self.sizes = sizes
        self.convs = nn.ModuleList(_conv_bn(c, c, spec.k) for c in sizes)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "chunk":
            parts = torch.chunk(x, self.chunks, dim=1)
        else:
            parts = torch.split(x, self.sizes, dim=1)
        return torch.cat([F.relu(conv(parts[i])) for i, conv in enumerate(self.convs)], dim=1)


class _SEBlock(nn.Module):
    def __init__(self, spec: SqueezeExcite, cin: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(cin, spec.squeeze, 1)
        self.fc2 = nn.Conv2d(spec.squeeze, cin, 1)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class _ShuffleBlock(nn.Module):
    def __init__(self, spec: Shuffle, cin: int) -> None:
        super().__init__()
        self.groups = math.gcd(spec.groups, cin)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
        x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous()
        return x.reshape(n, c, h, w)


class _PoolBlock(nn.Module):
    def __init__(self, spec: Pool) -> None:
        super().__init__()
        self.kind = spec.kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return F.max_pool2d(x, 2)
        if self.kind == "avg_pad":
            return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        if self.kind == "avg_counted":
            return F.avg_pool2d(x, 3, 1, 1)
        if self.kind == "avg_ceil":
            return F.avg_pool2d(x, 3, 2, ceil_mode=True)
        if self.kind == "adaptive":
            return F.adaptive_avg_pool2d(x, x.shape[-1] - 1)
        return F.avg_pool2d(x, 2)


def _pooled_size(kind: str, size: int) -> int | None:
    """The output size of a ``Pool`` block, or None where it is skipped."""
    if kind in ("avg_pad", "avg_counted"):
        return size
    if kind == "avg_ceil":
        return -(-(size - 3) // 2) + 1 if size >= 3 else None
    if kind == "adaptive":
        return size - 1 if size >= 3 else None
    return size // 2 if size >= 2 else None


class _ScalarBlock(nn.Module):
    def __init__(self, spec: Scalar) -> None:
        super().__init__()
        self.op, self.value = spec.op, spec.value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SCALAR_OPS[self.op](x, self.value)


class _NoRuleBlock(nn.Module):
    def __init__(self, spec: NoRule) -> None:
        super().__init__()
        self.op = spec.op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "cumsum_w":
            return torch.cumsum(x, dim=3)
        if self.op == "flip_c":
            return torch.flip(x, dims=[1])
        return x.roll(1, 1)


class RecipeNet(nn.Module):
    """The network a :class:`Recipe` describes (``self.recipe`` keeps the recipe)."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        torch.manual_seed(recipe.seed)
        blocks: list[nn.Module] = []
        c, size = IN_CHANNELS, recipe.size
        for spec in recipe.blocks:
            block, c, size = _build_block(spec, c, size)
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.head_kind = recipe.head
        if recipe.head == "conv":
            self.head: nn.Module = nn.Conv2d(c, 5, 1)
        else:
            features = c if recipe.head == "pool_linear" else c * size * size
            self.head = nn.Linear(features, 5)
        _randomize_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        if self.head_kind == "pool_linear":
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        elif self.head_kind == "flatten_linear":
            x = torch.flatten(x, 1)
        return self.head(x)


def _build_block(spec: Block, c: int, size: int) -> tuple[nn.Module, int, int]:
    """``(module, output channels, output spatial size)`` of ``spec`` on ``c`` x ``size``^2."""
    if isinstance(spec, Conv):
        stride = spec.stride if size >= 2 else 1
        groups, out = _groups_for(spec, c)
        seq = nn.Sequential(_conv_bn(c, out, spec.k, stride, groups, spec.bn), _act(spec.act))
        return seq, out, (size - 1) // stride + 1
    if isinstance(spec, Act):
        return _Fn(spec.name), c, size
    if isinstance(spec, Residual):
        res = _ResidualBlock(Residual(spec.mid, spec.out, spec.stride if size >= 2 else 1,
                                      spec.proj, spec.act), c)
        return res, res.out_channels, (size - 1) // (spec.stride if size >= 2 else 1) + 1
    if isinstance(spec, Pool):
        pooled = _pooled_size(spec.kind, size)
        return (_PoolBlock(spec), c, pooled) if pooled is not None else (nn.Identity(), c, size)
    if isinstance(spec, NoRule):
        return _NoRuleBlock(spec), c, size
    if isinstance(spec, Scalar):
        return _ScalarBlock(spec), c, size
    builders: dict[type, Any] = {
        Concat: _ConcatBlock, SplitCat: _SplitCatBlock, SqueezeExcite: _SEBlock,
        Shuffle: _ShuffleBlock}
    mod: nn.Module = builders[type(spec)](spec, c)
    return mod, int(mod.out_channels), size  # type: ignore[arg-type]


@torch.no_grad()
def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None \
                and m.running_var is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)


def build(recipe: Recipe) -> RecipeNet:
    """The network of ``recipe`` in eval mode."""
    return RecipeNet(recipe).eval()


def example_input(recipe: Recipe) -> torch.Tensor:
    """A deterministic ``(2, 3, size, size)`` input for ``recipe``."""
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    return torch.randn(BATCH, IN_CHANNELS, recipe.size, recipe.size, generator=gen)


# --------------------------------------------------------------------------- strategies
_channels = st.integers(1, 8)
_acts = st.sampled_from(ACTIVATIONS)


def blocks(no_rule: bool = True) -> st.SearchStrategy[Block]:
    """One block spec (``no_rule``: include ops with no channel rule)."""
    options: list[st.SearchStrategy[Block]] = [
        st.builds(Conv, out=_channels, k=st.sampled_from((1, 3)), stride=st.sampled_from((1, 2)),
                  groups=st.sampled_from((1, 2, 4, "depthwise")), bn=st.booleans(),
                  act=st.none() | _acts),
        st.builds(Act, name=_acts),
        st.builds(Residual, mid=_channels, out=_channels, stride=st.sampled_from((1, 2)),
                  proj=st.booleans(), act=st.sampled_from(("relu", "relu6", "hardswish"))),
        st.builds(Concat, branches=st.lists(st.tuples(_channels, st.sampled_from((1, 3))),
                                            min_size=2, max_size=3).map(tuple),
                  act=st.none() | _acts),
        st.builds(SplitCat, pieces=st.integers(2, 3), how=st.sampled_from(("chunk", "split")),
                  k=st.sampled_from((1, 3))),
        st.builds(SqueezeExcite, squeeze=st.integers(1, 4)),
        st.builds(Shuffle, groups=st.sampled_from((2, 3, 4))),
        st.builds(Pool, kind=st.sampled_from(("max", "avg", "avg_pad", "avg_counted", "avg_ceil",
                                              "adaptive"))),
        st.builds(Scalar, op=st.sampled_from(tuple(SCALAR_OPS)),
                  value=st.sampled_from(SCALAR_VALUES)),
    ]
    if no_rule:
        options.append(st.builds(NoRule, op=st.sampled_from(NO_RULE_OPS)))
    return st.one_of(*options)


def recipes(max_blocks: int = 6, no_rule: bool = True) -> st.SearchStrategy[Recipe]:
    """Whole-network recipes of 1..``max_blocks`` blocks."""
    return st.builds(
        Recipe,
        blocks=st.lists(blocks(no_rule), min_size=1, max_size=max_blocks).map(tuple),
        head=st.sampled_from(("pool_linear", "flatten_linear", "conv")),
        size=st.sampled_from((4, 8)),
        seed=st.integers(0, 2**16),
    )
