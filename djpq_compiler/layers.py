"""Finding the compute layers (conv / linear, module or functional) of a captured graph.

This is the one place that knows which nodes carry MACs; BOPs, the DJPQ loss and ``prepare`` all
use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["Layer", "find_layers", "tensor_shape", "LAYER_MODULES", "LAYER_FUNCTIONS"]

#: Module types whose forward is a convolution or a linear map (weight is ``module.weight``).
LAYER_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
#: Functional forms; the weight is the second positional argument (or ``weight=``).
LAYER_FUNCTIONS = (
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.linear,
)
_TRANSPOSED = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
)


def tensor_shape(node: fx.Node | object) -> tuple[int, ...] | None:
    """Shape recorded by the capture pass for a tensor-valued node, else ``None``."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


@dataclass(frozen=True)
class Layer:
    """A conv or linear computation in the graph.

    Attributes:
        node: The FX node computing it.
        kind: ``"conv"``, ``"conv_transpose"`` or ``"linear"``.
        weight_shape: Shape of the weight tensor as used by the op.
        groups: Convolution groups (1 for linear).
        out_channels: Output channels (features for linear).
        in_channels: Input channels (features for linear).
        positions: Output positions per sample that each MAC row is computed at (H_out*W_out for
            2-D convs, tokens for a linear on ``(N, T, C)``, 1 for a plain linear).
        kernel: Kernel volume (k_h*k_w for 2-D convs, 1 for linear).
        weight_source: ``"module"`` (``call_module``) or ``"functional"`` (weight from a node).
    """

    node: fx.Node
    kind: str
    weight_shape: tuple[int, ...]
    groups: int
    out_channels: int
    in_channels: int
    positions: int
    kernel: int
    weight_source: str

    @property
    def name(self) -> str:
        return str(self.node.target) if self.node.op == "call_module" else self.node.name

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def macs(self) -> int:
        """MACs per sample: ``C_out * positions * kernel * C_in / groups`` (no bias)."""
        return self.out_channels * self.positions * self.kernel * self.in_per_group


def _module_layer(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    mod = gm.get_submodule(str(node.target))
    if not isinstance(mod, LAYER_MODULES):
        return None
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    groups = int(getattr(mod, "groups", 1))
    return _make_layer(node, type(mod), tuple(weight.shape), groups, "module")


def _function_layer(node: fx.Node) -> Layer | None:
    if node.target not in LAYER_FUNCTIONS:
        return None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    shape = tensor_shape(weight) if isinstance(weight, fx.Node) else None
    if shape is None:
        return None
    # conv{1,2,3}d and conv_transpose{1,2,3}d both take ``groups`` as the 7th argument.
    groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
    return _make_layer(node, node.target, shape, int(groups), "functional")  # type: ignore[arg-type]


def _make_layer(
    node: fx.Node, op: object, wshape: tuple[int, ...], groups: int, source: str
) -> Layer | None:
    out_shape = tensor_shape(node)
    if out_shape is None:
        return None
    if op in (nn.Linear, F.linear):
        out_f, in_f = wshape
        positions = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
        return Layer(node, "linear", wshape, 1, out_f, in_f, positions, 1, source)
    kernel = math.prod(wshape[2:])
    positions = math.prod(out_shape[2:])
    if op in _TRANSPOSED:
        # weight: (C_in, C_out/groups, k...). Each input position scatters into the kernel
        # window, so MACs = C_in * H_in*W_in * k * C_out/groups; expressed per output position.
        in_ch, out_pg = wshape[0], wshape[1]
        in_shape = tensor_shape(node.args[0])
        in_positions = math.prod(in_shape[2:]) if in_shape else positions
        out_ch = out_pg * groups
        # Store so that out_channels*positions*kernel*in_per_group equals the true MAC count.
        return Layer(node, "conv_transpose", wshape, groups, out_ch, in_ch, in_positions, kernel,
                     source)
    out_ch, in_pg = wshape[0], wshape[1]
    return Layer(node, "conv", wshape, groups, out_ch, in_pg * groups, positions, kernel, source)


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    """All conv/linear computations of a captured graph, in graph order."""
    layers: list[Layer] = []
    for node in gm.graph.nodes:
        layer: Layer | None = None
        if node.op == "call_module":
            layer = _module_layer(gm, node)
        elif node.op == "call_function":
            layer = _function_layer(node)
        if layer is not None:
            layers.append(layer)
    return layers
