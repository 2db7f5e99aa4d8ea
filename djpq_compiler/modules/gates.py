"""The VIB gate: one learnable, stochastic multiplicative gate per channel group (VIBNet).

A gate owns ``n_atoms`` channels ("atoms") with parameters ``mu`` and ``log_sigma2``. While training
it multiplies its producers' outputs by ``z = mu + eps * sigma`` (``eps ~ N(0, 1)`` per sample and
atom, broadcast over the remaining dimensions); in eval (or deterministic) mode by the hard gate
``z = mu * 1[log alpha > log tau]`` with ``alpha = mu^2 / sigma^2``. See REFERENCE.md §1.

Sharing the noise within a group
--------------------------------
One gate multiplies *several* producers (every member of a channel group); all of them must see the
same ``eps`` for a given sample batch, otherwise the group's channels would be gated
inconsistently. [choice] The gate therefore draws ``eps`` lazily on the first call of a *step* and
reuses it until :meth:`VIBGate.new_step` is called:

* :func:`attach_step_hook` registers a forward-pre-hook and a forward-hook on the root model:
  before each forward pass of the root every gate inside forgets its noise and starts caching;
  after it, the cache is dropped again. ``prepare()`` calls it once; nothing else is needed.
* Outside a root forward pass (a gate used on its own, or a model without the hook) a gate draws
  fresh noise on every call, so noise can never silently go stale across steps.
* Within one step, a call with a different batch size / device than the cached noise raises
  :class:`~djpq_compiler.errors.PruningError` (two producers of one group must see the same batch).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from djpq_compiler.errors import ConfigError, PruningError, QuantizationError
from djpq_compiler.modules.saved import ForwardHooksHandle, mark_product, remove_hooks

if TYPE_CHECKING:
    from djpq_compiler.config import GateSpec

__all__ = ["VIBGate", "StepHookHandle", "attach_step_hook", "detach_step_hook"]


class VIBGate(nn.Module):
    """A VIB gate over ``n_atoms`` channels, shared by all producers of one channel group.

    Args:
        n_atoms: Number of gated channels (atoms) of the group.
        mu_init: Initial ``mu`` (gates start open: ``mu ~ 1``).
        mu_jitter: ``mu`` is initialised uniformly in ``mu_init +- mu_jitter`` [choice: uniform].
        log_sigma2_init: Initial ``log sigma^2`` (``-9``: almost no noise, nothing pruned).
        threshold: ``tau``; an atom is kept iff ``log alpha > log tau`` (default ``tau = 1``).

    Attributes:
        deterministic: When ``True`` the hard eval gate is used even in training mode.
    """

    def __init__(
        self,
        n_atoms: int,
        mu_init: float = 1.0,
        mu_jitter: float = 0.01,
        log_sigma2_init: float = -9.0,
        threshold: float = 1.0,
    ) -> None:
        super().__init__()
        _check_gate_args(n_atoms, mu_init, mu_jitter, log_sigma2_init, threshold)
        self.n_atoms = int(n_atoms)
        self.threshold = float(threshold)
        jitter = (torch.rand(n_atoms) * 2.0 - 1.0) * mu_jitter
        self.mu = nn.Parameter(torch.full((n_atoms,), float(mu_init)) + jitter)
        self.log_sigma2 = nn.Parameter(torch.full((n_atoms,), float(log_sigma2_init)))
        self.deterministic = False
        #: Atom sets each of which must keep an atom (a concat branch, a split piece: a member
        #: that covers only part of the group); set by ``insert_gates``.
        self.required: tuple[tuple[int, ...], ...] = ()
        self._step_active = False  # inside a root forward pass (see attach_step_hook)
        self._eps: torch.Tensor | None = None

    @classmethod
    def from_spec(cls, n_atoms: int, spec: GateSpec) -> VIBGate:
        """Build a gate from a :class:`~djpq_compiler.config.GateSpec`."""
        return cls(
            n_atoms,
            mu_init=spec.mu_init,
            mu_jitter=spec.mu_jitter,
            log_sigma2_init=spec.log_sigma2_init,
            threshold=spec.threshold,
        )

    # ----------------------------------------------------------------------------- statistics
    @property
    def log_threshold(self) -> float:
        """``log tau``."""
        return math.log(self.threshold)

    def sigma(self) -> torch.Tensor:
        """``sigma = exp(log_sigma2 / 2)``, shape ``(n,)``."""
        return torch.exp(0.5 * self.log_sigma2)

    def log_alpha(self) -> torch.Tensor:
        """``log alpha = log mu^2 - log sigma^2``, finite (and with finite gradients) at ``mu = 0``.

        ``mu^2`` is offset by the smallest normal number of its dtype, so ``log`` never sees 0.
        """
        tiny = torch.finfo(self.mu.dtype).tiny
        return torch.log(self.mu.square() + tiny) - self.log_sigma2

    def alpha(self) -> torch.Tensor:
        """``alpha = mu^2 / sigma^2``."""
        return torch.exp(self.log_alpha())

    def kl(self) -> torch.Tensor:
        """Per-atom VIB penalty ``0.5 * log(1 + alpha) = 0.5 * softplus(log alpha)``, ``(n,)``."""
        return 0.5 * nn.functional.softplus(self.log_alpha())

    def keep_mask(self) -> torch.Tensor:
        """Boolean ``(n,)`` mask of the atoms kept by the hard gate (``log alpha > log tau``)."""
        with torch.no_grad():
            return self.log_alpha() > self.log_threshold

    def emptied(self) -> list[tuple[int, ...]]:
        """The :attr:`required` atom sets (whole group if none) the hard gate closes entirely."""
        mask = self.keep_mask()
        sets = self.required or (tuple(range(self.n_atoms)),)
        return [atoms for atoms in sets if not bool(mask[list(atoms)].any())]

    def deploy_mask(self, round_to: int = 1) -> torch.Tensor:
        """The atoms ``convert`` keeps: :meth:`keep_mask`, but never empty — a group (or a
        :attr:`required` atom set: a concat branch, a split piece) whose gate would close
        completely keeps its atom with the largest alpha (a layer cannot have zero channels) —
        and with the kept count rounded up to a multiple of ``round_to`` (capped at the group
        size) by re-admitting the pruned atoms of largest alpha (hardware-friendly channel
        counts). BOPs of prepared models count this same mask."""
        with torch.no_grad():
            mask = self.keep_mask().clone()
            log_alpha = self.log_alpha().detach()
            for atoms in self.emptied():
                index = torch.tensor(atoms, dtype=torch.long)
                mask[index[torch.argmax(log_alpha[index])]] = True
            n = len(mask)
            target = min(n, max(1, -(-int(mask.sum()) // round_to) * round_to))
            missing = target - int(mask.sum())
            if missing > 0:
                alpha = self.log_alpha().detach().clone()
                alpha[mask] = -torch.inf
                mask[torch.topk(alpha, missing).indices] = True
            return mask

    def n_kept(self) -> int:
        """Number of atoms the hard gate keeps."""
        return int(self.keep_mask().sum().item())

    def soft_keep(self, temperature: float = 1.0) -> torch.Tensor:
        """Differentiable keep probability ``sigmoid((log alpha - log tau) / T)``, ``(n,)``."""
        if not temperature > 0.0:
            raise ConfigError(f"soft_keep temperature must be > 0, got {temperature!r}")
        return torch.sigmoid((self.log_alpha() - self.log_threshold) / temperature)

    def hard_z(self) -> torch.Tensor:
        """The deterministic gate ``mu * 1[log alpha > log tau]``, shape ``(n,)``."""
        return self.mu * self.keep_mask().to(self.mu.dtype)

    # ------------------------------------------------------------------------------- sampling
    @property
    def stochastic(self) -> bool:
        """Whether the forward pass samples (training mode and not deterministic)."""
        return self.training and not self.deterministic

    def new_step(self, active: bool = True) -> None:
        """Forget the cached noise and start (``active``) or end a step of shared noise.

        While a step is active the first stochastic call draws ``eps`` and later calls reuse it;
        otherwise every call draws fresh noise.
        """
        self._eps = None
        self._step_active = active

    def noise(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """The ``eps`` of the current step, shape ``(batch_size, n)``, drawn on first use.

        Raises:
            PruningError: If this step's noise was drawn for another batch size or device.
        """
        device = self.mu.device if device is None else device
        eps = self._eps
        if eps is not None and self._step_active:
            if eps.shape[0] != batch_size or eps.device != device:
                raise PruningError(
                    f"VIBGate(n_atoms={self.n_atoms}): producers of one channel group saw batch "
                    f"sizes {eps.shape[0]} and {batch_size} (or devices {eps.device}, {device}) in "
                    "one forward step; all members of a group must process the same batch"
                )
            return eps
        eps = torch.randn(batch_size, self.n_atoms, device=device, dtype=self.mu.dtype)
        if self._step_active:
            self._eps = eps
        return eps

    def sample(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """Stochastic gate values ``mu + eps * sigma`` of the current step, shape ``(N, n)``."""
        return self.mu + self.noise(batch_size, device) * self.sigma()

    # -------------------------------------------------------------------------------- forward
    def forward(
        self, x: torch.Tensor, index: torch.Tensor | None = None, dim: int = 1
    ) -> torch.Tensor:
        """Multiply ``x`` along channel ``dim`` by the gate gathered at ``index``.

        Args:
            x: A producer's output; dimension 0 is the batch.
            index: ``LongTensor`` of shape ``(x.shape[dim],)`` mapping each channel of ``x`` to an
                atom of this gate, or ``None`` for the identity map (then ``x.shape[dim] == n``).
            dim: The channel dimension of ``x`` (may be negative, must not be the batch dim).

        Returns:
            ``x * z`` with ``z`` broadcast over every other dimension (per sample when training).
        """
        axis = self._channel_axis(x, dim)
        n_channels = x.shape[axis]
        self._check_index(index, n_channels)
        if self.stochastic:
            z = self.sample(x.shape[0], x.device)
            z = z if index is None else z.index_select(1, index)
            shape = [1] * x.ndim
            shape[0], shape[axis] = x.shape[0], n_channels
        else:
            z = self.hard_z()
            z = z if index is None else z.index_select(0, index)
            shape = [1] * x.ndim
            shape[axis] = n_channels
        factor = z.reshape(shape).to(x.dtype)
        out: torch.Tensor = _GateMul.apply(x, factor)
        mark_product(out, x, factor)  # a quantizer saving the output may recompute it from x
        return out

    def _channel_axis(self, x: torch.Tensor, dim: int) -> int:
        if x.ndim < 2:
            raise PruningError(
                f"VIBGate(n_atoms={self.n_atoms}) needs a batched input (N, C, ...), "
                f"got shape {tuple(x.shape)}"
            )
        axis = dim + x.ndim if dim < 0 else dim
        if not 1 <= axis < x.ndim:
            raise PruningError(
                f"VIBGate(n_atoms={self.n_atoms}): channel dim {dim} is invalid for an input of "
                f"shape {tuple(x.shape)} (dim 0 is the batch)"
            )
        return axis

    def _check_index(self, index: torch.Tensor | None, n_channels: int) -> None:
        if index is None:
            if n_channels != self.n_atoms:
                raise PruningError(
                    f"VIBGate(n_atoms={self.n_atoms}) got {n_channels} channels and no index map"
                )
            return
        if index.dtype != torch.long or index.ndim != 1 or index.shape[0] != n_channels:
            raise PruningError(
                f"VIBGate(n_atoms={self.n_atoms}): index must be a 1-D LongTensor with one entry "
                f"per channel ({n_channels}), got dtype {index.dtype} shape {tuple(index.shape)}"
            )

    # ----------------------------------------------------------------------------- validation
    def check_finite(self, name: str) -> None:
        """Raise :class:`QuantizationError` naming this gate if ``mu``/``log_sigma2`` is NaN/Inf."""
        for pname, value in (("mu", self.mu), ("log_sigma2", self.log_sigma2)):
            bad = ~torch.isfinite(value.detach())
            if bool(bad.any()):
                atoms = bad.nonzero().flatten()[:8].tolist()
                raise QuantizationError(
                    f"gate '{name}': parameter {pname} is not finite at atoms {atoms} "
                    "(training diverged; lower the learning rate or the regulariser weight)"
                )

    def extra_repr(self) -> str:
        return (
            f"n_atoms={self.n_atoms}, threshold={self.threshold}, "
            f"deterministic={self.deterministic}"
        )


class _GateMul(torch.autograd.Function):
    """``x * factor`` (``factor`` broadcast, small) with the gradients of autograd's multiply,
    computed with one full-size buffer instead of two: ``grad * x`` is reduced to the factor's
    shape first, then the buffer is overwritten with the input gradient ``grad * factor``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, factor)
        return x * factor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, factor = ctx.saved_tensors
        need_x, need_f = ctx.needs_input_grad
        buf = gf = None
        if need_f:
            buf = torch.mul(grad, x)
            gf = buf.sum_to_size(factor.shape)
        if not need_x:
            return None, gf
        if buf is None or (gf is not None and gf.data_ptr() == buf.data_ptr()):
            return torch.mul(grad, factor), gf  # (N, C) input: the reduction is the buffer
        return torch.mul(grad, factor, out=buf), gf


