"""DJPQ configuration: frozen dataclasses validated on construction, with per-module overrides.

Every invalid value raises :class:`~djpq_compiler.errors.ConfigError` naming the field and its
valid range. ``DJPQConfig.resolve`` gives the effective settings of one module; the precedence
mirrors ``QConfigMapping`` (module name > module name regex > object type > global)::

    ignore  >  exact name  >  name pattern  >  module type  >  first/last-layer rule  >  global

Example::

    cfg = DJPQConfig(
        weight=QuantSpec(bits=4),
        overrides=(Override("classifier.*", weight=QuantSpec(bits=8, learn_bits=False)),
                   Override(nn.Linear, prune=False)),
    )
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase

from torch import nn

from djpq_compiler.errors import ConfigError

__all__ = [
    "QuantSpec",
    "GateSpec",
    "Override",
    "ResolvedLayerConfig",
    "DJPQConfig",
    "LOSS_KINDS",
]

#: ``"vib_bops"``: VIB penalty weighted by BOPs (the paper's reading, default);
#: ``"soft_bops"``: soft-BOPs / FP32-BOPs. See REFERENCE.md §1.
LOSS_KINDS = ("vib_bops", "soft_bops")
_GLOB_CHARS = frozenset("*?[")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bool(owner: str, name: str, value: object, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        allowed = "True, False or None" if optional else "True or False"
        raise ConfigError(f"{owner}.{name} must be {allowed}, got {value!r}")


def _check_int_range(owner: str, name: str, value: object, lo: int, hi: int | None) -> None:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):  # type: ignore[operator]
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{owner}.{name} must be an int in {rng}, got {value!r}")


def _check_finite(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} must be a finite number, got {value!r}")


def _is_pattern(match: str) -> bool:
    return any(c in _GLOB_CHARS for c in match)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor kind (weights or activations) is quantized.

    Attributes:
        bits: Initial bit-width (the fixed one when ``learn_bits=False``), in ``[2, 32]``.
        min_bits: Smallest read-out bit-width, ``>= 2``.
        max_bits: Largest read-out bit-width, ``<= 32``.
        learn_bits: Learn the bit-width (DQ); ``False`` gives a fixed-bit fake-quant baseline.
        signed: Signed grid; ``None`` = automatic (weights signed, activations unsigned when the
            graph proves them non-negative, e.g. after ReLU).
        per_channel: One step/clip per output channel instead of per tensor.
        bind_min_bits: Also hold the *training* bit-width at ``>= min_bits`` (the learned step is
            capped at ``q_max / levels(min_bits)``, so the continuous bits, the BOPs penalty and
            the fake-quant grid never go below the floor); ``False`` (default): ``min_bits``
            acts at read-out only and training may go below it.
    """

    bits: int = 8
    min_bits: int = 2
    max_bits: int = 16
    learn_bits: bool = True
    signed: bool | None = None
    per_channel: bool = False
    bind_min_bits: bool = False

    def __post_init__(self) -> None:
        owner = "QuantSpec"
        _check_int_range(owner, "bits", self.bits, 2, 32)
        _check_int_range(owner, "min_bits", self.min_bits, 2, 32)
        _check_int_range(owner, "max_bits", self.max_bits, 2, 32)
        if self.min_bits > self.max_bits:
            raise ConfigError(
                f"QuantSpec.min_bits ({self.min_bits}) must be <= max_bits ({self.max_bits})"
            )
        if not self.min_bits <= self.bits <= self.max_bits:
            raise ConfigError(
                f"QuantSpec.bits must lie in [min_bits, max_bits] = "
                f"[{self.min_bits}, {self.max_bits}], got {self.bits}"
            )
        _check_bool(owner, "learn_bits", self.learn_bits)
        _check_bool(owner, "signed", self.signed, optional=True)
        _check_bool(owner, "per_channel", self.per_channel)
        _check_bool(owner, "bind_min_bits", self.bind_min_bits)


