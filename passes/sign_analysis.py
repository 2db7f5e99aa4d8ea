"""Sign analysis: which nodes of a graph provably produce values ``>= 0``.

The insert-quantizers pass builds an *unsigned* activation quantizer (range ``[0, q_max]``) for a
node this analysis proves non-negative; every other activation quantizer starts signed (and
calibration may still make it unsigned from the data). An unsigned quantizer on a value that can
be negative clips every negative value to 0, a silent wrong answer, so the analysis only claims
what it can prove: an op without a rule, or a rule that cannot decide, means "may be negative".

Per-op knowledge lives in :data:`NONNEG_RULES` (keyed by module class, function or method name).
A rule receives a :class:`SignFacts` for one node and answers whether its output is ``>= 0``.
Two kinds of rules:

* **Operand-blind** ops (pooling, reshapes, slicing, concat, ...) rearrange, select or average
  their tensor inputs; their non-tensor arguments are shapes, dims or sizes (``view(-1, 10)``,
  ``mean(1)``), never operands. Non-negative when every tensor input is.
* **Arithmetic** ops (``mul``, ``add``, ``sub``, ``div``, ``rsub``, ``pow``, ``clamp``,
  ``hardtanh``) read their operands by position/keyword, and a scalar operand counts with its
  sign: ``relu(x) * -1.0``, ``relu(x) + (-0.5)``, ``y.add(z, alpha=-1)``, ``clamp(y, max=-1)``
  are *not* non-negative, ``relu(x) * 2.0`` and ``relu(x) + 0.5`` are. An operand that is
  neither a plain number nor a node proven non-negative (a symbolic size, a tensor constant)
  counts as possibly negative.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Set
from dataclasses import dataclass
from numbers import Real

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from djpq_compiler import op_facts as facts
from djpq_compiler.layers import tensor_shape
from djpq_compiler.modules.quantizers import DQQuantizer
from djpq_compiler.registry import Registry

__all__ = ["NONNEG_RULES", "NonnegRule", "SignFacts", "nonnegative_nodes"]


@dataclass(frozen=True)
class SignFacts:
    """What a rule may ask about one node: its arguments and which nodes are non-negative.

    Attributes:
        gm: The graph module (for module attributes, e.g. ``nn.Hardtanh.min_val``).
        node: The node the rule decides.
        known: Names of the nodes already proven non-negative (every node before ``node``).
    """

    gm: fx.GraphModule
    node: fx.Node
    known: Set[str]

    def operand(self, index: int, keyword: str | None = None, default: object = None) -> object:
        """Argument ``index`` (positional; ``self``/``input`` is 0) or keyword ``keyword``.

        Positions agree between ``torch.f(input, a, b)`` and ``Tensor.f(self, a, b)`` for the
        ops registered here, so one lookup serves both.
        """
        if len(self.node.args) > index:
            return self.node.args[index]
        if keyword is not None and keyword in self.node.kwargs:
            return self.node.kwargs[keyword]
        return default

    def nonneg(self, value: object) -> bool:
        """Whether ``value`` (a node or a plain number) is provably ``>= 0``."""
        if isinstance(value, fx.Node):
            return value.name in self.known
        number = _number(value)
        return number is not None and number >= 0

    def tensor_inputs_nonneg(self) -> bool:
        """Whether the node has tensor inputs and every one of them is non-negative."""
        tensors = [a for a in self.node.all_input_nodes if tensor_shape(a) is not None]
        return bool(tensors) and all(a.name in self.known for a in tensors)

    def module(self) -> nn.Module:
        """The called module of a ``call_module`` node."""
        return self.gm.get_submodule(str(self.node.target))


NonnegRule = Callable[[SignFacts], bool]
#: Whether an op's output is provably ``>= 0`` (see the module docstring).
NONNEG_RULES: Registry[NonnegRule] = Registry("nonneg")


def _number(value: object) -> float | None:
    """``value`` as a float when it is a plain real number (bool and int included), else None."""
    if isinstance(value, Real) and not isinstance(value, torch.Tensor):
        number = float(value)
        return None if math.isnan(number) else number
    return None


def _product_sign_known(facts: SignFacts, value: object, alpha: object, nonpos: bool) -> bool:
    """Whether ``alpha * value`` is provably ``>= 0`` (``nonpos=False``) or ``<= 0`` (True).

    ``alpha`` must be a plain number; ``value`` a plain number or a node proven non-negative
    (then the product's sign is ``alpha``'s).
    """
    a, v = _number(alpha), _number(value)
    if a is None:
        return False
    if v is not None:
        return a * v <= 0 if nonpos else a * v >= 0
    if not facts.nonneg(value):
        return False
    return a <= 0 if nonpos else a >= 0


@NONNEG_RULES.register(*facts.ALWAYS_NONNEG)
def _always_nonneg(facts: SignFacts) -> bool:
    return True


@NONNEG_RULES.register(*facts.SIGN_PRESERVING, DQQuantizer)
def _operand_blind(facts: SignFacts) -> bool:
    """Rearranging/selecting/averaging ops: scalar arguments are dims or sizes, not operands."""
    return facts.tensor_inputs_nonneg()


@NONNEG_RULES.register(operator.mul, torch.mul, torch.multiply, "mul", "mul_", "multiply")
def _mul(facts: SignFacts) -> bool:
    return facts.nonneg(facts.operand(0, "input")) and facts.nonneg(facts.operand(1, "other"))


@NONNEG_RULES.register(operator.add, torch.add, "add", "add_")
def _add(facts: SignFacts) -> bool:
    """``a + alpha * b``."""
    alpha = facts.node.kwargs.get("alpha", 1)
    return (facts.nonneg(facts.operand(0, "input"))
            and _product_sign_known(facts, facts.operand(1, "other"), alpha, nonpos=False))


@NONNEG_RULES.register(operator.sub, torch.sub, torch.subtract, "sub", "sub_", "subtract")
def _sub(facts: SignFacts) -> bool:
    """``a - alpha * b``: non-negative when ``a`` is and ``alpha * b <= 0``."""
    alpha = facts.node.kwargs.get("alpha", 1)
    return (facts.nonneg(facts.operand(0, "input"))
            and _product_sign_known(facts, facts.operand(1, "other"), alpha, nonpos=True))


@NONNEG_RULES.register(torch.rsub)
def _rsub(facts: SignFacts) -> bool:
    """``torch.rsub(input, other, alpha)`` is ``other - alpha * input``."""
    alpha = facts.node.kwargs.get("alpha", 1)
    return (facts.nonneg(facts.operand(1, "other"))
            and _product_sign_known(facts, facts.operand(0, "input"), alpha, nonpos=True))


@NONNEG_RULES.register(
    operator.truediv, operator.floordiv, torch.div, torch.divide, torch.true_divide,
    torch.floor_divide, "div", "div_", "divide", "true_divide", "floor_divide",
)
def _div(facts: SignFacts) -> bool:
    """``a / b``: a non-negative numerator over a positive number or a non-negative node."""
    divisor = facts.operand(1, "other")
    number = _number(divisor)
    positive = number > 0 if number is not None else facts.nonneg(divisor)
    return facts.nonneg(facts.operand(0, "input")) and positive


@NONNEG_RULES.register(operator.pow, torch.pow, "pow")
def _pow(facts: SignFacts) -> bool:
    """``base ** exponent``: non-negative base, or an even integer exponent."""
    exponent = _number(facts.operand(1, "exponent"))
    even = exponent is not None and exponent.is_integer() and int(exponent) % 2 == 0
    return facts.nonneg(facts.operand(0, "input")) or even


def _clamped_nonneg(facts: SignFacts, lo: object, hi: object) -> bool:
    """``min(max(x, lo), hi)`` (a bound of ``None`` is absent) is ``>= 0``."""
    if hi is not None and not facts.nonneg(hi):
        return False
    return facts.nonneg(facts.operand(0, "input")) or (lo is not None and facts.nonneg(lo))


@NONNEG_RULES.register(torch.clamp, torch.clip, "clamp", "clamp_", "clip", "clip_")
def _clamp(facts: SignFacts) -> bool:
    return _clamped_nonneg(facts, facts.operand(1, "min"), facts.operand(2, "max"))


@NONNEG_RULES.register(torch.clamp_min, "clamp_min", "clamp_min_")
def _clamp_min(facts: SignFacts) -> bool:
    return _clamped_nonneg(facts, facts.operand(1, "min"), None)


@NONNEG_RULES.register(torch.clamp_max, "clamp_max", "clamp_max_")
def _clamp_max(facts: SignFacts) -> bool:
    return _clamped_nonneg(facts, None, facts.operand(1, "max"))


@NONNEG_RULES.register(F.hardtanh)
def _hardtanh_fn(facts: SignFacts) -> bool:
    return _clamped_nonneg(facts, facts.operand(1, "min_val", -1.0),
                           facts.operand(2, "max_val", 1.0))


@NONNEG_RULES.register(nn.Hardtanh)
def _hardtanh_module(facts: SignFacts) -> bool:
    module = facts.module()
    return _clamped_nonneg(facts, getattr(module, "min_val", -1.0),
                           getattr(module, "max_val", 1.0))


def nonnegative_nodes(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes whose output is provably non-negative (see :data:`NONNEG_RULES`).

    Args:
        gm: A graph in topological order (any fx graph is).

    Returns:
        The set of node names; a node without a rule is never in it.
    """
    nonneg: set[str] = set()
    for node in gm.graph.nodes:
        rule = NONNEG_RULES.lookup(gm, node)
        if rule is not None and rule(SignFacts(gm, node, nonneg)):
            nonneg.add(node.name)
    return nonneg
