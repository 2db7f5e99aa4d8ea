"""Converters of ops that are the identity at inference: ``nn.Identity``, dropout (eval), copies.

A converted graph keeps such nodes where the original model had them, e.g. ResNet's
``nn.Identity`` shortcut or a classifier's ``nn.Dropout``. They lower to their input value
unchanged (same Relax expression, same integer range), so they cost nothing in the compiled model.

Dropout is only an identity when it is inactive: a dropout *module* in training mode, or a
functional dropout traced with ``training=True``, would randomly zero values in PyTorch, so it is
refused with a :class:`~djpq_compiler.errors.BackendError` naming the node instead of being
silently dropped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from djpq_compiler.errors import BackendError

from .emit import FloatValue, IntValue, Lowered, Lowering, register

__all__ = ["DROPOUT_FUNCTIONS", "DROPOUT_MODULES"]

#: Dropout module classes: identities in ``eval()`` mode (or with ``p == 0``).
DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

#: Functional dropouts with the position and default of their ``training`` argument.
DROPOUT_FUNCTIONS: dict[Any, tuple[int, str, bool]] = {
    F.dropout: (2, "training", True),
    F.dropout1d: (2, "training", True),
    F.dropout2d: (2, "training", True),
    F.dropout3d: (2, "training", True),
    F.alpha_dropout: (2, "training", False),
    F.feature_alpha_dropout: (2, "training", False),
    torch.dropout: (2, "train", True),
}


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


@register(*DROPOUT_MODULES)
def convert_dropout_module(ctx: Lowering, node: fx.Node) -> Lowered:
    """A dropout module in eval mode (or with ``p == 0``) is the identity.

    Raises:
        BackendError: The module is in training mode with ``p > 0``.
    """
    module = ctx.module(node)
    if module.training and float(module.p) > 0.0:
        raise BackendError(
            f"{node.format_node()}: {type(module).__name__}(p={module.p}) is in training mode, "
            "where it zeroes random values; call converted.eval() before building"
        )
    return _input(ctx, node)


@register(*DROPOUT_FUNCTIONS)
def convert_dropout_function(ctx: Lowering, node: fx.Node) -> Lowered:
    """A functional dropout traced with ``training=False`` (or ``p == 0``) is the identity.

    Raises:
        BackendError: The call was traced with ``training=True`` and ``p > 0``.
    """
    index, name, default = DROPOUT_FUNCTIONS[node.target]
    training = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    if not isinstance(training, bool) or not isinstance(p, (int, float)):
        raise BackendError(
            f"{node.format_node()}: dropout's {name!r} and 'p' must be constants at trace time, "
            f"got {training!r} and {p!r}; trace the model in eval mode"
        )
    if training and p > 0:
        raise BackendError(
            f"{node.format_node()}: dropout was traced with {name}=True and p={p}, so it zeroes "
            "random values; pass training=self.training and trace/convert the model in eval mode"
        )
    return _input(ctx, node)


@register(torch.Tensor.detach, torch.Tensor.clone, torch.clone, torch.detach)
def convert_copy(ctx: Lowering, node: fx.Node) -> Lowered:
    """``x.detach()`` / ``x.clone()``: the same values (Relax values are immutable)."""
    return _input(ctx, node)