def _check_gate_args(
    n_atoms: int, mu_init: float, mu_jitter: float, log_sigma2_init: float, threshold: float
) -> None:
    if isinstance(n_atoms, bool) or not isinstance(n_atoms, int) or n_atoms < 1:
        raise ConfigError(f"VIBGate n_atoms must be a positive int, got {n_atoms!r}")
    for name, value in (("mu_init", mu_init), ("log_sigma2_init", log_sigma2_init)):
        if not math.isfinite(value):
            raise ConfigError(f"VIBGate {name} must be finite, got {value!r}")
    if not (math.isfinite(mu_jitter) and mu_jitter >= 0.0):
        raise ConfigError(f"VIBGate mu_jitter must be finite and >= 0, got {mu_jitter!r}")
    if not (math.isfinite(threshold) and threshold > 0.0):
        raise ConfigError(f"VIBGate threshold (tau) must be finite and > 0, got {threshold!r}")


def _begin_step(module: nn.Module, args: object) -> None:
    for sub in module.modules():
        if isinstance(sub, VIBGate):
            sub.new_step(active=True)


def _end_step(module: nn.Module, args: object, output: object) -> None:
    for sub in module.modules():
        if isinstance(sub, VIBGate):
            sub.new_step(active=False)


#: Handle returned by :func:`attach_step_hook`; ``remove()`` detaches both hooks.
StepHookHandle = ForwardHooksHandle


def attach_step_hook(root: nn.Module) -> StepHookHandle:
    """Make every gate in ``root`` share its noise across one forward pass of ``root``.

    Registers on ``root`` a forward-pre-hook that starts a step on every gate inside it (fresh,
    then cached noise) and a forward-hook that ends it. Both hooks are module-level functions, so
    ``root`` stays picklable and deep-copyable. Gates added to ``root`` later are covered too.

    Returns:
        A handle whose ``remove()`` detaches both hooks.
    """
    if isinstance(root, fx.GraphModule):  # its deepcopy drops forward hooks: re-attach them
        root._register_deepcopy_hook(_attach_step_hook)
    return _attach_step_hook(root)


def _attach_step_hook(root: nn.Module) -> StepHookHandle:
    return StepHookHandle(
        (root.register_forward_pre_hook(_begin_step), root.register_forward_hook(_end_step))
    )


def detach_step_hook(root: nn.Module) -> None:
    """Undo :func:`attach_step_hook` on ``root`` (and on its future deep copies)."""
    remove_hooks(root, (_begin_step, _end_step), _attach_step_hook)