@dataclass(frozen=True)
class GateSpec:
    """Initialisation and threshold of the VIB gates.

    Attributes:
        mu_init: Initial ``mu`` (finite, non-zero).
        log_sigma2_init: Initial ``log sigma^2`` (finite).
        threshold: ``tau > 0``; a channel is kept iff ``log alpha > log tau``.
        mu_jitter: ``mu`` starts uniformly in ``mu_init +- mu_jitter`` (``>= 0``).

    Gates must start open: ``log(mu_init^2) - log_sigma2_init > log tau`` (with margin for the
    jitter), else :class:`ConfigError`.
    """

    mu_init: float = 1.0
    log_sigma2_init: float = -9.0
    threshold: float = 1.0
    mu_jitter: float = 0.01

    def __post_init__(self) -> None:
        for name in ("mu_init", "log_sigma2_init", "threshold", "mu_jitter"):
            _check_finite("GateSpec", name, getattr(self, name))
        if self.threshold <= 0:
            raise ConfigError(f"GateSpec.threshold (tau) must be > 0, got {self.threshold}")
        if self.mu_jitter < 0:
            raise ConfigError(f"GateSpec.mu_jitter must be >= 0, got {self.mu_jitter}")
        smallest_mu = abs(self.mu_init) - self.mu_jitter
        if smallest_mu <= 0 or (
            2 * math.log(smallest_mu) - self.log_sigma2_init <= math.log(self.threshold)
        ):
            raise ConfigError(
                "GateSpec: gates would start closed (need log(mu_init^2) - log_sigma2_init > "
                f"log(threshold) for |mu_init| - mu_jitter > 0); got mu_init={self.mu_init}, "
                f"mu_jitter={self.mu_jitter}, log_sigma2_init={self.log_sigma2_init}, "
                f"threshold={self.threshold}"
            )


@dataclass(frozen=True)
class Override:
    """Per-module settings that replace the global ones for matching modules.

    Attributes:
        match: A module qualified name (``"layer1.0.conv1"``), an ``fnmatch`` pattern on it
            (``"layer1.*"``; ``*`` also matches dots; case-sensitive), or an ``nn.Module`` subclass
            (matches instances of it and of its subclasses).
        weight: Weight quantization of the matching modules, or ``None`` to leave it.
        activation: Activation quantization, or ``None`` to leave it.
        prune: Whether the matching modules' output channels may be pruned, or ``None``.
        gamma_scale: Factor on the matching layers' terms of the DJPQ regulariser (``djpq_loss``),
            a finite number ``>= 0``, or ``None`` (1): ``0.5`` halves the BOPs penalty of those
            layers (their bits and channels are cheaper to keep), ``2`` doubles it, ``0`` leaves
            them to the task loss alone. Per-group regularisation strength on top of ``gamma``.
    """

    match: str | type[nn.Module]
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    prune: bool | None = None
    gamma_scale: float | None = None

    def __post_init__(self) -> None:
        m = self.match
        if isinstance(m, str):
            if not m:
                raise ConfigError("Override.match must be a non-empty module name or pattern")
        elif not (isinstance(m, type) and issubclass(m, nn.Module)):
            raise ConfigError(
                f"Override.match must be a module name, an fnmatch pattern or an nn.Module "
                f"subclass, got {m!r}"
            )
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QuantSpec):
                raise ConfigError(f"Override.{name} must be a QuantSpec or None, got {value!r}")
        _check_bool("Override", "prune", self.prune, optional=True)
        if self.gamma_scale is not None:
            _check_finite("Override", "gamma_scale", self.gamma_scale)
            if self.gamma_scale < 0:
                raise ConfigError(
                    f"Override.gamma_scale must be >= 0 (a factor on the layer's regulariser "
                    f"term), got {self.gamma_scale!r}"
                )
        if (self.weight is None and self.activation is None and self.prune is None
                and self.gamma_scale is None):
            raise ConfigError(
                f"Override({m!r}) sets nothing: give at least one of weight, activation, prune, "
                "gamma_scale"
            )

    @property
    def kind(self) -> str:
        """``"name"``, ``"pattern"`` or ``"type"``."""
        if isinstance(self.match, str):
            return "pattern" if _is_pattern(self.match) else "name"
        return "type"

    def matches(self, module_name: str, module_type: type) -> bool:
        """Whether this override applies to the module."""
        if isinstance(self.match, str):
            return fnmatchcase(module_name, self.match)
        return isinstance(module_type, type) and issubclass(module_type, self.match)


@dataclass(frozen=True)
class ResolvedLayerConfig:
    """Effective settings of one module after applying :meth:`DJPQConfig.resolve`.

    Attributes:
        module_name: The module's qualified name.
        weight: Weight quantization, or ``None`` (not quantized).
        activation: Activation quantization, or ``None``.
        prune: Whether the module's output channels may be pruned.
        ignored: The module matched ``DJPQConfig.ignore`` (no quantization, no pruning).
        sources: ``(field, source)`` pairs saying which rule set each field, e.g.
            ``("weight", "name 'fc'")``, ``("prune", "global")``.
        gamma_scale: Factor on the layer's term of the DJPQ regulariser (1: plain ``gamma``).
    """

    module_name: str
    weight: QuantSpec | None
    activation: QuantSpec | None
    prune: bool
    ignored: bool = False
    sources: tuple[tuple[str, str], ...] = ()
    gamma_scale: float = 1.0


