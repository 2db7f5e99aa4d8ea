"""Compact tensors saved for backward: quantized activations as 1-byte codes, gate outputs as a
recipe. Exact: every unpacked tensor is bitwise the tensor that was saved.

A prepared model saves far more for backward than its float model: a conv keeps its quantized
input (float), and a quantizer or an in-place ReLU after a gate keeps the gate's output although
the gate already keeps the gate's input. Two marks, set by the producers, let the saved-tensor
hooks keep less:

* :func:`mark_grid` -- ``q = d * k`` with the integer grid indices ``k`` the quantizer computed,
  kept as ``int8``/``uint8`` codes when they fit (at most 8 bits). Saved as the codes and unpacked
  as ``k * d``: the multiplication the quantizer did, so bitwise the same.
* :func:`mark_product` -- ``y = base * factor`` (a gate output; ``factor`` small): saved as
  ``(base, factor)`` -- ``base`` is the gate's own saved input, the same storage -- and recomputed
  by the same multiplication.

A marked tensor changed in place is saved as it is, except after exactly one ``relu_`` (its
version counter moved by one and its ``grad_fn`` is the ReLU's node): ``relu(d * k) =
d * max(k, 0)`` and ``relu(base * factor)`` are recomputed as exactly (conv-BN-gate-ReLU with
``inplace=True`` is the common pattern).

The hooks are active only inside a training forward pass (grad enabled) of a model that
:func:`attach_compact_saving` was called on (``prepare()`` does that), so a quantizer or gate used
on its own saves plainly; where saved-tensor hooks are disabled (``torch.compile``,
``disable_saved_tensors_hooks``) the model saves plainly too. [choice] Marks are attributes of the
tensor object, so a view of a marked tensor is saved as it is.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.utils.hooks import RemovableHandle

from djpq_compiler.records import stage

__all__ = [
    "mark_grid",
    "mark_product",
    "grid_codes_fit",
    "code_dtype",
    "attach_compact_saving",
    "detach_compact_saving",
    "compact_saving",
    "remove_hooks",
]

_ATTR = "_djpq_saved_mark"
#: Tensors smaller than this are saved as they are (weights, per-channel vectors): no gain.
MIN_NUMEL = 4096


class _Grid(NamedTuple):
    version: int
    codes: torch.Tensor
    step: float


class _Product(NamedTuple):
    version: int
    base: torch.Tensor
    base_version: int
    factor: torch.Tensor
    relu: bool = False


class _Codes(NamedTuple):
    codes: torch.Tensor
    step: float
    dtype: torch.dtype

    def unpack(self) -> torch.Tensor:
        if self.dtype == torch.get_default_dtype():  # one pass: int * float promotes to it
            return torch.mul(self.codes, self.step)
        return self.codes.to(self.dtype).mul_(self.step)


class _Recipe(NamedTuple):
    base: torch.Tensor
    base_version: int
    factor: torch.Tensor
    relu: bool

    def unpack(self) -> torch.Tensor:
        if self.base._version != self.base_version:
            raise RuntimeError(
                "a gate's input, needed to recompute its output for backward, was modified by an "
                "inplace operation after the forward pass"
            )
        out = torch.mul(self.base, self.factor)
        return out.relu_() if self.relu else out


_FLOATS = (torch.float32, torch.float64)
_RELU_NODE = type(torch.relu(torch.zeros(1, requires_grad=True)).grad_fn)


def grid_codes_fit(numel: int, dtype: torch.dtype, max_code: float, signed: bool) -> bool:
    """Whether a quantizer output should carry 1-byte codes (:func:`mark_grid`): float32/float64,
    at least :data:`MIN_NUMEL` elements, and ``|k| <= round(max_code)`` surely fits one byte
    (``max_code = q_max / d`` at most 127.49 signed, 255.49 unsigned: far from the rounding tie
    even where the kernel divided in float32)."""
    limit = (127 if signed else 255) + 0.49
    return max_code <= limit and numel >= MIN_NUMEL and dtype in _FLOATS


def code_dtype(signed: bool) -> torch.dtype:
    """``int8`` for signed codes, ``uint8`` for unsigned ones."""
    return torch.int8 if signed else torch.uint8


def mark_grid(q: torch.Tensor, codes: torch.Tensor, step: float) -> None:
    """Declare ``q == codes.to(q.dtype) * step`` bitwise (``codes`` are the 1-byte integer grid
    indices the quantizer computed; see :func:`grid_codes_fit`)."""
    setattr(q, _ATTR, _Grid(q._version, codes, float(step)))


def mark_product(y: torch.Tensor, base: torch.Tensor, factor: torch.Tensor) -> None:
    """Declare ``y == torch.mul(base, factor)`` (bitwise; ``factor`` broadcasts, small)."""
    if y.numel() >= MIN_NUMEL and y.shape == base.shape and torch.is_grad_enabled():
        setattr(y, _ATTR, _Product(y._version, base.detach(), base._version, factor.detach()))


def _relu_applied_once(t: torch.Tensor, version: int) -> bool:
    """``t`` changed in place exactly once since ``version``, by ``relu_`` (its grad_fn says so:
    an in-place op makes its own node the tensor's grad_fn)."""
    return t._version == version + 1 and isinstance(t.grad_fn, _RELU_NODE)


def _pack(t: torch.Tensor) -> Any:
    mark = getattr(t, _ATTR, None)
    if isinstance(mark, _Grid):
        if t._version == mark.version:
            return _Codes(mark.codes, mark.step, t.dtype)
        if _relu_applied_once(t, mark.version):  # relu(d * k) = d * max(k, 0)
            codes = mark.codes.clamp(min=0) if mark.codes.dtype == torch.int8 else mark.codes
            return _Codes(codes, mark.step, t.dtype)
    elif isinstance(mark, _Product):
        if t._version == mark.version:
            return _Recipe(mark.base, mark.base_version, mark.factor, False)
        if _relu_applied_once(t, mark.version):  # conv-BN-gate-ReLU(inplace=True)
            return _Recipe(mark.base, mark.base_version, mark.factor, True)
    return t


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    out: torch.Tensor = packed.unpack()
    return out


def compact_saving() -> torch.autograd.graph.saved_tensors_hooks:
    """A context manager in which marked tensors are saved compactly (see the module docstring)."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


_ACTIVE = threading.local()


def _enter(module: nn.Module, args: object) -> None:
    stack: list[Any] = getattr(_ACTIVE, "stack", None) or []
    _ACTIVE.stack = stack
    ctx = None
    # [choice] a converted model (a deep copy of the prepared one) keeps the hooks but is plain
    prepared = stage(module) in (None, "prepared")  # during prepare(): no record yet
    if prepared and torch.is_grad_enabled() and module.training:
        ctx = compact_saving()
        try:
            ctx.__enter__()
        except RuntimeError:  # saved-tensor hooks disabled here (e.g. under torch.compile)
            ctx = None
    stack.append(ctx)


def _exit(module: nn.Module, args: object, output: object) -> None:
    stack: list[Any] = getattr(_ACTIVE, "stack", None) or []
    ctx = stack.pop() if stack else None
    if ctx is not None:
        ctx.__exit__(None, None, None)


class ForwardHooksHandle:
    """Handle of a module's forward hooks registered together (:func:`attach_compact_saving`,
    ``gates.attach_step_hook``); :meth:`remove` detaches all of them."""

    def __init__(self, handles: tuple[RemovableHandle, ...]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def attach_compact_saving(root: nn.Module) -> ForwardHooksHandle:
    """Save marked tensors compactly during every training forward pass of ``root``.

    Registers a forward-pre-hook that enters :func:`compact_saving` (in training mode with grad
    enabled) and a forward-hook, run even when the forward raises, that leaves it. Both are
    module-level functions, so ``root`` stays picklable and deep-copyable; a ``GraphModule``
    (whose ``deepcopy`` drops forward hooks) re-attaches them to its copies.
    """
    if isinstance(root, fx.GraphModule):
        root._register_deepcopy_hook(_attach)
    return _attach(root)


def _attach(root: nn.Module) -> ForwardHooksHandle:
    return ForwardHooksHandle(
        (
            root.register_forward_pre_hook(_enter),
            root.register_forward_hook(_exit, always_call=True),
        )
    )


def detach_compact_saving(root: nn.Module) -> None:
    """Undo :func:`attach_compact_saving` on ``root`` (and on its future deep copies)."""
    remove_hooks(root, (_enter, _exit), _attach)


def remove_hooks(root: nn.Module, hooks: tuple[Any, ...], deepcopy_hook: Any) -> None:
    """Remove the forward(-pre) hooks of ``root`` that are one of ``hooks``, and
    ``deepcopy_hook`` from a ``GraphModule``'s deep-copy hooks."""
    for table in (root._forward_pre_hooks, root._forward_hooks):
        for key in [k for k, fn in table.items() if fn in hooks]:
            del table[key]
            root._forward_hooks_always_called.pop(key, None)
    if isinstance(root, fx.GraphModule):
        root._deepcopy_hooks[:] = [f for f in root._deepcopy_hooks if f is not deepcopy_hook]
