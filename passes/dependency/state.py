"""Mutable state of one dependency analysis: channel spaces, element unions, roles, barriers.

A *channel space* is the channel dimension of one tensor-valued node (``dim`` in its shape). Each
element (channel) of each space gets a global id; rules record which elements must be kept or
removed together (``union``). Connected elements form *atoms*, connected spaces form *groups*.
Rules only talk to :class:`AnalysisState`; the result is frozen into ``ChannelGroup`` records by
``groups.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

__all__ = ["Space", "Field", "Opaque", "Info", "Zero", "Role", "AnalysisState"]


@dataclass
class Space:
    """The channel dimension ``dim`` (non-negative) of node ``node``'s output."""

    id: int
    node: str
    dim: int
    size: int
    base: int  # global id of element 0

    def ids(self) -> np.ndarray:
        return np.arange(self.base, self.base + self.size, dtype=np.int64)


@dataclass
class Field:
    """A tensor whose channels are not (yet) one dimension: each entry holds a global element id
    (-1 = untracked). Produced by shape ops such as the first ``view`` of a channel shuffle."""

    ids: torch.Tensor
    piece: bool = False  # one output of split/chunk: clean, resolved by the getitem that reads it


@dataclass
class Opaque:
    """A tensor whose channels are not tracked (network input, output of an op with no rule)."""

    reason: str


Info = Space | Field | Opaque | None | tuple  # tuple: structured outputs (split, chunk)


class Zero(enum.Enum):
    """How an op maps "input channel is zero" to "output channel is zero" (DESIGN invariant 1)."""

    GATE = "gate"  # a gate multiplies this output: removed channels are zero
    SAME = "same"  # f(0) = 0 elementwise (relu, pooling, shape ops): zero iff all inputs zero
    ANY = "any"  # product: zero iff any tracked input is zero
    FIRST = "first"  # quotient: zero iff the numerator is zero
    NEVER = "never"  # f(0) != 0 (sigmoid, BN without gate, + constant)


@dataclass(frozen=True)
class Role:
    """What a node does to a space.

    kind: ``producer`` (removing channels slices its output parameters), ``consumer`` (slices its
    input parameters), ``param`` (per-channel parameters of a pass-through op, or a ``get_attr``
    tensor), ``gate`` (a gate multiplies the output here), ``reshape`` (a literal size argument to
    rewrite), ``select`` (a channel selection to rewrite as ``index_select``).
    target: module path / get_attr target / node name the role acts on. dim: tensor dimension of
    that target's parameter (or of the node output) indexed by the space's elements.
    """

    kind: str
    node: str
    target: str
    dim: int
    source_index: tuple[int, ...] = ()  # select: the source channel each output channel reads


@dataclass
class AnalysisState:
    gm: fx.GraphModule
    strict: bool = False
    spaces: list[Space] = field(default_factory=list)
    info: dict[str, Info] = field(default_factory=dict)
    pairs_a: list[np.ndarray] = field(default_factory=list)
    pairs_b: list[np.ndarray] = field(default_factory=list)
    space_edges: set[tuple[int, int]] = field(default_factory=set)
    roles: dict[int, list[Role]] = field(default_factory=dict)
    barriers: dict[int, list[str]] = field(default_factory=dict)
    zero_kind: dict[str, Zero] = field(default_factory=dict)
    gate_points: dict[str, Space] = field(default_factory=dict)
    external_nonzero: set[str] = field(default_factory=set)
    module_calls: dict[str, list[tuple[Space | None, Space | None]]] = field(default_factory=dict)
    n_elements: int = 0

    def new_space(self, node: fx.Node, dim: int, size: int) -> Space:
        space = Space(len(self.spaces), node.name, dim, size, self.n_elements)
        self.n_elements += size
        self.spaces.append(space)
        return space

    def union(self, a: Space, b: Space, a_idx: np.ndarray | None = None,
              b_idx: np.ndarray | None = None) -> None:
        """Elements ``a[a_idx[i]]`` and ``b[b_idx[i]]`` are kept or removed together."""
        a_ids = a.ids() if a_idx is None else a.base + np.asarray(a_idx, dtype=np.int64)
        b_ids = b.ids() if b_idx is None else b.base + np.asarray(b_idx, dtype=np.int64)
        if a_ids.shape != b_ids.shape:
            raise ValueError(f"union of {a_ids.shape} and {b_ids.shape} ids")
        if a_ids.size:
            self.pairs_a.append(a_ids)
            self.pairs_b.append(b_ids)
            self.space_edges.add((a.id, b.id))

    def union_ids(self, a_ids: np.ndarray, b_ids: np.ndarray) -> None:
        """Like :meth:`union` for global element ids that may span several spaces."""
        if a_ids.shape != b_ids.shape:
            raise ValueError(f"union of {a_ids.shape} and {b_ids.shape} ids")
        if a_ids.size == 0:
            return
        self.pairs_a.append(a_ids)
        self.pairs_b.append(b_ids)
        n = len(self.spaces)
        codes = np.unique(self.space_of_ids(a_ids) * n + self.space_of_ids(b_ids))
        self.space_edges.update((int(c // n), int(c % n)) for c in codes)

    def space_of_ids(self, ids: np.ndarray) -> np.ndarray:
        bases = np.array([s.base for s in self.spaces], dtype=np.int64)
        return np.searchsorted(bases, ids, side="right") - 1

    def add_role(self, space: Space, role: Role) -> None:
        self.roles.setdefault(space.id, []).append(role)

    def barrier(self, space: Space, reason: str) -> None:
        self.barriers.setdefault(space.id, []).append(reason)

    def barrier_info(self, info: Info, reason: str) -> None:
        """Make every space that ``info`` touches a barrier."""
        for space in self.spaces_in(info):
            self.barrier(space, reason)

    def spaces_in(self, info: Info) -> list[Space]:
        if isinstance(info, Space):
            return [info]
        if isinstance(info, Field):
            ids = info.ids[info.ids >= 0].unique().numpy()
            return [self.spaces[i] for i in np.unique(self.space_of_ids(ids)).tolist()] \
                if ids.size else []
        if isinstance(info, tuple):
            return [s for item in info for s in self.spaces_in(item)]
        return []
