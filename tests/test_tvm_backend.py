"""TVM backend: bit-exact agreement with the reference executor, error listing, targets."""

from __future__ import annotations

import shutil
import tarfile

import pytest
import torch
from torch import nn

from djpq_compiler.errors import BackendError
from djpq_compiler.ir import (
    add_rescale,
    concat_rescales,
)
from djpq_compiler.ir import modules as im
from djpq_compiler.testing.int_layers import int_layer as make_layer  # test_tvm_tune imports it

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")


class PoolNet(nn.Module):
    """Average pools with ceil_mode, count_include_pad=False, divisor_override, uneven bins."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.05, 6, signed=True)
        self.avg_ceil = im.IntAvgPool2d((3, 3), (2, 2), (1, 1), True, False, None)
        self.avg_div = im.IntAvgPool2d((2, 2), (2, 2), (0, 0), True, True, 3)
        self.max_ceil = im.IntMaxPool2d((2, 2), (2, 2), (0, 0), (1, 1), True)
        self.gap = im.IntAdaptiveAvgPool2d((3, None))
        self.fc = make_layer("linear", 7, 4, 0.05, x_bits=6, w_bits=5, out_bits=8,
                             out_scale=None, seed=5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = self.quant(x)
        flat = q.view(q.size(0), -1)
        return (self.avg_ceil(q), self.avg_div(q), self.max_ceil(q), self.gap(q),
                self.fc(flat[:, :7]))


class Net(nn.Module):
    """Conv(+relu clip) -> depthwise -> grouped, max/avg pools, add, concat, pool, linear.

    ``bits`` = (conv, depthwise/add/concat, grouped, linear) bit-widths of weights and outputs.
    """

    def __init__(self, bits: tuple[int, int, int, int]) -> None:
        super().__init__()
        b0, b1, b2, b3 = bits
        s_in, s1, s2, s3 = 0.02, 0.05, 0.04, 0.07
        self.quant = im.Quantize(s_in, 8, signed=False)
        self.conv = make_layer("conv", 3, 6, s_in, x_bits=8, w_bits=b0, out_bits=b0,
                               out_scale=s1, seed=1)
        self.relu = im.IntClip(0, 2 ** b0 - 3)
        self.dw = make_layer("conv", 6, 6, s1, x_bits=b0, w_bits=b1, out_bits=b1,
                             out_signed=True, out_scale=s2, groups=6, stride=2, seed=2)
        self.grouped = make_layer("conv", 6, 6, s2, x_bits=b1, w_bits=b2, out_bits=b2,
                                  out_signed=True, out_scale=s3, groups=3, seed=3)
        self.maxpool = im.IntMaxPool2d((3, 3), (1, 1), (1, 1), (1, 1), False)
        self.avgpool = im.IntAvgPool2d((3, 3), (1, 1), (1, 1), False, True, None)
        self.add = im.IntAdd(add_rescale(s2, s3, 0.06), (s2, s3, 0.06), b1, True)
        self.cat = im.IntConcat(concat_rescales([0.06, s2], s2), [0.06, s2], s2, b1, True, 1)
        self.gap = im.IntAdaptiveAvgPool2d(2)
        self.fc = make_layer("linear", 48, 5, s2, x_bits=b1, w_bits=b3, out_bits=b3,
                             out_signed=True, out_scale=0.1, seed=4)
        self.dequant = im.Dequantize(0.1)
        self.pools = PoolNet()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.relu(self.conv(self.quant(x)))
        b = self.dw(a)
        c = self.grouped(b)
        s = self.add(self.maxpool(b), self.avgpool(c))
        cat = self.cat(s, b)
        y = self.fc(torch.flatten(self.gap(cat), 1))
        return (self.dequant(y), cat) + self.pools(z)


#: Bit-width configurations: every width 2..8, 10, 12 and 16 (int16 containers, int64 acc).
BITS = {"low": (2, 3, 5, 8), "mid": (4, 6, 7, 8), "high": (12, 16, 16, 10)}


def example(shape: tuple[int, ...], seed: int = 0, signed: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) * 6.0
    return x - 3.0 if signed else x


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple]:
    """Hand-built converted graphs and their x86 builds, shared across tests (one compile each)."""
    out = {}
    for name, bits in BITS.items():
        gm = im.trace_integer(Net(bits).eval())
        x = (example((2, 3, 9, 9), seed=bits[0]), example((1, 2, 7, 7), signed=True))
        out[name] = (gm, x, tvm_backend.build(gm, "x86", example_inputs=x))
    return out


def _assert_equal(got: tuple, want: tuple) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), (g - w).abs().max()


@pytest.mark.parametrize("config", sorted(BITS))
def test_net_bit_exact(compiled: dict, config: str) -> None:
    gm, x, model = compiled[config]
    _assert_equal(model(*x), gm(*x))
    ties = ((torch.arange(98) - 49) * 0.025).reshape(1, 2, 7, 7)  # z / 0.05 hits .5 ties
    other = (example((2, 3, 9, 9), seed=100 + len(config)), ties)
    _assert_equal(model(*other), gm(*other))


def test_containers_follow_bits(compiled: dict) -> None:
    # the Relax graph's containers (written kernels' TIR uses int16x16 registers internally)
    low, high = (compiled[c][2].ir_module["main"].script() for c in ("low", "high"))
    assert "int4" not in low and "int8" in low and "int16" not in low
    assert "int16" in high
    assert 'out_dtype="int64"' in high  # 16-bit x 16-bit with fan-in 18 needs int64 acc


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.1, 8, signed=False)
        self.dequant = im.Dequantize(0.1)
        self.requant = im.Quantize(0.1, 8, signed=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.special.erfc(self.dequant(self.quant(x)))  # a float island without converter
        return torch.bitwise_not(self.requant(y))


def test_unsupported_nodes_listed_in_one_error() -> None:
    gm = im.trace_integer(Unsupported())
    with pytest.raises(BackendError) as info:
        tvm_backend.build(gm, "x86", example_inputs=torch.rand(1, 4))
    message = str(info.value)
    assert "2 node(s)" in message and "float op between Dequantize and Quantize" in message
    assert "erfc" in message and "bitwise_not" in message


def test_rejects_unconverted_graph() -> None:
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(BackendError, match="convert"):
        tvm_backend.build(gm, "x86", example_inputs=torch.rand(1, 2))


@pytest.fixture(scope="module")
def small() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """A tiny quantize -> conv -> dequantize graph for the cross targets."""
    root = nn.Sequential(im.Quantize(0.02, 8, signed=False),
                         make_layer("conv", 3, 4, 0.02, x_bits=8, w_bits=4, out_bits=8),
                         im.Dequantize(0.05))
    return im.trace_integer(root), example((1, 3, 8, 8))


def test_aarch64_tar_export_without_toolchain(small: tuple, tmp_path) -> None:
    gm, x = small
    model = tvm_backend.build(gm, "aarch64", example_inputs=x)
    path = model.export(tmp_path / "net.tar")
    with tarfile.open(path) as tar:
        assert any(name.endswith(".o") for name in tar.getnames())
    with pytest.raises(BackendError, match="cannot run"):
        model(x)
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        with pytest.raises(BackendError, match="apt-get install gcc-aarch64-linux-gnu"):
            model.export(tmp_path / "net.so")
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 not installed: aarch64 execution not checked")


def test_cuda_source_and_ptx(small: tuple) -> None:
    gm, x = small
    model = tvm_backend.build(gm, "cuda", example_inputs=x)
    source = model.cuda_source()
    assert "__global__" in source
    try:
        tvm_backend.find_nvcc()
    except BackendError:
        pytest.skip("nvcc not installed: PTX not checked")
    ptx = tvm_backend.compile_cuda_to_ptx(source, arch="sm_80")
    assert ".entry" in ptx and ".target sm_80" in ptx


class WithPassThrough(nn.Module):
    """Quantize -> Identity -> Dropout -> conv -> F.dropout(training=self.training) -> Dropout2d."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, signed=False)
        self.identity = nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.conv = make_layer("conv", 3, 4, 0.02, x_bits=8, w_bits=4, out_bits=8, seed=6)
        self.drop2d = nn.Dropout2d(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.drop(self.identity(self.quant(x))))
        y = torch.nn.functional.dropout(y, 0.2, self.training)
        return self.drop2d(y.detach())


def test_identity_and_eval_dropout_pass_through() -> None:
    gm = im.trace_integer(WithPassThrough().eval())
    x = example((2, 3, 8, 8))
    model = tvm_backend.build(gm, "x86", example_inputs=x)
    _assert_equal((model(x),), (gm(x),))
    assert "dropout" not in model.script()


def test_training_mode_dropout_is_refused() -> None:
    gm = im.trace_integer(WithPassThrough().eval())
    gm.get_submodule("drop").train()
    with pytest.raises(BackendError, match=r"drop.*training mode.*eval\(\)"):
        tvm_backend.build(gm, "x86", example_inputs=example((1, 3, 8, 8)))
    traced_training = im.trace_integer(WithPassThrough().train())
    traced_training.eval()  # the modules are fine now, but F.dropout was traced training=True
    with pytest.raises(BackendError, match="traced with training=True and p=0.2"):
        tvm_backend.build(traced_training, "x86", example_inputs=example((1, 3, 8, 8)))
