"""Integer ops on constant inputs never reach TVM: their codes are folded by the reference.

A conv applied to a model attribute (a learned image, a position table) becomes an integer conv
on constant codes whose output is not a ``Quantize``'s. Before, only float and ``Quantize``
boundaries of constant subgraphs were folded, so TVM got the written conv kernel on a constant:
its FoldConstant pass compiled that x86 kernel for a generic CPU and LLVM aborted the process
(exit 134). The TVM backend now registers ``"constant_codes"`` and every integer boundary is
folded (``backends/lowering.py``). The build runs in a child process, so a regression fails this
test instead of killing the test session.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from djpq_compiler.backends.lowering import constant_subgraphs
from djpq_compiler.ir import modules as im
from djpq_compiler.testing.backend_zoo import pruned_converted

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class ConstantConv(nn.Module):
        """``head(relu(conv(x) + relu(conv2(image))))`` with ``image`` an attribute."""

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
            self.image = nn.Parameter(torch.randn(2, 3, 8, 8))
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.conv(x) + torch.relu(self.conv2(self.image))))
''')


def _model() -> nn.Module:
    scope: dict[str, object] = {}
    exec(MODEL, scope)  # the same source the child process runs
    torch.manual_seed(0)
    return scope["ConstantConv"]().eval()  # type: ignore[operator]


def test_integer_boundary_is_folded_with_codes() -> None:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, converted = pruned_converted(_model(), x)
    conv2 = next(n for n in converted.graph.nodes if n.op == "call_module"
                 and isinstance(converted.get_submodule(str(n.target)), im.IntConv2d)
                 and n.args[0].args[0].op == "get_attr")
    assert constant_subgraphs(converted) == ({}, set())  # not a float/Quantize boundary
    folded, skipped = constant_subgraphs(converted, codes=True)
    assert set(folded) == {conv2} and skipped == {conv2.args[0]}
    assert torch.equal(folded[conv2], converted.get_submodule(str(conv2.target))(
        converted.get_submodule(str(conv2.args[0].target))(converted.image)))


CHILD = MODEL + textwrap.dedent('''
    from djpq_compiler.backends import tvm as tvm_backend
    from djpq_compiler.testing.backend_zoo import pruned_converted

    torch.manual_seed(0)
    model = ConstantConv().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, converted = pruned_converted(model, x)
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    for seed in (1, 2):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(compiled(inp), converted(inp))
    print("BIT-EXACT")
''')


def test_tvm_builds_a_conv_on_a_constant_bit_exact(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "BIT-EXACT" in done.stdout, done.stderr[-2000:]


def test_onnx_export_of_a_conv_on_a_constant(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export, verify

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _, converted = pruned_converted(_model(), x)
    report = verify(converted, export(converted, tmp_path / "m.onnx", (x,)), (x,))
    assert report["max_lsb_per_op"] <= 1
