"""Per-conv speed of the written integer kernels vs TVM's default build, PyTorch and onnxruntime.

For each conv shape (the reference nets' Fashion-MNIST convs and pruned-resnet18-at-224-like
convs) and bit configuration, five backends run the same layer on one thread:

  * ``djpq_kernel``: ``backends.tvm`` with the x86 target: the layer's selected written kernel
    (u8 activations in, requantized codes out: pack + conv + bias + requantize + unpack).
  * ``tvm_default``: the same layer lowered without written kernels (TVM 0.27's generic
    ``nn.conv2d`` u8 x s8 -> int32, then bias and requantization as Relax ops).
  * ``torch_fp32``: ``F.conv2d`` on float32 NCHW with bias (``torch.set_num_threads(1)``).
  * ``ort_fp32``: onnxruntime ``Conv`` float32 with bias.
  * ``ort_qlinear``: onnxruntime ``QLinearConv`` u8 x s8 (per-channel weight scales, int32 bias).

Both TVM builds lower the converter's real code path (``convert_conv2d``) from a u8 NCHW input, so
neither pays a float quantize; the written kernel's output is checked bit-exact against the default
build's. Timing is interleaved: after a warmup, each of ``--rounds`` rounds times ``--budget``
seconds' worth of calls of every backend (order rotating per round); the median per-call time over
rounds is reported, with GMAC/s and ratios to PyTorch FP32 and onnxruntime QLinearConv taken from
the same run. Times are the calling thread's CPU time (every backend runs on it with one
thread), so preemption by other processes on a shared machine does not count; wall-clock medians
are stored beside them.

Usage (the committed results; ``--mcpu haswell`` times the AVX2 kernels on an AVX-512 host):
  TVM_NUM_THREADS=1 python benchmarks/latency/kernels.py --rounds 9 --out benchmarks/latency
  TVM_NUM_THREADS=1 python benchmarks/latency/kernels.py --rounds 9 --mcpu haswell --tag avx2 \
      --out benchmarks/latency
  (depthwise shapes alone: ``--only dw --tag dw_host``, ``--only dw --mcpu haswell --tag dw_avx2``)
  AMX CPUs (``KERNELS.md`` *AMX*): ``--amx`` adds this CPU's kernel without AMX (VNNI) as a
  column, ``--packed`` makes the written kernels read and write the target's packed layout:
  TVM_NUM_THREADS=1 python benchmarks/latency/kernels.py --amx --packed --rounds 9 \
      --tag amx_packed --out benchmarks/latency
  TVM_NUM_THREADS=1 python benchmarks/latency/kernels.py --amx --rounds 9 --tag amx_nchw \
      --out benchmarks/latency
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BACKENDS = ("djpq_kernel", "tvm_default", "torch_fp32", "ort_fp32", "ort_qlinear")


@dataclass(frozen=True)
class Shape:
    """One conv layer: NCHW input, output channels, square kernel, stride, padding, bits."""

    name: str
    batch: int
    c_in: int
    hw: int
    c_out: int
    k: int
    stride: int
    pad: int
    w_bits: int
    a_bits: int = 8
    groups: int = 1

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.pad - self.k) // self.stride + 1

    @property
    def macs(self) -> int:
        return (self.batch * self.c_out * self.out_hw ** 2 * self.c_in // self.groups
                * self.k ** 2)


SHAPES = (
    Shape("vgg7 conv2", 1, 16, 28, 16, 3, 1, 1, 4),
    Shape("vgg7 conv4", 1, 32, 14, 32, 3, 1, 1, 4),
    Shape("vgg7 conv6", 1, 64, 7, 64, 3, 1, 1, 4),
    Shape("resnet20 down s2", 1, 16, 28, 32, 3, 2, 1, 4),
    Shape("vgg7 conv2 b32", 32, 16, 28, 16, 3, 1, 1, 4),
    Shape("pruned vgg7 conv4 (odd)", 1, 19, 14, 23, 3, 1, 1, 4),
    Shape("r18/2 layer1", 1, 32, 56, 32, 3, 1, 1, 4),
    Shape("r18 layer1", 1, 64, 56, 64, 3, 1, 1, 4),
    Shape("ref 28x28 64", 1, 64, 28, 64, 3, 1, 1, 4),
    Shape("r18 layer2", 1, 128, 28, 128, 3, 1, 1, 4),
    Shape("r18/2 layer3", 1, 128, 14, 128, 3, 1, 1, 4),
    Shape("r18/2 layer4", 1, 256, 7, 256, 3, 1, 1, 4),
    Shape("r18 down 1x1 s2", 1, 128, 28, 256, 1, 2, 0, 4),
    Shape("ref 28x28 64 W6", 1, 64, 28, 64, 3, 1, 1, 6),
    Shape("ref 28x28 64 W7", 1, 64, 28, 64, 3, 1, 1, 7),
    Shape("r18 layer1 W8A8", 1, 64, 56, 64, 3, 1, 1, 8),
    Shape("r18 layer2 W8A8", 1, 128, 28, 128, 3, 1, 1, 8),
    Shape("ref 28x28 64 W8A8", 1, 64, 28, 64, 3, 1, 1, 8),
    Shape("r18/2 layer3 W8A8", 1, 128, 14, 128, 3, 1, 1, 8),
    Shape("r18/2 layer4 W8A8", 1, 256, 7, 256, 3, 1, 1, 8),
    Shape("vgg7 conv2 b32 W8A8", 32, 16, 28, 16, 3, 1, 1, 8),
    Shape("vgg7 conv4 W8A8", 1, 32, 14, 32, 3, 1, 1, 8),
    Shape("r18/2 layer1 W8A8", 1, 32, 56, 32, 3, 1, 1, 8),
    Shape("vgg7 conv4 b32 W7", 32, 32, 14, 32, 3, 1, 1, 7),
    Shape("r18 layer1 W7", 1, 64, 56, 64, 3, 1, 1, 7),
    Shape("r18/2 layer4 W7", 1, 256, 7, 256, 3, 1, 1, 7),
    Shape("vgg7 conv2 b32 W7", 32, 16, 28, 16, 3, 1, 1, 7),
    Shape("mobilenetv2 dw 3x3", 1, 96, 14, 96, 3, 1, 1, 4, groups=96),
    Shape("mobilenetv2 dw 3x3 s2", 1, 144, 28, 144, 3, 2, 1, 8, groups=144),
    Shape("mbv2-224 dw 3x3", 1, 192, 28, 192, 3, 1, 1, 8, groups=192),
    # resnet20's pruned first stage (benchmarks/latency/models/resnet20.pt): A4 W4, 28x28
    Shape("r20 s0 13->9", 1, 13, 28, 9, 3, 1, 1, 4, 4),
    Shape("r20 s0 9->13", 1, 9, 28, 13, 3, 1, 1, 4, 4),
    Shape("r20 s0 13->7", 1, 13, 28, 7, 3, 1, 1, 4, 4),
    Shape("r20 s0 7->13", 1, 7, 28, 13, 3, 1, 1, 4, 4),
    Shape("r20 s0 13->9 b32", 32, 13, 28, 9, 3, 1, 1, 4, 4),
    Shape("r20 s0 9->13 b32", 32, 9, 28, 13, 3, 1, 1, 4, 4),
    Shape("r20 s0 13->7 b32", 32, 13, 28, 7, 3, 1, 1, 4, 4),
    Shape("r20 s0 7->13 b32", 32, 7, 28, 13, 3, 1, 1, 4, 4),
)


@dataclass
class Layer:
    """Random integer layer data shared by every backend."""

    x: np.ndarray  # uint8 NCHW codes
    w: np.ndarray  # int64 OIHW codes
    bias: np.ndarray  # int64
    w_scale: np.ndarray  # float64 per output channel
    in_scale: float
    out_scale: float


def make_layer(s: Shape, seed: int = 0) -> Layer:
    rng = np.random.default_rng(seed)
    wmax = 2 ** (s.w_bits - 1) - 1
    x = rng.integers(0, 2 ** s.a_bits, (s.batch, s.c_in, s.hw, s.hw)).astype(np.uint8)
    w = rng.integers(-wmax, wmax + 1, (s.c_out, s.c_in // s.groups, s.k, s.k))
    w[:, 0, 0, 0] = wmax
    bias = rng.integers(-1000, 1001, s.c_out)
    w_scale = 0.01 + 0.02 * rng.random(s.c_out)
    in_scale = 0.02
    out_scale = in_scale * 0.02 * 128 * wmax * (s.c_in // s.groups * s.k * s.k) ** 0.5 / 40
    return Layer(x, w, bias, w_scale, in_scale, out_scale)


def int_module(s: Shape, layer: Layer) -> Any:
    from djpq_compiler.ir import modules as im
    from djpq_compiler.ir import requant_params

    fan_in = s.c_in // s.groups * s.k * s.k
    bound = fan_in * (2 ** s.a_bits - 1) * (2 ** (s.w_bits - 1) - 1) + 1000
    m, shift = requant_params(layer.in_scale, torch.from_numpy(layer.w_scale), layer.out_scale,
                              bound)
    return im.IntConv2d(weight=torch.from_numpy(layer.w), bias=torch.from_numpy(layer.bias),
                        w_scale=torch.from_numpy(layer.w_scale), in_scale=layer.in_scale,
                        w_bits=s.w_bits, out_scale=layer.out_scale, out_bits=8, out_signed=False,
                        clip=None, m=m, shift=shift, stride=(s.stride, s.stride),
                        padding=(s.pad, s.pad), dilation=(1, 1), groups=s.groups)


#: ``--amx``: the second written-kernel column, this CPU's target without AMX (the VNNI kernels).
NO_AMX = "no-amx"


#: ``--packed``: the written kernels read and write the target's packed layout (``NCHW16c`` with
#: AVX-512, ``NCHW8c`` with AVX2: ``layout.layout_lanes``), as a layer inside a network.
PACKED_TEXT = ("the target's packed layout NCHW{L}c in and out (L = 16 with AVX-512, 8 with AVX2; "
               "as between integer layers of a network, no pack or unpack stage; torch and ORT "
               "take NCHW)")


def tvm_callable(s: Shape, layer: Layer, written: bool, mcpu: str = "", packed: bool = False,
                 narrow: bool = True, wino: bool = True) -> tuple[Callable[[], Any], str, float]:
    """Lower the layer through ``convert_conv2d`` from a u8 input; (call, variant, compile s).
    ``mcpu`` :data:`NO_AMX`: this CPU's target with its AMX features left out. ``packed``
    (written kernels only): the input arrives as the target's ``NCHW{L}c`` and the output is
    planned packed,
    as between two integer layers of a converted network; the call returns NCHW numpy (the
    unpack is outside the timed call). ``narrow=False``: without the pixels-in-lanes kernel
    (``select.NARROW_MIN_GAIN`` = inf); ``wino=False``: without the Winograd kernel
    (``select.WINOGRAD_MIN_OUT`` past any output)."""
    from unittest import mock

    from djpq_compiler.backends.tvm.kernels import select

    gain = select.NARROW_MIN_GAIN if narrow else float("inf")
    least = select.WINOGRAD_MIN_OUT if wino else 2**31
    with (mock.patch.object(select, "NARROW_MIN_GAIN", gain),
          mock.patch.object(select, "WINOGRAD_MIN_OUT", least)):
        return _tvm_callable(s, layer, written, mcpu, packed)


def _tvm_callable(s: Shape, layer: Layer, written: bool, mcpu: str = "",
                  packed: bool = False) -> tuple[Callable[[], Any], str, float]:
    import tvm
    from torch import fx

    from djpq_compiler.backends.tvm import adapter
    from djpq_compiler.backends.tvm.build import target_spec
    from djpq_compiler.backends.tvm.converters import convert_conv2d
    from djpq_compiler.backends.tvm.emit import IntValue, Lowering
    from djpq_compiler.backends.tvm.kernels.emit import target_features
    from djpq_compiler.backends.tvm.layout import NCHW, Layout, LayoutPlan, layout_lanes

    root = torch.nn.Module()
    root.conv = int_module(s, layer)
    graph = fx.Graph()
    node = graph.call_module("conv", (graph.placeholder("x"),))
    graph.output(node)
    gm = fx.GraphModule(root, graph)
    bb = adapter.Builder()
    target = target_spec("x86")[0]
    if mcpu == NO_AMX:
        target = {"kind": "llvm", "mcpu": adapter.system_cpu()}
    elif mcpu:
        target = {"kind": "llvm", "mcpu": mcpu}
    ctx = Lowering(gm, bb, target if written else None)
    x_in, layout = layer.x, NCHW
    lanes = layout_lanes(target_features(target))
    if packed and written:
        layout = Layout(lanes, s.c_in)
        x_in = to_packed_np(layer.x, lanes)
        ctx.plan = LayoutPlan(lanes, frozenset({node.name}))
    param = bb.var("x", x_in.shape, "uint8")
    with bb.function("main", [param]):
        with bb.dataflow():
            placeholder = next(iter(gm.graph.nodes))
            ctx.env[placeholder] = IntValue(param, 0, 2 ** s.a_bits - 1, layout)
            out = convert_conv2d(ctx, node)
            result = bb.emit_output([out.expr])  # type: ignore[union-attr]
        mod = bb.finish(result)
    start = time.perf_counter()
    exe = adapter.compile_module(mod, adapter.make_target(target))
    seconds = time.perf_counter() - start
    vm = adapter.make_vm(exe)
    arg = tvm.runtime.tensor(x_in, tvm.cpu())
    fn = vm["main"]
    if packed and written:
        assert ctx.kernels[0].out_layout == f"NCHW{lanes}c", ctx.kernels[0]
    return (lambda: fn(arg)), ctx.kernels[0].variant, seconds


def to_packed_np(x: np.ndarray, lanes: int) -> np.ndarray:
    """NCHW -> ``[N, ceil(C/L), H, W, L]`` with zero padding lanes."""
    n, c, h, w = x.shape
    blocks = -(-c // lanes)
    full = np.zeros((n, blocks * lanes, h, w), x.dtype)
    full[:, :c] = x
    return np.ascontiguousarray(full.reshape(n, blocks, lanes, h, w).transpose(0, 1, 3, 4, 2))


def nchw(out: Any, channels: int) -> np.ndarray:
    """A kernel's result as NCHW numpy (unpacking ``NCHW{L}c``)."""
    a = out.numpy()
    if a.ndim == 5:
        n, cb, h, w, lanes = a.shape
        a = a.transpose(0, 1, 4, 2, 3).reshape(n, cb * lanes, h, w)[:, :channels]
    return a


