"""One registry type, one lowering base and one op-fact table for passes and backends."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from djpq_compiler import op_facts as facts
from djpq_compiler.backends import lowering
from djpq_compiler.backends.common_ops import (
    check_inference_identity,
    layer_norm_params,
    plan_slice,
)
from djpq_compiler.errors import BackendError, UnsupportedNodesError, UnsupportedOpError
from djpq_compiler.ir import modules as im
from djpq_compiler.ir.lookup import BINARY_OPS, UNARY_OPS
from djpq_compiler.passes.dependency.rules import RULES
from djpq_compiler.registry import Registry, op_key


@pytest.mark.parametrize("spelling", [nn.ReLU, F.relu, torch.relu, torch.Tensor.relu, "relu"])
def test_every_relu_spelling_is_one_fact(spelling: object) -> None:
    assert spelling in facts.RELU
    assert spelling in facts.ELEMENTWISE_UNARY and spelling in facts.ZERO_PRESERVING
    assert spelling in facts.ALWAYS_NONNEG
    assert facts.op_name(spelling) == "relu"
    assert spelling not in facts.RELU6 and spelling not in facts.NOT_ZERO_PRESERVING


def test_in_place_relu_is_its_own_op() -> None:
    assert "relu_" not in facts.RELU and torch.relu_ not in facts.RELU
    assert "relu_" in facts.ZERO_PRESERVING and facts.op_name("relu_") == "relu_"


def test_opset_membership_never_raises_and_unions() -> None:
    assert [] not in facts.SHAPE_ONLY  # unhashable target
    assert "not_a_tensor_method" not in facts.SHAPE_ONLY
    both = facts.RESIDUAL_ADD + facts.CONCAT
    assert isinstance(both, facts.OpSet) and "add" in both and torch.cat in both
    assert facts.AVG_POOLS.modules() == (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def test_lookup_tables_are_derived_from_the_facts() -> None:
    assert UNARY_OPS == facts.name_table(facts.ELEMENTWISE_UNARY)
    assert BINARY_OPS[torch.Tensor.mul] == "multiply" and BINARY_OPS[operator.truediv] == "divide"
    with pytest.raises(KeyError, match="no named op"):
        facts.name_table(facts.ops(torch.cos))


def test_method_names_and_methods_are_one_key() -> None:
    assert op_key("view") is torch.Tensor.view
    assert op_key("output") == "output" and op_key("shape") == "shape"  # not tensor methods
    reg: Registry[Callable[..., object]] = Registry("test")
    reg.register("flatten")(len)
    assert reg.get(torch.Tensor.flatten) is len and reg.get("flatten") is len
    assert RULES.get("relu") is RULES.get(torch.Tensor.relu) is not None


class _SameForward(nn.ReLU):
    pass


class _OtherForward(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def test_subclass_inherits_a_rule_only_with_its_forward() -> None:
    reg: Registry[Callable[..., object]] = Registry("test")
    reg.register(nn.ReLU)(len)
    assert reg.get(_SameForward) is len
    assert reg.get(_OtherForward) is None  # computes something else: no rule (safe)


def test_backends_share_the_registry_and_their_converters_cover_the_facts() -> None:
    from djpq_compiler.backends.onnx import graph as onnx_graph
    from djpq_compiler.backends.tvm import emit as tvm_emit

    for backend in (tvm_emit.CONVERTERS, onnx_graph.CONVERTERS):
        assert isinstance(backend, Registry)
        for key in (*facts.ELEMENTWISE_UNARY, *facts.ELEMENTWISE_BINARY, *facts.DROPOUTS,
                    *facts.LAYER_NORM, *facts.MATMUL, *facts.RESHAPE, *facts.PIECES):
            assert key in backend, (backend.name, key)
        assert "placeholder" in backend and "output" in backend and "get_attr" in backend


class _Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.1, 8, signed=False)
        self.dequant = im.Dequantize(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.special.erfc(self.dequant(self.quant(x)))
        return torch.bitwise_not(self.quant(y))


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_both_backends_report_unsupported_nodes_alike(backend: str) -> None:
    import importlib

    module = importlib.import_module(f"djpq_compiler.backends.{backend}")
    gm = im.trace_integer(_Unsupported())
    report = module.unsupported_nodes(gm)
    assert [n.target for n, _ in report] == [torch.special.erfc, torch.bitwise_not]
    assert "between Dequantize and Quantize" in report[0][1]
    with pytest.raises(UnsupportedNodesError) as info:
        lowering.raise_unsupported(backend.upper(), f"djpq_compiler.backends.{backend}", report)
    assert isinstance(info.value, BackendError) and isinstance(info.value, UnsupportedOpError)
    message = str(info.value)
    assert "2 node(s)" in message and f"djpq_compiler.backends.{backend}.register" in message
    for node, _ in report:
        assert node.format_node() in message


def _getitem_node() -> fx.Node:
    graph = fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(operator.getitem, (x, 0))


def test_slice_plan() -> None:
    node = _getitem_node()
    plan = plan_slice(node, (2, 5, 6), (Ellipsis, 1, slice(1, None, 2)))
    assert plan.slices == ((2, 1, 6, 2),) and plan.picks == ((1, 1),)
    assert plan_slice(node, (2, 5), (slice(None), -1)).picks == ((1, 4),)
    assert plan_slice(node, (2, 5), Ellipsis) == plan_slice(node, (2, 5), slice(None))
    for bad, match in ((True, "only int"), (None, "only int"), (slice(None, None, -1), "only"),
                       ((Ellipsis, Ellipsis), r"more than one \.\.\."),
                       ((0, 0, 0), "3 indices for 2 dims")):
        with pytest.raises(BackendError, match=match):
            plan_slice(node, (2, 5), bad)
    with pytest.raises(BackendError, match="dim 0, dynamic"):
        plan_slice(node, (2, 5), 0, fixed_axes={0}, fixed_why="dynamic")


class _Ctx(lowering.LoweringContext):
    pass


def test_training_dropout_is_refused_by_the_shared_check() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.drop(x), 0.2, True) + F.dropout(x, 0.2, False)

    gm = fx.symbolic_trace(Net())
    ctx = _Ctx(gm)
    module_node, traced_training, traced_eval = [n for n in gm.graph.nodes
                                                 if "drop" in n.name]
    gm.get_submodule("drop").train()
    with pytest.raises(BackendError, match=r"Dropout\(p=0.3\) is in training mode.*eval\(\)"):
        check_inference_identity(ctx, module_node)
    gm.get_submodule("drop").eval()
    check_inference_identity(ctx, module_node)
    with pytest.raises(BackendError, match="traced with training=True and p=0.2"):
        check_inference_identity(ctx, traced_training)
    check_inference_identity(ctx, traced_eval)


def test_layer_norm_params_module_and_function() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4, eps=1e-3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(self.norm(x), (4,), self.norm.weight, None, 1e-6)

    gm = fx.symbolic_trace(Net())
    ctx = _Ctx(gm)
    module_node = next(n for n in gm.graph.nodes if n.op == "call_module")
    function_node = next(n for n in gm.graph.nodes if n.target is F.layer_norm)
    p = layer_norm_params(ctx, module_node, (2, 3, 4))
    assert p.shape == (4,) and p.eps == 1e-3 and p.bias is gm.get_submodule("norm").bias
    q = layer_norm_params(ctx, function_node, (2, 3, 4))
    assert q.shape == (4,) and q.eps == 1e-6 and q.bias is None
    assert q.weight is gm.get_submodule("norm").weight
    with pytest.raises(BackendError, match=r"normalized_shape \(4,\) does not end"):
        layer_norm_params(ctx, module_node, (2, 4, 3))


class _MissingAndRefused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = im.Quantize(0.1, 8, signed=False)
        self.dequant = im.Dequantize(0.1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.dequant(self.quant(x))
        dropped = F.dropout(y, 0.2, True)  # traced in training mode: refused by its converter
        return self.quant(torch.special.erfc(y)), self.quant(dropped * 2.0)


def test_onnx_lists_missing_and_refused_nodes_in_one_error() -> None:
    pytest.importorskip("onnx")
    from djpq_compiler.backends.onnx import lower

    gm = im.trace_integer(_MissingAndRefused())
    with pytest.raises(UnsupportedNodesError) as info:
        lower(gm, (torch.rand(1, 4),))
    message = str(info.value)
    assert "2 node(s)" in message and "Nothing was written." in message
    assert "no ONNX converter for call_function <built-in function special_erfc>" in message
    assert "traced with training=True and p=0.2" in message
    listed = [line.split()[0] for line in message.splitlines() if line.startswith("  %")]
    assert listed == ["%dropout", "%special_erfc"]  # the consumer of the refused node is skipped
