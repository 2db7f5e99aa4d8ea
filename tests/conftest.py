"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


def prepare_aarch64_qemu() -> None:
    """Make the aarch64 TVM runtime and the C++ VM runner, or skip naming the absent extra.

    Skips only when an optional piece is absent: TVM itself, qemu-user or the aarch64 cross
    toolchain (``aarch64_runner.missing_tools()``), or the aarch64 TVM runtime wheels
    (``MissingExtraError``: not cached and not downloadable). Any other error -- a runner that
    does not compile, a broken runtime -- propagates.
    """
    pytest.importorskip("tvm")
    from djpq_compiler.backends.tvm import aarch64_runner
    from djpq_compiler.errors import MissingExtraError

    missing = aarch64_runner.missing_tools()
    if missing:
        pytest.skip("aarch64 under qemu not checked, missing: " + ", ".join(missing))
    try:
        runtime = aarch64_runner.ensure_runtime()
    except MissingExtraError as exc:
        pytest.skip(f"aarch64 TVM runtime wheels unavailable: {exc}")
    aarch64_runner.build_runner(runtime)


@pytest.fixture(scope="session")
def aarch64_qemu() -> None:
    """For tests that run aarch64 builds under ``qemu-aarch64``: :func:`prepare_aarch64_qemu`,
    once per session (a skip or an error then applies to every test using it)."""
    prepare_aarch64_qemu()
