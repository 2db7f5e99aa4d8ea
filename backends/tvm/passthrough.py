"""Converters of ops that are the identity at inference: ``nn.Identity``, dropout and
torchvision's stochastic depth (eval), copies. Whether a dropout is inactive is decided once for
every backend in ``backends/common_ops.py``.

A converted graph keeps such nodes where the original model had them, e.g. ResNet's
``nn.Identity`` shortcut or a classifier's ``nn.Dropout``. They lower to their input value
unchanged (same Relax expression, same integer range), so they cost nothing in the compiled model.

Dropout is only an identity when it is inactive: a dropout *module* in training mode, or a
functional dropout traced with ``training=True``, would randomly zero values in PyTorch, so it is
refused with a :class:`~djpq_compiler.errors.BackendError` naming the node instead of being
silently dropped.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from djpq_compiler.errors import BackendError

from ..common_ops import INFERENCE_IDENTITIES, check_inference_identity
from .emit import FloatValue, IntValue, Lowered, Lowering, register

__all__: list[str] = []


def _input(ctx: Lowering, node: fx.Node) -> IntValue | FloatValue:
    """The lowered first argument of ``node``, which must be a tensor value."""
    source = node.args[0] if node.args else node.kwargs.get("input")
    value = ctx.value(source)
    if not isinstance(value, (IntValue, FloatValue)):
        raise BackendError(f"{node.format_node()}: expects a tensor input, got {value!r}")
    return value


@register(nn.Identity)
def convert_identity(ctx: Lowering, node: fx.Node) -> Lowered:
    """``nn.Identity()(x)`` is ``x`` (extra constructor arguments are ignored by torch too)."""
    return _input(ctx, node)


@register(*INFERENCE_IDENTITIES)
def convert_inference_identity(ctx: Lowering, node: fx.Node) -> Lowered:
    """Dropout (every form) and stochastic depth in eval mode (or with ``p == 0``): the identity.

    Raises:
        BackendError: Training mode with ``p > 0`` (see ``backends/common_ops.py``).
    """
    check_inference_identity(ctx, node)
    return _input(ctx, node)


@register(torch.Tensor.detach, torch.Tensor.clone, torch.clone, torch.detach)
def convert_copy(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.detach()`` / ``x.clone()``: the same values (Relax values are immutable)."""
    return _input(ctx, node)
