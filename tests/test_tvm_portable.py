"""Portable x86 targets (``build(..., target="x86-avx2" | "x86-avx512")``): a build for another
x86 machine than this one gets that machine's kernels (never this CPU's AMX or AVX-512 ones on
the AVX2 target), stays bit-exact where this CPU can run it, and says so where it cannot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from djpq_compiler.ir import modules as im
from djpq_compiler.testing.int_layers import int_layer

pytest.importorskip("tvm")
from djpq_compiler.backends.tvm import build  # noqa: E402
from djpq_compiler.backends.tvm.build import (  # noqa: E402
    PORTABLE_X86,
    host_has_features,
    target_spec,
)
from djpq_compiler.errors import BackendError  # noqa: E402


class Net(nn.Module):
    """A 3x3 stem and a 1x1 conv (odd output count) on 4-bit weights."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.02, 8, False)
        self.c1 = int_layer("conv", 1, 24, 0.02, 0.05, x_bits=8, out_bits=4, spread_codes=True,
                            seed=1)
        self.c2 = int_layer("conv", 24, 37, 0.05, 0.05, x_bits=4, k=1, spread_codes=True,
                            seed=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.c1(self.quant(x)))


#: (target, kernel variants the convs may get): the AVX2 build never uses AVX-512 or AMX code.
VARIANTS = {"x86-avx2": ("avx2_",), "x86-avx512": ("avx512_",)}


@pytest.mark.parametrize("target", sorted(PORTABLE_X86))
def test_portable_build_gets_that_machines_kernels(target: str) -> None:
    spec, host = target_spec(target)
    assert spec == {"kind": "llvm", "mcpu": PORTABLE_X86[target][0]} and host is None
    gm = im.trace_integer(Net().eval())
    x = torch.rand(3, 1, 11, 9, generator=torch.Generator().manual_seed(0)) * 5
    model = build(gm, target, example_inputs=x)
    assert model.kernels and all(k.variant.startswith(VARIANTS[target]) for k in model.kernels)
    if host_has_features(PORTABLE_X86[target][1]):
        want = gm(x)
        assert torch.equal(model(x), want) and len(torch.unique(want)) > 3
    else:
        with pytest.raises(BackendError, match="cannot run on this"):
            model(x)


def test_host_features_are_read_from_this_cpu() -> None:
    assert host_has_features(()) is True
    assert host_has_features(("no-such-feature",)) is False
