"""Drop-inference-no-ops pass: remove calls that are the identity at inference.

Requires: a graph about to be deployed (``convert`` runs in eval mode).
Guarantees: every call of a function registered in :data:`INFERENCE_IDENTITY`, and every call of
a module of :data:`IDENTITY_MODULES` (``nn.Identity``, dropout: the identity in eval), is replaced
by its first argument and erased, whatever training flag the trace baked into its arguments
(torch.fx records ``self.training`` of the traced module as a constant: a model traced in train
mode carries ``stochastic_depth(x, p, mode, True)``, which would drop rows at random in a
deployed model).
Today: torchvision's ``stochastic_depth`` (random residual-branch drop, ``x`` in eval). Backends
then need no lowering for it and the safe format (``save_converted``) no allow-list entry; and a
conv -> BN -> ``nn.Identity`` -> ReLU chain (timm's BN-act layers) fuses like conv -> BN -> ReLU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["drop_inference_noops", "INFERENCE_IDENTITY", "IDENTITY_MODULES"]

#: Module classes that return their input at inference.
IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

#: ``(module, function name)`` of functions that return their first argument at inference. The
#: function object is looked up in ``sys.modules`` (never imported here): a graph can only call
#: it if its module is loaded.
INFERENCE_IDENTITY: tuple[tuple[str, str], ...] = (
    ("torchvision.ops.stochastic_depth", "stochastic_depth"),
)


def _identity_targets() -> list[Callable[..., object]]:
    targets = []
    for module_name, fn_name in INFERENCE_IDENTITY:
        fn = getattr(sys.modules.get(module_name), fn_name, None)
        if callable(fn):
            targets.append(fn)
    return targets


def drop_inference_noops(gm: fx.GraphModule) -> PassResult:
    """Replace inference-time identity calls by their input (see the module docstring)."""
    targets = _identity_targets()
    dropped = 0
    for node in list(gm.graph.nodes):
        is_fn = node.op == "call_function" and any(node.target is t for t in targets)
        is_module = node.op == "call_module" and type(
            gm.get_submodule(str(node.target))) in IDENTITY_MODULES
        if not (is_fn or is_module):
            continue
        source = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(source, fx.Node):
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        dropped += 1
    if dropped:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(dropped))
