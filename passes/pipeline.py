"""The pass runner: run named passes in order, check the graph after each, name the culprit.

The pass contract: a pass is a plain function whose first argument is what it transforms (a
``GraphModule``; ``capture`` takes the model) and which returns either torch's
``PassResult(graph_module, modified)`` or :class:`Recorded` ``(graph_module, record)`` when it
hands the next passes a value (kept atoms, quantizer paths, ...). Everything a pass needs from
an earlier one is an argument: no pass reads another's results from ``gm.meta``.

:class:`PassRunner` runs one pipeline (``prepare``, ``convert``): after each pass it lints the
graph, recompiles it and checks the cheap invariants below; on failure it re-raises with the
failing pass and the passes run before it::

    run = PassRunner("convert")
    folded = run(fold_gates, gm, record.gates, round_to=config.round_to).record
    run(prune_graph, gm, record.groups, folded.keep)

Invariants checked after every pass (``check_graph``): the graph lints (every node defined
before use, one output); every ``call_module`` / ``get_attr`` target exists in the module.
A pipeline checks its result with :meth:`PassRunner.check`, e.g. ``convert`` with
:func:`check_no_training_modules` (DESIGN invariant 6: never a half-converted model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from djpq_compiler.errors import DjpqError

__all__ = ["Recorded", "PassRunner", "PassError", "check_graph", "check_no_training_modules"]

R = TypeVar("R")
P = ParamSpec("P")
Out = TypeVar("Out", bound="PassResult | Recorded[Any]")


@dataclass(frozen=True)
class Recorded(Generic[R]):
    """What a pass returns when it hands on a value: the graph and the pass's record."""

    graph_module: fx.GraphModule
    record: R
    modified: bool = True


class PassError(DjpqError):
    """A pass failed without a more specific error (an internal error: please report it),
    or left a graph that breaks an invariant; the message names the pass and the history."""


def check_graph(gm: fx.GraphModule) -> None:
    """Raise ``PassError`` unless ``gm``'s graph lints and every module/attribute target
    exists."""
    try:
        gm.graph.lint()
    except Exception as exc:  # torch raises RuntimeError with the broken node
        raise PassError(f"the graph does not lint: {exc}") from exc
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        owner_path, _, attr = str(node.target).rpartition(".")
        try:
            if node.op == "call_module":
                gm.get_submodule(str(node.target))
            elif not hasattr(gm.get_submodule(owner_path) if owner_path else gm, attr):
                raise AttributeError(attr)
        except AttributeError as exc:
            raise PassError(f"{node.format_node()} names {node.target!r}, which the module does"
                            " not have") from exc


def check_no_training_modules(gm: fx.GraphModule) -> None:
    """Raise ``PassError`` if the graph still calls a VIB gate or a DQ quantizer."""
    from djpq_compiler.modules.gates import VIBGate
    from djpq_compiler.modules.quantizers import DQQuantizer

    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                   (VIBGate, DQQuantizer)):
            raise PassError(f"{node.format_node()} still calls a training module "
                            f"({type(gm.get_submodule(str(node.target))).__name__})")


@dataclass
class PassRunner:
    """Runs the passes of one pipeline, checking the graph after each (see module docstring).

    Attributes:
        pipeline: Name of the pipeline, for messages (``"prepare"``, ``"convert"``).
        history: Names of the passes run so far, in order.
    """

    pipeline: str
    history: list[str] = field(default_factory=list)

    def __call__(self, fn: Callable[Concatenate[Any, P], Out], *args: P.args,
                 **kwargs: P.kwargs) -> Out:
        """Run ``fn(*args, **kwargs)``, then lint, recompile and check its graph.

        Raises:
            DjpqError: the pass failed; a ``DjpqError`` keeps its class, anything else becomes
                a :class:`PassError`; the message ends with the pass and the history.
        """
        name = getattr(fn, "__name__", repr(fn))
        try:
            out = fn(*args, **kwargs)
            gm = getattr(out, "graph_module", None)
            if not isinstance(gm, fx.GraphModule):
                raise PassError(f"it returned {type(out).__name__}, not a PassResult or Recorded"
                                " with a GraphModule")
            check_graph(gm)
            gm.recompile()
        except Warning:  # a warning turned into an error by the caller's filters: as it is
            raise
        except Exception as exc:
            failure = self._failure(name, exc)
            if failure is exc:
                raise
            raise failure from exc
        self.history.append(name)
        return out

    def check(self, fn: Callable[[fx.GraphModule], None], gm: fx.GraphModule) -> None:
        """Run the invariant check ``fn`` on the pipeline's result (named like a pass).

        Raises:
            DjpqError: as :meth:`__call__` does, naming the check and the history.
        """
        try:
            fn(gm)
        except Warning:
            raise
        except Exception as exc:
            failure = self._failure(getattr(fn, "__name__", repr(fn)), exc)
            if failure is exc:
                raise
            raise failure from exc

    def _failure(self, name: str, exc: Exception) -> DjpqError:
        where = (f"(in pass '{name}' of {self.pipeline}; passes run before it: "
                 f"{', '.join(self.history) or 'none'})")
        if isinstance(exc, DjpqError):
            try:
                return type(exc)(f"{exc}\n{where}")
            except TypeError:  # a subclass with another constructor: keep it, add a note
                exc.add_note(where)
                return exc
        return PassError(f"{type(exc).__name__}: {exc}\n{where}; this is a bug in djpq-compiler "
                         "(or in a custom pass): please report it with the model")
