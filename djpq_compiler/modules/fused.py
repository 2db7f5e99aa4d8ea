"""Fused CPU kernels for the DQ quantizer's training step (``fused_dq.cpp``), built on first use.

The unfused quantizer (``quantizers._DQRound``) makes ~5 elementwise passes forward and ~10
backward, each a full read/write of the activation; on a CPU those dominate a prepared model's
step beside the convolutions. The two kernels here do one pass each: the forward is bitwise the
unfused result; the backward gives the same input gradient and the per-tensor ``d``/``q_max``
sums accumulated in double (the unfused path reduces in the tensor's dtype, so those two scalars
differ in the last bits).

[choice] On by default where a C++ compiler and ``ninja`` are available: the first prepared
forward in training compiles the extension with ``torch.utils.cpp_extension`` (about a minute,
once per machine: it is cached under ``TORCH_EXTENSIONS_DIR``); if that fails, one warning and
the unfused path. ``DJPQ_FUSED_KERNELS=0`` or :func:`set_fused_kernels` ``(False)`` turns it off.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

__all__ = ["fused_kernels", "set_fused_kernels", "fused_kernels_enabled"]

_LOG = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("fused_dq.cpp")
_NAME = "djpq_fused_dq_v4"

_lock = threading.Lock()
_state: dict[str, Any] = {"enabled": None, "module": None, "failed": False}


def set_fused_kernels(enabled: bool | None) -> None:
    """Use the fused kernels (``True``), never (``False``), or decide from the environment
    variable ``DJPQ_FUSED_KERNELS`` (``None``, the default: on unless it is ``0``)."""
    _state["enabled"] = enabled


def fused_kernels_enabled() -> bool:
    """Whether the fused kernels are wanted (they may still be unavailable)."""
    if _state["enabled"] is not None:
        return bool(_state["enabled"])
    return os.environ.get("DJPQ_FUSED_KERNELS", "1").strip() not in ("0", "false", "no", "off")


def fused_kernels() -> Any | None:
    """The compiled extension (``dq_forward``/``dq_backward``), or ``None`` when disabled or it
    cannot be built here (then a warning, once)."""
    if not fused_kernels_enabled() or _state["failed"]:
        return None
    if _state["module"] is not None:
        return _state["module"]
    with _lock:
        if _state["module"] is None and not _state["failed"]:
            _state["module"] = _build()
    return _state["module"]


def _build() -> Any | None:
    # torch looks for ``ninja`` on PATH; the pip-installed one sits next to this interpreter
    here = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and shutil.which("ninja", path=here) is not None:
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    try:
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant for a CPU build
        try:
            from torch.utils import cpp_extension
        finally:
            quiet.setLevel(level)

        _LOG.info("building the fused DQ kernels (once per machine, about a minute)")
        return cpp_extension.load(
            name=_NAME, sources=[str(_SOURCE)],
            # no -ffast-math: the forward must stay bitwise the unfused torch ops; no
            # contraction into FMAs for the same reason
            extra_cflags=["-O3", "-march=native", "-ffp-contract=off"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back, say so once
        _state["failed"] = True
        warnings.warn(f"djpq: fused DQ kernels unavailable ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                      "training uses the unfused (slower) quantizer ops. Set "
                      "DJPQ_FUSED_KERNELS=0 to silence this.", stacklevel=3)
        return None