def torch_callable(s: Shape, layer: Layer) -> Callable[[], Any]:
    x = torch.from_numpy(layer.x.astype(np.float32) * layer.in_scale)
    w = torch.from_numpy((layer.w * layer.w_scale[:, None, None, None]).astype(np.float32))
    b = torch.from_numpy(layer.bias * layer.in_scale * layer.w_scale).float()

    def run() -> Any:
        with torch.inference_mode():
            return F.conv2d(x, w, b, stride=s.stride, padding=s.pad, groups=s.groups)
    return run


def _ort_session(model: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def ort_callables(s: Shape, layer: Layer) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(float32 Conv, QLinearConv u8 x s8) sessions of the layer, as zero-argument calls."""
    from onnx import TensorProto, helper, numpy_helper

    attrs = dict(kernel_shape=[s.k, s.k], strides=[s.stride, s.stride], pads=[s.pad] * 4,
                 group=s.groups)
    out_shape = [s.batch, s.c_out, s.out_hw, s.out_hw]
    in_shape = list(layer.x.shape)
    wf = (layer.w * layer.w_scale[:, None, None, None]).astype(np.float32)
    bf = (layer.bias * layer.in_scale * layer.w_scale).astype(np.float32)
    fgraph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(wf, "w"), numpy_helper.from_array(bf, "b")])
    qinits = [
        numpy_helper.from_array(np.array(layer.in_scale, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(layer.w.astype(np.int8), "w"),
        numpy_helper.from_array(layer.w_scale.astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(s.c_out, np.int8), "wz"),
        numpy_helper.from_array(np.array(layer.out_scale, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.uint8), "yz"),
        numpy_helper.from_array(layer.bias.astype(np.int32), "b"),
    ]
    qgraph = helper.make_graph(
        [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                          ["y"], **attrs)], "qconv",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, out_shape)], qinits)
    opset = [helper.make_opsetid("", 13)]
    fsess = _ort_session(helper.make_model(fgraph, opset_imports=opset))
    qsess = _ort_session(helper.make_model(qgraph, opset_imports=opset))
    xf = layer.x.astype(np.float32) * np.float32(layer.in_scale)
    return (lambda: fsess.run(None, {"x": xf})), (lambda: qsess.run(None, {"x": layer.x}))


def time_interleaved(calls: dict[str, Callable[[], Any]], rounds: int,
                     budget: float) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each backend over interleaved rounds: (thread CPU, wall).

    Every backend runs on the calling thread (1 thread each), so the thread's CPU time is the
    work done, unaffected by other processes preempting it on a shared machine; wall time is
    reported beside it."""
    reps = {}
    for name, fn in calls.items():  # warmup, and calls per round so a round takes ~budget s
        fn()
        start = time.thread_time()
        fn()
        one = max(time.thread_time() - start, 1e-6)
        reps[name] = max(3, min(300, int(budget / one)))
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    wall: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = calls[name]
            start, start_wall = time.thread_time(), time.perf_counter()
            for _ in range(reps[name]):
                fn()
            cpu[name].append((time.thread_time() - start) / reps[name])
            wall[name].append((time.perf_counter() - start_wall) / reps[name])
    return ({name: statistics.median(v) for name, v in cpu.items()},
            {name: statistics.median(v) for name, v in wall.items()})


def bench_shape(s: Shape, rounds: int, budget: float, mcpu: str = "",
                amx: bool = False, packed: bool = False) -> dict[str, Any]:
    """One shape, every backend interleaved; ``amx``: also ``djpq_no_amx``, the written kernel
    of this CPU's target without AMX (the VNNI kernel), checked exact against the default;
    ``packed``: the written kernels read and write the packed layout (:func:`tvm_callable`)."""
    layer = make_layer(s)
    kernel, variant, kernel_compile = tvm_callable(s, layer, True, mcpu, packed)
    default, _, default_compile = tvm_callable(s, layer, False, mcpu)
    exact = bool(np.array_equal(nchw(kernel(), s.c_out), default().numpy()))
    ort_f, ort_q = ort_callables(s, layer)
    calls = {"djpq_kernel": kernel, "tvm_default": default, "torch_fp32": torch_callable(s, layer),
             "ort_fp32": ort_f, "ort_qlinear": ort_q}
    extra: dict[str, Any] = {}
    if amx:
        no_amx, extra["variant_no_amx"], _ = tvm_callable(s, layer, True, NO_AMX, packed)
        exact = exact and bool(np.array_equal(nchw(no_amx(), s.c_out), default().numpy()))
        calls["djpq_no_amx"] = no_amx
    lanes, lanes_variant, _ = tvm_callable(s, layer, True, mcpu, packed, narrow=False,
                                           wino=False)
    if lanes_variant != variant:  # the layer took the pixels-in-lanes or the Winograd kernel:
        calls["djpq_lanes"] = lanes  # time the channel-lane kernel it would have had before
        exact = exact and bool(np.array_equal(nchw(lanes(), s.c_out), default().numpy()))
    seconds, wall = time_interleaved(calls, rounds, budget)
    gmacs = {name: s.macs / t / 1e9 for name, t in seconds.items()}
    if amx:
        extra["x_no_amx"] = seconds["djpq_no_amx"] / seconds["djpq_kernel"]
    return {"shape": asdict(s), "macs": s.macs, "variant": variant, "exact_vs_default": exact,
            "lanes_variant": lanes_variant,
            "x_lanes": (seconds["djpq_lanes"] / seconds["djpq_kernel"]
                        if "djpq_lanes" in seconds else None),
            **extra,
            "compile_s": {"djpq_kernel": kernel_compile, "tvm_default": default_compile},
            "ms": {k: v * 1e3 for k, v in seconds.items()},
            "wall_ms": {k: v * 1e3 for k, v in wall.items()}, "gmacs": gmacs,
            "wall_x_torch_fp32": wall["torch_fp32"] / wall["djpq_kernel"],
            "wall_x_ort_qlinear": wall["ort_qlinear"] / wall["djpq_kernel"],
            "x_torch_fp32": seconds["torch_fp32"] / seconds["djpq_kernel"],
            "x_ort_qlinear": seconds["ort_qlinear"] / seconds["djpq_kernel"],
            "x_tvm_default": seconds["tvm_default"] / seconds["djpq_kernel"]}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Written integer kernels: per-conv speed, one thread", "",
        f"Machine: {meta['machine']}; TVM target mcpu={meta['mcpu']}; {meta['date']}.",
        f"Command: `{meta['command']}`", "",
        "GMAC/s per backend (median per-call thread CPU time over interleaved rounds; higher is "
        "better). "
        "`kernel` = the written kernel the selector picked for the layer's bits (u8 in, "
        "requantized u8 out, "
        + (f"{PACKED_TEXT})" if meta.get("packed") else "NCHW in and out, pack/unpack included)")
        + "; `default` = the same layer through TVM 0.27's "
        "generic lowering; `QLinear` = onnxruntime QLinearConv u8 x s8. Ratios are per-call time "
        "ratios from the same run. `exact` = kernel output equals the default build's bit for bit.",
        "",
        "`old` = the channel-lane kernel the layer had before the pixels-in-lanes "
        "(`avx2_px16`) or the Winograd (`avx2_wino_s16`) one, timed in the same rounds, with its "
        "variant; `x old` = its time / the kernel's.",
        "",
        "| layer | N,C,HW -> C_out, k/s | bits W/A | kernel | exact | kernel | old (variant) "
        "| x old | default | torch fp32 | ORT fp32 | ORT QLinear | x torch | x QLinear "
        "| x default |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if any("djpq_no_amx" in r["gmacs"] for r in rows):
        return _markdown_amx(rows, meta, lines[:6])
    for r in rows:
        s, g = r["shape"], r["gmacs"]
        lines.append(
            f"| {s['name']} | {s['batch']},{s['c_in']},{s['hw']} -> {s['c_out']}, "
            f"{s['k']}/{s['stride']} | {s['w_bits']}/{s['a_bits']} | {r['variant']} | "
            f"{'yes' if r['exact_vs_default'] else 'NO'} | {g['djpq_kernel']:.1f} | "
            + (f"{g['djpq_lanes']:.1f} ({r['lanes_variant']}) | {r['x_lanes']:.2f} | "
               if r.get("x_lanes") else "- | - | ")
            + f"{g['tvm_default']:.1f} | {g['torch_fp32']:.1f} | {g['ort_fp32']:.1f} | "
            f"{g['ort_qlinear']:.1f} | {r['x_torch_fp32']:.2f} | {r['x_ort_qlinear']:.2f} | "
            f"{r['x_tvm_default']:.1f} |")
    return "\n".join(lines) + "\n"


def _markdown_amx(rows: list[dict[str, Any]], meta: dict[str, Any], head: list[str]) -> str:
    """The ``--amx`` table: the selected kernel (AMX where it pays) beside this CPU's kernel
    without AMX (VNNI), PyTorch FP32 and onnxruntime QLinearConv, all from one interleaved run."""
    lines = head + [
        f"Load (1-min average) before / after: {meta.get('load_before')} / "
        f"{meta.get('load_after')}. Written kernels' layout: "
        f"{PACKED_TEXT if meta.get('packed') else 'NCHW in and out'}. "
        "`kernel` = the selected written kernel with the target's "
        "AMX features; `no AMX` = the written kernel of the same CPU's target without them "
        "(`exact`: both equal the default build bit for bit).", "",
        "| layer | N,C,HW -> C_out, k/s | bits W/A | kernel | no-AMX kernel | exact | kernel "
        "| no AMX | torch fp32 | ORT QLinear | x no AMX | x torch | x QLinear |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, g = r["shape"], r["gmacs"]
        lines.append(
            f"| {s['name']} | {s['batch']},{s['c_in']},{s['hw']} -> {s['c_out']}, "
            f"{s['k']}/{s['stride']} | {s['w_bits']}/{s['a_bits']} | {r['variant']} | "
            f"{r['variant_no_amx']} | {'yes' if r['exact_vs_default'] else 'NO'} | "
            f"{g['djpq_kernel']:.1f} | {g['djpq_no_amx']:.1f} | {g['torch_fp32']:.1f} | "
            f"{g['ort_qlinear']:.1f} | {r['x_no_amx']:.2f} | {r['x_torch_fp32']:.2f} | "
            f"{r['x_ort_qlinear']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.03,
                        help="seconds of calls per backend per round")
    parser.add_argument("--only", default="", help="comma-separated substrings of shape names")
    parser.add_argument("--mcpu", default="",
                        help="LLVM CPU of both TVM builds (default: this CPU), e.g. haswell for "
                             "the AVX2-only kernels on an AVX-512 machine")
    parser.add_argument("--out", default="",
                        help="directory for kernels_<tag>.json + KERNELS_<tag>.md")
    parser.add_argument("--tag", default="host", help="suffix of the output files")
    parser.add_argument("--narrow-gain", type=float, default=None,
                        help="override select.NARROW_MIN_GAIN (0: every stride-1 AVX2 u8s8 "
                             "layer takes the pixels-in-lanes kernel, to measure it)")
    parser.add_argument("--amx", action="store_true",
                        help="also time this CPU's written kernels without AMX (VNNI) beside "
                             "the selected ones (AMX where it pays)")
    parser.add_argument("--packed", action="store_true",
                        help="the written kernels read and write the target's packed layout "
                             "(NCHW16c with AVX-512, NCHW8c with AVX2), as inside a network (the "
                             "other backends keep NCHW)")
    args = parser.parse_args(argv)
    if args.narrow_gain is not None:
        from djpq_compiler.backends.tvm.kernels import select

        select.NARROW_MIN_GAIN = args.narrow_gain
    torch.set_num_threads(1)
    from djpq_compiler.backends.tvm import adapter

    wanted = [w for w in args.only.split(",") if w]
    load_before = os.getloadavg()[0]
    rows = []
    for s in SHAPES:
        if wanted and not any(w in s.name for w in wanted):
            continue
        row = bench_shape(s, args.rounds, args.budget, args.mcpu, args.amx, args.packed)
        rows.append(row)
        g = row["gmacs"]
        print(f"{s.name:26s} {row['variant']:13s} exact={row['exact_vs_default']} "
              + " ".join(f"{k}={v:.1f}" for k, v in g.items())
              + f" x_torch={row['x_torch_fp32']:.2f} x_qlinear={row['x_ort_qlinear']:.2f}"
              + (f" x_no_amx={row['x_no_amx']:.2f} ({row['variant_no_amx']})" if args.amx
                 else "")
              + f" x_old={row['x_lanes']} ({row['lanes_variant']})", flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "mcpu": args.mcpu or adapter.system_cpu(), "host_cpu": adapter.system_cpu(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(
                timespec="minutes"),
            "command": "TVM_NUM_THREADS=1 python benchmarks/latency/kernels.py "
                       + " ".join(sys.argv[1:] if argv is None else argv),
            "threads": 1, "packed": args.packed, "load_before": load_before,
            "load_after": os.getloadavg()[0]}
    if args.out:
        out = Path(args.out)
        (out / f"kernels_{args.tag}.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / f"KERNELS_{args.tag}.md").write_text(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