@dataclass(frozen=True)
class DJPQConfig:
    """Everything ``prepare()`` needs to know; immutable and validated on construction.

    Attributes:
        weight: Default weight quantization (``signed=None`` resolves to signed [choice]).
        activation: Default activation quantization (``signed=None``: decided by the graph).
        input_bits: Bit-width of the network input (counts in the BOPs of the first layer).
        gate: VIB gate initialisation and threshold.
        prune: Insert VIB gates (learn pruning).
        quantize: Insert DQ quantizers (learn bit-widths).
        restricted: Restrict bit-widths to ``allowed_bits`` (power-of-two variant).
        allowed_bits: Strictly increasing powers of two in ``[2, 32]``.
        fix_first_last_8bit: First and last compute layers use fixed 8-bit weights and
            activations (below overrides in precedence).
        ignore: Module names, fnmatch patterns or ``nn.Module`` types left untouched (neither
            quantized nor pruned); beats every override.
        overrides: Per-module :class:`Override` s, see :meth:`resolve`.
        round_to: Kept channel counts are rounded up to a multiple of this (hardware-friendly).
        loss_kind: One of :data:`LOSS_KINDS`.
        strict: Raise on ops without a registered rule instead of treating them as barriers.
        calibration_batches: At most this many batches calibrate the quantizers (observers).
        quantize_pre_activation: [choice] Quantize the input of every non-ReLU elementwise
            activation (sigmoid, hardsigmoid, hardswish, SiLU, GELU, tanh, hardtanh) that reads a
            conv/linear (+BN, +gate) output, so that ``convert`` lowers the layer to integers and
            the activation to an exact lookup table (``IntLUT``); ``False`` keeps such layers and
            activations in float (float islands). No effect on ReLU/ReLU6 networks.
    """

    weight: QuantSpec = field(default_factory=QuantSpec)
    activation: QuantSpec = field(default_factory=QuantSpec)
    input_bits: int = 8
    gate: GateSpec = field(default_factory=GateSpec)
    prune: bool = True
    quantize: bool = True
    restricted: bool = False
    allowed_bits: tuple[int, ...] = (2, 4, 8, 16)
    fix_first_last_8bit: bool = False
    ignore: tuple[str | type[nn.Module], ...] = ()
    overrides: tuple[Override, ...] = ()
    round_to: int = 1
    loss_kind: str = "vib_bops"
    strict: bool = False
    calibration_batches: int = 4
    quantize_pre_activation: bool = True

    def __post_init__(self) -> None:
        for name in ("allowed_bits", "ignore", "overrides"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise ConfigError(f"DJPQConfig.{name} must be a tuple, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self._check_types()
        _check_int_range("DJPQConfig", "input_bits", self.input_bits, 2, 32)
        _check_int_range("DJPQConfig", "round_to", self.round_to, 1, None)
        _check_int_range("DJPQConfig", "calibration_batches", self.calibration_batches, 1, None)
        if self.loss_kind not in LOSS_KINDS:
            raise ConfigError(
                f"DJPQConfig.loss_kind must be one of {LOSS_KINDS}, got {self.loss_kind!r}"
            )
        self._check_allowed_bits()
        if self.restricted:
            self._check_restricted_specs()

    def _check_types(self) -> None:
        for name, kind in (("weight", QuantSpec), ("activation", QuantSpec), ("gate", GateSpec)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(
                    f"DJPQConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}"
                )
        for name in ("prune", "quantize", "restricted", "fix_first_last_8bit", "strict",
                     "quantize_pre_activation"):
            _check_bool("DJPQConfig", name, getattr(self, name))
        for item in self.ignore:
            ok_type = isinstance(item, type) and issubclass(item, nn.Module)
            if not ((isinstance(item, str) and item) or ok_type):
                raise ConfigError(
                    "DJPQConfig.ignore entries must be module names, fnmatch patterns or "
                    f"nn.Module subclasses, got {item!r}"
                )
        for override in self.overrides:
            if not isinstance(override, Override):
                raise ConfigError(
                    f"DJPQConfig.overrides entries must be Override, got {override!r}"
                )

    def _check_allowed_bits(self) -> None:
        bits = self.allowed_bits
        valid = (
            bool(bits)
            and all(_is_int(b) and 2 <= b <= 32 and b & (b - 1) == 0 for b in bits)
            and list(bits) == sorted(set(bits))
        )
        if not valid:
            raise ConfigError(
                "DJPQConfig.allowed_bits must be strictly increasing powers of two in [2, 32], "
                f"got {bits!r}"
            )

    def _check_restricted_specs(self) -> None:
        specs: list[tuple[str, QuantSpec | None]] = [
            ("weight", self.weight),
            ("activation", self.activation),
        ]
        for i, o in enumerate(self.overrides):
            specs += [
                (f"overrides[{i}].weight", o.weight),
                (f"overrides[{i}].activation", o.activation),
            ]
        if self.fix_first_last_8bit:
            specs.append(("fix_first_last_8bit", QuantSpec(bits=8)))
        for name, spec in specs:
            if spec is not None and spec.bits not in self.allowed_bits:
                raise ConfigError(
                    f"DJPQConfig.{name}: bits={spec.bits} is not in allowed_bits "
                    f"{self.allowed_bits}, required with restricted=True"
                )

    # -------------------------------------------------------------------------------- resolve
    def resolve(
        self, module_name: str, module_type: type, *, first_or_last: bool = False
    ) -> ResolvedLayerConfig:
        """Effective settings of one module.

        Precedence, highest first (mirrors ``QConfigMapping``: module name > module name regex >
        object type > global): ``ignore`` (absolute) > exact-name override > name-pattern
        override (among patterns the later one wins) > module-type override (later wins;
        subclasses match) > first/last-layer rule (``fix_first_last_8bit`` with
        ``first_or_last=True``) > global default. [choice] Each field (``weight``,
        ``activation``, ``prune``, ``gamma_scale``) is resolved independently: a field left
        ``None`` by an override falls through to the next rule.

        Args:
            module_name: Qualified module name (``"layer1.0.conv1"``).
            module_type: The module's class.
            first_or_last: Whether the module is the first or last compute layer.
        """
        if self._is_ignored(module_name, module_type):
            return ResolvedLayerConfig(module_name, None, None, False, True, (("all", "ignore"),))
        weight = self.weight if self.quantize else None
        activation = self.activation if self.quantize else None
        prune, gamma_scale = self.prune, 1.0
        sources = {"weight": "global", "activation": "global", "prune": "global",
                   "gamma_scale": "global"}
        if first_or_last and self.fix_first_last_8bit and self.quantize:
            weight, activation = _fixed8(self.weight), _fixed8(self.activation)
            sources["weight"] = sources["activation"] = "fix_first_last_8bit"
        for kind in ("type", "pattern", "name"):
            for o in self.overrides:
                if o.kind != kind or not o.matches(module_name, module_type):
                    continue
                label = _label(o.match)
                if o.weight is not None:
                    weight, sources["weight"] = o.weight, label
                if o.activation is not None:
                    activation, sources["activation"] = o.activation, label
                if o.prune is not None:
                    prune, sources["prune"] = o.prune, label
                if o.gamma_scale is not None:
                    gamma_scale, sources["gamma_scale"] = float(o.gamma_scale), label
        if weight is not None and weight.signed is None:
            weight = replace(weight, signed=True)  # [choice] weights use a signed grid
        return ResolvedLayerConfig(
            module_name, weight, activation, prune, False, tuple(sorted(sources.items())),
            gamma_scale,
        )

    def _is_ignored(self, module_name: str, module_type: type) -> bool:
        for item in self.ignore:
            if isinstance(item, str):
                if fnmatchcase(module_name, item):
                    return True
            elif isinstance(module_type, type) and issubclass(module_type, item):
                return True
        return False

    def check_names(self, available_module_names: Iterable[str]) -> None:
        """Raise :class:`ConfigError` if an override or ignore name/pattern matches no module.

        The message lists the unmatched entries, close matches and some valid names.
        """
        names = list(available_module_names)
        wanted = [o.match for o in self.overrides if isinstance(o.match, str)]
        wanted += [i for i in self.ignore if isinstance(i, str)]
        missing = [w for w in wanted if not any(fnmatchcase(n, w) for n in names)]
        if not missing:
            return
        hints = []
        for w in missing:
            close = difflib.get_close_matches(w, names, n=3)
            hints.append(f"{w!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        sample = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise ConfigError(
            f"DJPQConfig: override/ignore names match no module: {'; '.join(hints)}. "
            f"Valid module names include: {sample or '(none)'}"
        )


def _label(match: str | type[nn.Module]) -> str:
    if isinstance(match, str):
        return f"{'pattern' if _is_pattern(match) else 'name'} {match!r}"
    return f"type {match.__name__}"


def _fixed8(spec: QuantSpec) -> QuantSpec:
    return replace(
        spec,
        bits=8,
        learn_bits=False,
        min_bits=min(spec.min_bits, 8),
        max_bits=max(spec.max_bits, 8),
    )
