"""The error types every user-facing failure is raised as.

Each message names the node, argument or file at fault and says what to do about it. Code in this
package never uses ``assert`` for a user error.
"""

from __future__ import annotations

__all__ = [
    "DjpqError",
    "CaptureError",
    "ConfigError",
    "DataError",
    "UnsupportedOpError",
    "PruningError",
    "QuantizationError",
    "PlanError",
    "ArtifactError",
    "BackendError",
    "UnsupportedNodesError",
    "MissingExtraError",
    "DjpqWarning",
    "FloatOpsWarning",
    "BiasSaturationWarning",
    "CaptureWarning",
]


class DjpqError(Exception):
    """Base class of every error raised by djpq-compiler on bad input."""


class CaptureError(DjpqError):
    """The model could not be turned into an FX graph (or the example inputs do not fit it)."""


class ConfigError(DjpqError, ValueError):
    """A configuration value is invalid."""


class DataError(DjpqError):
    """A data set is missing or malformed."""


class UnsupportedOpError(DjpqError):
    """A node has no rule for the requested analysis (raised in ``strict`` mode)."""


class PruningError(DjpqError):
    """A pruning request does not fit the model's channel groups."""


class QuantizationError(DjpqError):
    """Quantizer state is invalid (e.g. NaN/Inf parameters) or cannot be integerized."""


class PlanError(DjpqError):
    """A compression plan is malformed or does not match the model it is applied to."""


class ArtifactError(DjpqError):
    """A saved artifact (checkpoint, plan, converted model) is missing, truncated or tampered."""


class BackendError(DjpqError):
    """A backend cannot lower or build the model."""


class UnsupportedNodesError(UnsupportedOpError, BackendError):
    """A backend cannot lower some nodes; the message lists every one of them (``format_node()``)
    with the reason, and says what to do. Catchable as either parent."""


class MissingExtraError(DjpqError, ImportError):
    """An optional dependency is not installed; the message names the pip extra to install."""


class DjpqWarning(UserWarning):
    """Base class of djpq-compiler's warnings (filter them with ``warnings.filterwarnings``)."""


class FloatOpsWarning(DjpqWarning):
    """``convert(integer=True)`` left some ops in float (named in the message)."""


class CaptureWarning(DjpqWarning):
    """The model was captured by a fallback (e.g. specialized on the example inputs' shapes)."""


class BiasSaturationWarning(DjpqWarning):
    """A layer's integer bias was clamped where that provably changes no output."""


def require(module: str, extra: str) -> object:
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError(
            f"'{module}' is required for this feature but is not installed: "
            f"pip install 'djpq-compiler[{extra}]'"
        ) from exc
