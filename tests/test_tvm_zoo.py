"""TVM backend on converted zoo models: pruned, integer, bit-exact with the reference executor.

The models are prepared from their committed FP32 checkpoints (random init where none is
committed), their gates are closed at random so that every group loses channels, and
``convert()`` removes them; the x86 build must equal the converted GraphModule run in PyTorch
(the integer reference semantics) bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import djpq_compiler as djpq
from djpq_compiler.convert import convert
from djpq_compiler.prepared import gates
from djpq_compiler.records import converted_record
from djpq_compiler.workflows import zoo

pytest.importorskip("tvm")
tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")


def pruned_converted(name: str, batch: int = 2, seed: int = 0) -> tuple[fx.GraphModule,
                                                                           torch.Tensor]:
    """``convert()`` of zoo model ``name`` with ~40 % of every gate group closed at random."""
    torch.manual_seed(seed)
    path = zoo.checkpoint_path(name)
    model = zoo.load_pretrained(name) if path.exists() else zoo.get_model(name)
    x = torch.randn(batch, 1, 28, 28)
    prepared = djpq.prepare(model.eval(), x)
    gen = torch.Generator().manual_seed(seed)
    for _, gate in gates(prepared):
        with torch.no_grad():
            gate.mu[torch.rand(gate.mu.shape, generator=gen) < 0.4] = 1e-3
            gate.mu[0] = 1.0  # never prune a whole group
    return convert(prepared.eval()), x


def _out_channels(gm: nn.Module) -> dict[str, int]:
    return {n: int(m.weight.shape[0]) for n, m in gm.named_modules()
            if getattr(m, "weight", None) is not None and m.weight.dim() == 4}


def test_resnet20_pruned_builds_for_x86_and_is_bit_exact() -> None:
    converted, x = pruned_converted("resnet20")
    identities = [n for n in converted.graph.nodes if n.op == "call_module"
                  and isinstance(converted.get_submodule(str(n.target)), nn.Identity)]
    assert not identities  # resnet20's 7 identity shortcuts are dropped by convert
    original = _out_channels(zoo.get_model("resnet20"))
    assert sum(_out_channels(converted).values()) < sum(original.values())  # channels removed

    model = tvm_backend.build(converted, "x86", example_inputs=x)
    for seed in (1, 2):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 2
        got, want = model(inp), converted(inp)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), (got - want).abs().max()
    assert "Identity" not in model.script()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg7", "inception", "mobilenetv2"])
def test_zoo_pruned_bit_exact(name: str) -> None:
    converted, x = pruned_converted(name)
    model = tvm_backend.build(converted, "x86", example_inputs=x)
    assert torch.equal(model(x), converted(x))


tv = pytest.importorskip("torchvision")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_pruned_mixed_bits_bit_exact(name: str) -> None:
    """torchvision models (random init) at mixed bits (W4 A6, first/last layer W8 A8) with ~40 %
    of every gate group closed: fully integer, and the x86 build is bit-exact."""
    from djpq_compiler.config import DJPQConfig, QuantSpec

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    config = DJPQConfig(weight=QuantSpec(bits=4), activation=QuantSpec(bits=6),
                        fix_first_last_8bit=True)
    prepared = djpq.prepare(tv.models.get_model(name, weights=None).eval(), x, config)
    gen = torch.Generator().manual_seed(0)
    for _, gate in gates(prepared):
        with torch.no_grad():
            gate.mu[torch.rand(gate.mu.shape, generator=gen) < 0.4] = 1e-3
            gate.mu[0] = 1.0
    converted = convert(prepared.eval())
    assert converted_record(converted).float_ops == ()
    model = tvm_backend.build(converted, "x86", example_inputs=x)
    assert torch.equal(model(x), converted(x))
