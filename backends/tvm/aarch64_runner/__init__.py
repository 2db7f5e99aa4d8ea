"""Run an aarch64 build of a converted model under qemu-user, from this x86 host.

The aarch64 library exported by :meth:`CompiledModel.export` (``target="aarch64"``, a ``.so``
linked by ``aarch64-linux-gnu-gcc``) is loaded by a small C++ program (``runner.cc``, the Relax VM
``main`` on raw input files) cross-compiled against the aarch64 TVM runtime of the PyPI wheels
``apache-tvm==0.27.0.post1`` and ``apache-tvm-ffi==0.1.14.post1``, and run with
``qemu-aarch64 -L /usr/aarch64-linux-gnu``. No aarch64 Python is involved.

Needs the Debian packages ``qemu-user``, ``gcc-aarch64-linux-gnu``, ``g++-aarch64-linux-gnu`` and
``libc6-arm64-cross``, and pip access to the two wheels (downloaded once into the cache,
``$DJPQ_AARCH64_CACHE`` or ``~/.cache/djpq/aarch64``; put the wheels there by hand on an offline
machine).

Example:
    >>> from djpq_compiler.backends.tvm import build
    >>> from djpq_compiler.backends.tvm.aarch64_runner import run_compiled
    >>> model = build(converted, target="aarch64", example_inputs=(x,))
    >>> y = run_compiled(model, x).outputs  # bit-exact with converted(x)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from djpq_compiler.errors import BackendError, MissingExtraError

__all__ = [
    "QemuRun",
    "SYSROOT",
    "WHEELS",
    "build_runner",
    "cache_dir",
    "ensure_runtime",
    "missing_tools",
    "run_compiled",
    "run_library",
]

#: The aarch64 wheels holding ``libtvm_runtime.so`` / ``libtvm_ffi.so`` (and tvm-ffi's headers);
#: the same versions as the x86 ``tvm`` extra, so the runtime reads what TVM 0.27 wrote.
WHEELS = {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1"}
_WHEEL_PREFIX = {"apache-tvm": "apache_tvm-", "apache-tvm-ffi": "apache_tvm_ffi-"}
PLATFORM = "manylinux_2_28_aarch64"
PYTHON_VERSION = "3.11"  # the tvm-ffi wheel is per CPython version; only its C++ parts are used
#: The aarch64 Debian sysroot (libc6-arm64-cross) that qemu-aarch64 -L and the linker use.
SYSROOT = Path("/usr/aarch64-linux-gnu")
SOURCE = Path(__file__).with_name("runner.cc")

#: tool -> Debian package that provides it.
TOOLS = {
    "qemu-aarch64": "qemu-user",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
}
APT_LINE = ("apt-get install -y qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu "
            "libc6-arm64-cross")


@dataclass
class QemuRun:
    """Outputs of one run under qemu.

    Attributes:
        outputs: :func:`run_library`: one numpy array per (flattened) model output, in the
            dtype the VM returned (integer outputs in their int8/int16/... containers);
            :func:`run_compiled`: torch tensors as a :class:`CompiledModel` call returns them.
        seconds_per_run: Mean time of ``main`` inside the emulated process (qemu-user, so not
            a measure of real aarch64 speed).
        wall_seconds: Wall time of the whole qemu process (loading included).
    """

    outputs: list[Any]
    seconds_per_run: float
    wall_seconds: float


def cache_dir() -> Path:
    """``$DJPQ_AARCH64_CACHE`` or ``~/.cache/djpq/aarch64`` (wheels, runtime, runner binary)."""
    env = os.environ.get("DJPQ_AARCH64_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "djpq" / "aarch64"


def missing_tools() -> list[str]:
    """What is missing on this host to cross-build and emulate, as 'tool (Debian package)'."""
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items()
               if shutil.which(tool) is None]
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        missing.append(f"{SYSROOT}/lib/ld-linux-aarch64.so.1 (Debian package libc6-arm64-cross)")
    return missing


def _check_tools() -> None:
    missing = missing_tools()
    if missing:
        raise BackendError("running an aarch64 build under qemu needs " + ", ".join(missing)
                           + f": {APT_LINE}")


def _find_wheel(directory: Path, name: str) -> Path | None:
    pattern = f"{_WHEEL_PREFIX[name]}{WHEELS[name]}-*aarch64*.whl"
    found = sorted(directory.glob(pattern))
    return found[0] if found else None


def _download_wheels(directory: Path, timeout: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version}" for name, version in WHEELS.items()]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--retries", "1", "--timeout", "30",
           "--no-deps", "--only-binary=:all:",
           "--platform", PLATFORM, "--python-version", PYTHON_VERSION, *pins,
           "-d", str(directory)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingExtraError(f"could not download the aarch64 TVM wheels ({exc}); place "
                                f"{' and '.join(pins)} ({PLATFORM}) wheels in {directory}") from exc
    if proc.returncode != 0:
        raise MissingExtraError(
            f"could not download the aarch64 TVM runtime wheels {' and '.join(pins)} "
            f"({PLATFORM}): {proc.stderr.strip()[-1000:]}\nrun: {' '.join(cmd)} "
            f"(or copy the wheels into {directory})"
        )


def ensure_runtime(directory: Path | None = None, download: bool = True,
                   timeout: float = 300.0) -> Path:
    """The aarch64 TVM runtime (``lib/`` and ``include/``), unpacked from the wheels once.

    Args:
        directory: The cache (default :func:`cache_dir`).
        download: Fetch missing wheels with ``pip download`` (else raise).
        timeout: Seconds for the download.

    Returns:
        ``<cache>/runtime-<versions>`` holding ``lib/libtvm_runtime.so``, ``lib/libtvm_ffi.so``
        and ``include/`` (tvm-ffi and dlpack headers).

    Raises:
        MissingExtraError: A wheel is neither cached nor downloadable.
    """
    root = directory or cache_dir()
    runtime = root / f"runtime-tvm{WHEELS['apache-tvm']}-ffi{WHEELS['apache-tvm-ffi']}"
    if (runtime / ".complete").exists():
        return runtime
    wheels = {name: _find_wheel(root, name) for name in WHEELS}
    if any(w is None for w in wheels.values()):
        if not download:
            missing = [f"{n}=={WHEELS[n]}" for n, w in wheels.items() if w is None]
            raise MissingExtraError(f"aarch64 wheel(s) {', '.join(missing)} ({PLATFORM}) not in "
                                    f"{root}")
        _download_wheels(root, timeout)
        wheels = {name: _find_wheel(root, name) for name in WHEELS}
        if any(w is None for w in wheels.values()):
            raise MissingExtraError(f"pip download did not leave the aarch64 wheels {WHEELS} in "
                                    f"{root}")
    tmp = Path(tempfile.mkdtemp(prefix="runtime-", dir=root))
    (tmp / "lib").mkdir()
    members = {
        "apache-tvm": {"tvm/lib/libtvm_runtime.so": "lib/libtvm_runtime.so"},
        "apache-tvm-ffi": {"tvm_ffi/lib/libtvm_ffi.so": "lib/libtvm_ffi.so"},
    }
    for name, wheel in wheels.items():
        assert wheel is not None
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for src, dst in members[name].items():
                if src not in names:
                    raise MissingExtraError(f"{wheel.name} has no {src}; not an aarch64 TVM wheel")
                (tmp / dst).write_bytes(zf.read(src))
            if name == "apache-tvm-ffi":
                for member in names:
                    if member.startswith("tvm_ffi/include/") and not member.endswith("/"):
                        out = tmp / "include" / member[len("tvm_ffi/include/"):]
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(zf.read(member))
    (tmp / ".complete").touch()
    if runtime.exists():
        shutil.rmtree(runtime)
    tmp.rename(runtime)
    return runtime


def build_runner(runtime: Path | None = None, timeout: float = 600.0) -> Path:
    """Cross-compile ``runner.cc`` (once per source and runtime version) and return its path.

    Raises:
        BackendError: The cross toolchain is missing or fails (its stderr is included).
        MissingExtraError: The aarch64 wheels are missing.
    """
    _check_tools()
    runtime = runtime or ensure_runtime()
    digest = hashlib.sha256(SOURCE.read_bytes() + runtime.name.encode()).hexdigest()[:12]
    binary = runtime / f"djpq_vm_runner-{digest}"
    if binary.exists():
        return binary
    tmp = binary.with_name(binary.name + f".tmp{os.getpid()}")
    lib = runtime / "lib"
    cmd = ["aarch64-linux-gnu-g++", "-std=c++17", "-O2", "-I", str(runtime / "include"),
           str(SOURCE), "-o", str(tmp), "-L", str(lib), "-Wl,--no-as-needed", "-ltvm_runtime",
           "-ltvm_ffi", f"-Wl,-rpath-link,{lib}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BackendError(f"building the aarch64 runner failed ({' '.join(cmd)}):\n"
                           f"{proc.stderr[-3000:]}")
    tmp.rename(binary)
    return binary


def run_library(library: str | os.PathLike[str], arrays: Sequence[np.ndarray],
                repeats: int = 1, timeout: float = 600.0) -> QemuRun:
    """Run ``main`` of an exported aarch64 Relax VM ``.so`` on ``arrays`` under qemu-aarch64.

    Raises:
        BackendError: Missing tools, a non-aarch64 library, or the runner fails (stderr included).
        MissingExtraError: The aarch64 wheels are missing and cannot be downloaded.
    """
    lib_path = Path(library).resolve()
    if not lib_path.is_file():
        raise BackendError(f"{lib_path} does not exist; export(...'.so') the aarch64 build first")
    with lib_path.open("rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF" or header[18:20] != b"\xb7\x00":  # ELF e_machine EM_AARCH64 = 183
        raise BackendError(f"{lib_path} is not an aarch64 ELF library; build(target='aarch64')")
    runtime = ensure_runtime()
    runner = build_runner(runtime)
    with tempfile.TemporaryDirectory(prefix="djpq_qemu_") as tmp:
        specs = []
        for i, array in enumerate(arrays):
            a = np.ascontiguousarray(array)
            path = Path(tmp, f"in{i}.bin")
            a.tofile(path)
            specs.append(f"{path}:{a.dtype.name}:{'x'.join(str(d) for d in a.shape)}")
        env = dict(os.environ, LD_LIBRARY_PATH=str(runtime / "lib"))
        cmd = ["qemu-aarch64", "-L", str(SYSROOT), str(runner), str(lib_path), tmp,
               str(int(repeats)), *specs]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"qemu-aarch64 run exceeded {timeout} s: {' '.join(cmd)}") from exc
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise BackendError(f"the aarch64 runner failed under qemu (exit {proc.returncode}, "
                               f"{' '.join(cmd)}):\n{(proc.stderr or proc.stdout)[-3000:]}")
        seconds = float("nan")
        for line in proc.stdout.splitlines():
            if line.startswith("seconds_per_run "):
                seconds = float(line.split()[1])
        outputs = []
        for line in Path(tmp, "outputs.txt").read_text().splitlines():
            index, dtype, shape = line.split()
            dims = tuple(int(d) for d in shape.split(",")) if shape else ()
            data = np.fromfile(Path(tmp, f"out{index}.bin"), dtype=np.dtype(dtype))
            outputs.append(data.reshape(dims))
    return QemuRun(outputs, seconds, wall)


def run_compiled(model: Any, *inputs: Any, repeats: int = 1, timeout: float = 600.0,
                 library: str | os.PathLike[str] | None = None) -> QemuRun:
    """Export an aarch64 :class:`CompiledModel` and run it under qemu on torch ``inputs``.

    ``outputs`` come back like ``model(...)`` would on an aarch64 host: torch tensors, integer
    outputs as ``int64``, float outputs as ``float32`` (a tuple when the model returns one,
    else the single tensor).

    Raises:
        BackendError: Not an aarch64 build, wrong input shapes, missing tools, runner failure.
        MissingExtraError: The aarch64 wheels are missing and cannot be downloaded.
    """
    import torch

    if getattr(model, "target", None) != "aarch64":
        raise BackendError("run_compiled() needs a build(..., target='aarch64') model, got "
                           f"target={getattr(model, 'target', None)!r}")
    shapes = [tuple(t.shape) for t in inputs]
    if shapes != model.input_shapes:
        raise BackendError(f"compiled for input shapes {model.input_shapes}, got {shapes}")
    _check_tools()
    arrays = [t.detach().cpu().to(torch.float32).contiguous().numpy() for t in inputs]
    with tempfile.TemporaryDirectory(prefix="djpq_a64lib_") as tmp:
        lib = Path(library) if library is not None else Path(tmp, "model.so")
        model.export(lib)
        run = run_library(lib, arrays, repeats=repeats, timeout=timeout)
    if len(run.outputs) != len(model.output_kinds):
        raise BackendError(f"the runner returned {len(run.outputs)} outputs, the model has "
                           f"{len(model.output_kinds)}")
    outs = tuple(torch.from_numpy(a.copy()).to(torch.int64 if kind == "int" else torch.float32)
                 for a, kind in zip(run.outputs, model.output_kinds, strict=True))
    run.outputs = list(outs) if model.output_tuple else [outs[0]]
    return run
