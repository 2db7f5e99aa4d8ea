"""aarch64 builds run under qemu-user and are bit-exact with the integer reference executor.

The aarch64 library (``build(target="aarch64")`` + ``export(".so")``) is run by the C++ runner of
``djpq_compiler.backends.tvm.aarch64_runner`` under ``qemu-aarch64``, against the aarch64 TVM
runtime of the PyPI wheels; the outputs must equal the converted GraphModule run in PyTorch on
this x86 host bit for bit. Skips, naming what is missing, without the Debian packages
(qemu-user, gcc/g++-aarch64-linux-gnu, libc6-arm64-cross) or the wheels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from djpq_compiler.errors import BackendError

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
from djpq_compiler.backends.tvm import aarch64_runner  # noqa: E402


def _assert_equal(got: tuple, want: tuple) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), (g - w).abs().max()


def test_tiny_net_bit_exact_under_qemu(aarch64_qemu: None) -> None:
    """Two inputs, seven outputs (int8 containers and float), 2..8-bit layers, pools, concat."""
    from test_tvm_backend import BITS, Net, example, im

    gm = im.trace_integer(Net(BITS["low"]).eval())
    x = (example((2, 3, 9, 9), seed=2), example((1, 2, 7, 7), signed=True))
    model = tvm_backend.build(gm, "aarch64", example_inputs=x)
    run = aarch64_runner.run_compiled(model, *x)
    _assert_equal(tuple(run.outputs), gm(*x))
    ties = ((torch.arange(98) - 49) * 0.025).reshape(1, 2, 7, 7)  # z / 0.05 hits .5 ties
    other = (example((2, 3, 9, 9), seed=101), ties)
    _assert_equal(tuple(aarch64_runner.run_compiled(model, *other).outputs), gm(*other))


def test_resnet20_pruned_bit_exact_under_qemu(aarch64_qemu: None, tmp_path) -> None:
    """resnet20 with ~40 % of every channel group pruned: one exported .so, two inputs."""
    from test_tvm_zoo import pruned_converted

    converted, x = pruned_converted("resnet20", batch=2)
    model = tvm_backend.build(converted, "aarch64", example_inputs=x)
    library = model.export(tmp_path / "resnet20.so")
    for seed in (1, 2):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 2
        run = aarch64_runner.run_library(library, [inp.numpy()])
        (got,) = run.outputs
        want = converted(inp)
        assert got.shape == tuple(want.shape)
        got_t = torch.from_numpy(got.copy()).to(want.dtype)
        assert torch.equal(got_t, want), (got_t - want).abs().max()
        assert run.seconds_per_run > 0


def test_clear_errors(aarch64_qemu: None, tmp_path) -> None:
    x86_lib = tmp_path / "not_aarch64.so"
    x86_lib.write_bytes(b"\x7fELF" + bytes(14) + b"\x3e\x00" + bytes(40))  # EM_X86_64
    with pytest.raises(BackendError, match="not an aarch64"):
        aarch64_runner.run_library(x86_lib, [])
    with pytest.raises(BackendError, match="does not exist"):
        aarch64_runner.run_library(tmp_path / "missing.so", [])


def test_qemu_fixture_skips_only_for_missing_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared fixture skips, with the reason, for absent tools or wheels; any other failure
    to make the runner is an error of the tests."""
    from conftest import prepare_aarch64_qemu

    from djpq_compiler.errors import MissingExtraError

    monkeypatch.setattr(aarch64_runner, "missing_tools", lambda: ["qemu-aarch64 (qemu-user)"])
    with pytest.raises(pytest.skip.Exception, match="missing: qemu-aarch64"):
        prepare_aarch64_qemu()
    monkeypatch.setattr(aarch64_runner, "missing_tools", lambda: [])

    def no_wheels() -> None:
        raise MissingExtraError("no aarch64 wheels here")

    monkeypatch.setattr(aarch64_runner, "ensure_runtime", no_wheels)
    with pytest.raises(pytest.skip.Exception, match="no aarch64 wheels here"):
        prepare_aarch64_qemu()
    monkeypatch.setattr(aarch64_runner, "ensure_runtime", lambda: Path("/nonexistent"))

    def broken(runtime: Path) -> Path:
        raise BackendError("building the aarch64 runner failed")

    monkeypatch.setattr(aarch64_runner, "build_runner", broken)
    with pytest.raises(BackendError, match="runner failed"):
        prepare_aarch64_qemu()
