"""Functional-norms pass: ``F.batch_norm`` on parameters of the model -> an ``nn.BatchNorm`` module.

Norm+activation layers of other model zoos (timm-style ``BatchNormAct2d``: a ``BatchNorm2d``
subclass whose forward asserts ``x.ndim == 4`` and calls ``F.batch_norm`` then the activation)
are traced through, leaving ``F.batch_norm(x, running_mean, running_var, weight, bias, training,
momentum, eps)`` on ``get_attr`` nodes. Every later pass knows batch norm as a module: its
channel rule moves the gate after it, ``convert`` folds it into the conv (float) or the integer
layer's scale and bias, BOPs treat it as free. So the call becomes a ``call_module`` of an
``nn.BatchNorm{1,2,3}d`` holding *the same* tensors, at the path that owned them (or, when that
module also holds the layer's activation, at ``<path>.bn``).

Requires: a captured graph with shapes (``tensor_meta``).
Guarantees: a call is rewritten only when its running statistics (and weight/bias, when given)
are ``get_attr`` tensors of one owner path that nothing else in the graph reads, its flags are
constants and its input has 2-5 dimensions; the module computes exactly what the call computed
(eval: running statistics; train: batch statistics and the same running-average update). The
module's train/eval mode then follows the model's: a functional call traced in train mode had
``training=True`` baked in, so the rewrite only applies when the baked flag equals the mode the
graph is captured in. Other calls stay functional (their channel rule in
``passes/dependency/rules.py`` treats them as a per-channel op that does not preserve zero).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from djpq_compiler.layers import tensor_shape

__all__ = ["functional_norms_to_modules"]

_BN_CLASSES: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_ARG_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
              "eps")
_DEFAULTS: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                             "eps": 1e-5}


def _bound_args(node: fx.Node) -> dict[str, Any] | None:
    args = dict(zip(_ARG_NAMES, node.args, strict=False))
    for key, value in node.kwargs.items():
        if key not in _ARG_NAMES or key in args:
            return None
        args[key] = value
    for key, value in _DEFAULTS.items():
        args.setdefault(key, value)
    return args if "running_var" in args else None


def _owner(gm: fx.GraphModule, node: fx.Node, args: dict[str, Any]) -> str | None:
    """The one module path owning every tensor argument, if nothing else reads them."""
    owners = set()
    for key in ("running_mean", "running_var", "weight", "bias"):
        arg = args[key]
        if arg is None and key in ("weight", "bias"):
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr" or list(arg.users) != [node]:
            return None
        owner, _, name = str(arg.target).rpartition(".")
        if name != key:
            return None
        owners.add(owner)
    if len(owners) != 1 or (args["weight"] is None and args["bias"] is not None):
        return None
    (owner,) = owners
    readers = [n for n in gm.graph.nodes  # child modules (the activation) may be called
               if n.op == "get_attr" and str(n.target).startswith(f"{owner}.")
               and n.users.keys() != {node}]
    return owner if owner and not readers else None


def _constant_flags(args: dict[str, Any], training: bool) -> bool:
    momentum = args["momentum"]
    return (isinstance(args["training"], bool) and args["training"] == training
            and isinstance(args["eps"], float | int)
            and (momentum is None or isinstance(momentum, float | int)))


def _module_for(gm: fx.GraphModule, owner: str, args: dict[str, Any],
                ndim: int) -> nn.modules.batchnorm._BatchNorm:
    holder: Any = gm.get_submodule(owner)
    mean = holder.running_mean
    cls = _BN_CLASSES[ndim]
    bn = cls(int(mean.shape[0]), eps=float(args["eps"]), momentum=args["momentum"],
             affine=args["weight"] is not None, track_running_stats=True)
    bn.running_mean, bn.running_var = mean, holder.running_var
    tracked = getattr(holder, "num_batches_tracked", None)
    if isinstance(tracked, torch.Tensor):
        bn.num_batches_tracked = tracked
    if args["weight"] is not None:
        bn.weight = holder.weight
    if args["bias"] is not None:
        bn.bias = holder.bias
    elif bn.affine:
        bn.bias = nn.Parameter(torch.zeros_like(bn.weight), requires_grad=False)
    bn.train(gm.training)
    return bn


def _place(gm: fx.GraphModule, owner: str, bn: nn.Module) -> str:
    """Put ``bn`` where the tensors lived: at ``owner`` itself, or, when the owner also holds
    child modules (the activation of a BN-act layer), as its child ``bn`` (``djpq_bn`` if that
    name is taken) with the tensors moved out of the owner. Returns the module path."""
    holder = gm.get_submodule(owner)
    if not holder._modules:
        parent, _, name = owner.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, bn)
        return owner
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        holder._parameters.pop(key, None)
        holder._buffers.pop(key, None)
        holder.__dict__.pop(key, None)
    child = "bn" if not hasattr(holder, "bn") else "djpq_bn"
    holder.add_module(child, bn)
    return f"{owner}.{child}"


def _drop_rank_asserts(gm: fx.GraphModule, x: fx.Node, ranks: tuple[int, ...]) -> None:
    """Erase ``torch._assert(x.ndim == k)`` on the norm's input (the BN-act layer's own rank
    check) when ``k`` is a rank the module accepts: ``nn.BatchNorm*d`` checks the rank itself,
    and the check's extra users of ``x`` would keep the norm from folding into its conv."""
    for user in list(x.users):
        if not (user.op == "call_function" and user.target is getattr
                and user.args[1:] == ("ndim",)):
            continue
        for eq in list(user.users):
            if not (eq.target is operator.eq and len(eq.args) == 2 and eq.args[1] in ranks
                    and all(u.target is torch._assert for u in eq.users)):
                continue
            for check in list(eq.users):
                gm.graph.erase_node(check)
            gm.graph.erase_node(eq)
        if not user.users:
            gm.graph.erase_node(user)


def functional_norms_to_modules(gm: fx.GraphModule) -> PassResult:
    """Rewrite eligible ``F.batch_norm`` calls (see the module docstring)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        args = _bound_args(node)
        shape = tensor_shape(node)
        if args is None or shape is None or len(shape) not in _BN_CLASSES \
                or not isinstance(args["input"], fx.Node) \
                or not _constant_flags(args, gm.training):
            continue
        owner = _owner(gm, node, args)
        if owner is None:
            continue
        path = _place(gm, owner, _module_for(gm, owner, args, len(shape)))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (args["input"],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        stale = [a for a in node.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(node)
        for attr in stale:
            gm.graph.erase_node(attr)
        ranks = (2, 3) if len(shape) in (2, 3) else (len(shape),)
        _drop_rank_asserts(gm, args["input"], ranks)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
