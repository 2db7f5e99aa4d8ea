"""Shape code folding (``passes/fold_shape_code.py``) and shape ops on integer tensors.

Golden tests are data: a tiny module, its example input and the call targets left after the
pass. The end-to-end tests prepare, calibrate and ``convert(integer=True)`` small models whose
shape ops must stay on integer codes, then check the TVM build bit for bit against the converted
model (the integer reference) and the ONNX export with ``backends/onnx/verify.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import djpq_compiler as djpq
from djpq_compiler.convert import convert
from djpq_compiler.errors import PruningError
from djpq_compiler.passes.capture import capture
from djpq_compiler.passes.fold_shape_code import fold_shape_code
from djpq_compiler.prepared import gates
from djpq_compiler.records import converted_record


# ------------------------------------------------------------------------------ golden tests
class _NdimAssert(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected NCHW")
        torch._assert(x.dim() == 4, "expected NCHW")
        return F.relu(x)


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


class _Shuffle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _shuffle(x, 2)


class _PatchAssert(nn.Module):
    """ViT's input checks and patch arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        torch._assert(h == 8, "wrong height")
        torch._assert(w == 8, "wrong width")
        return x.reshape(n, c, (h // 4) * (w // 4), 16)


class _BatchFlatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.numel() == 96, "batch 2 only")  # depends on the batch: kept
        return x.view(x.size(0), -1)


class _ChannelAssert(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[1] == 4, "expected 4 channels")
        return x + 1


class _Defaults(nn.Module):
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x, attn_mask=attn_mask, is_causal=is_causal)


class _IntInput(nn.Module):
    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return x.view(x.size(0), x.size(1) * k, -1)


class _ParamShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w.view(1, self.w.shape[0], 1, 1)


class _PairsOfSamples(nn.Module):
    """Runs at even batch sizes only: the pass falls back from batch + 1 to 2 * batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[1] == 3, "expected 3 channels")
        return x.view(x.size(0) // 2, 2, -1).sum(1)


def _targets(gm: fx.GraphModule) -> list[str]:
    """``op:target`` of every node but placeholders and the output."""
    out = []
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            out.append(getattr(n.target, "__name__", str(n.target)))
    return out


#: (module, example inputs, call targets after the pass, placeholders after the pass)
GOLDEN: dict[str, tuple[Callable[[], nn.Module], tuple[Any, ...], list[str], int]] = {
    "ndim_asserts_removed": (_NdimAssert, (torch.randn(2, 3, 4, 4),), ["relu"], 1),
    "channel_shuffle": (_Shuffle, (torch.randn(2, 4, 3, 3),),
                        ["size", "getitem", "view", "transpose", "contiguous", "view"], 1),
    "vit_patch_checks": (_PatchAssert, (torch.randn(2, 4, 8, 8),),
                         ["getattr", "getitem", "reshape"], 1),
    "batch_dependent_kept": (_BatchFlatten, (torch.randn(2, 3, 4, 4),),
                             ["numel", "eq", "_assert", "size", "view"], 1),
    "default_placeholders": (_Defaults, (torch.randn(2, 4, 8),),
                             ["scaled_dot_product_attention"], 1),
    "parameter_shape": (_ParamShape, (torch.randn(2, 4, 3, 3),), ["view", "mul"], 1),
    "even_batch_only": (_PairsOfSamples, (torch.randn(2, 3, 4),),
                        ["size", "floordiv", "view", "sum"], 1),
    "non_tensor_input_kept": (_IntInput, (torch.randn(2, 3, 4), 2),
                              ["size", "mul", "view"], 2),
}


@pytest.mark.parametrize("case", list(GOLDEN))
def test_fold_shape_code_golden(case: str) -> None:
    factory, inputs, expected, placeholders = GOLDEN[case]
    model = factory().eval()
    gm = capture(model, inputs).graph_module
    with torch.no_grad():
        want = model(*inputs)
    fold_shape_code(gm)
    assert _targets(gm) == expected
    assert sum(n.op == "placeholder" for n in gm.graph.nodes) == placeholders
    fed = inputs[:placeholders]
    with torch.no_grad():
        assert torch.equal(gm(*fed), want)


def test_fold_keeps_batch_free() -> None:
    """Folded shape code still runs at another batch size (the batch is never baked in)."""
    gm = capture(_Shuffle().eval(), torch.randn(2, 4, 3, 3)).graph_module
    fold_shape_code(gm)
    x = torch.randn(5, 4, 3, 3)
    assert torch.equal(gm(x), _shuffle(x, 2))
    view = next(n for n in gm.graph.nodes if n.target == "view")
    assert view.args[2:] == (2, 2, 3, 3)  # channel // groups and the spatial sizes folded


def test_fold_false_assert_names_node() -> None:
    """A shape check that pruning broke (simulated: the input now has 3 channels) is refused."""
    gm = capture(_ChannelAssert().eval(), torch.randn(2, 4, 3, 3)).graph_module
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    meta = ph.meta["tensor_meta"]
    ph.meta["tensor_meta"] = meta._replace(shape=torch.Size([2, 3, 3, 3]))
    with pytest.raises(PruningError, match="_assert"):
        fold_shape_code(gm)


# ------------------------------------------------------------------------------ end to end
def _block(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit: chunk, a branch on one half, concat, channel shuffle."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.left, self.right = _block(3, c // 2, 3), _block(3, c // 2, 3)
        self.branch = nn.Sequential(_block(c // 2, c // 2), _block(c // 2, c // 2, 3))
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _shuffle(torch.cat((self.left(x), self.right(x)), dim=1), 2)
        a, b = x.chunk(2, dim=1)
        x = _shuffle(torch.cat((a, self.branch(b)), dim=1), 2)
        return self.head(x)


class LayoutOps(nn.Module):
    """Every layout op of the TVM/ONNX shape converters on integer codes."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.left, self.right = _block(3, c // 2, 3), _block(3, c // 2, 3)
        self.mid = _block(c, c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.left(x), self.right(x)), dim=1)
        n, c, h, w = x.shape
        y = x.permute(0, 2, 3, 1).unsqueeze(1).squeeze(1).permute(0, 3, 1, 2)
        y = y.reshape(n, 2, c // 2, h, w)
        a, b = y.unbind(1)
        p, q = torch.split(x, [3, c - 3], dim=1)
        z = torch.cat((a, b), dim=1) + torch.cat((q, p), dim=1)
        z = self.mid(z.flatten(2).reshape_as(z).swapaxes(2, 3).transpose(2, 3))
        z = z + z[:, :1].expand(-1, c, -1, -1)
        return self.head(z[..., 1:])


def _converted(model: nn.Module, x: torch.Tensor, prune: bool = True) -> fx.GraphModule:
    torch.manual_seed(0)
    prepared = djpq.prepare(model.eval(), x)
    gen = torch.Generator().manual_seed(0)
    for _, gate in gates(prepared):
        with torch.no_grad():
            if prune:
                gate.mu[torch.rand(gate.mu.shape, generator=gen) < 0.3] = 1e-3
            gate.mu[0] = 1.0
    return convert(prepared.eval())


@pytest.mark.parametrize("factory", [ShuffleBlock, LayoutOps])
def test_shape_ops_stay_integer(factory: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    converted = _converted(factory(), x)
    assert converted_record(converted).float_ops == ()
    left = {getattr(n.target, "__name__", n.target) for n in converted.graph.nodes}
    assert not left & {"floordiv", "_assert", "eq"}  # folded: only the batch size is read


def _tvm_exact(converted: fx.GraphModule, x: torch.Tensor) -> None:
    tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    for seed in (1, 2):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        got, want = compiled(inp), converted(inp)
        assert got.dtype == want.dtype and torch.equal(got, want), (got - want).abs().max()


def _onnx_ok(converted: fx.GraphModule, x: torch.Tensor, tmp_path: Path) -> dict[str, Any]:
    pytest.importorskip("onnxruntime")
    from djpq_compiler.backends.onnx import export, verify

    path = export(converted, tmp_path / "m.onnx", (x,))
    report = verify(converted, path, (x,))
    assert report["max_lsb_per_op"] <= 1
    return report


@pytest.mark.parametrize("factory", [ShuffleBlock, LayoutOps])
def test_shape_ops_tvm_bit_exact(factory: Callable[[], nn.Module]) -> None:
    pytest.importorskip("tvm")
    x = torch.randn(2, 3, 8, 8)
    _tvm_exact(_converted(factory(), x), x)


@pytest.mark.parametrize("factory", [ShuffleBlock, LayoutOps])
def test_shape_ops_onnx(factory: Callable[[], nn.Module], tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    converted = _converted(factory(), x)
    report = _onnx_ok(converted, x, tmp_path)
    assert report["outputs"][0]["max_abs_diff"] < 1e-3
    # the batch stays dynamic: a file exported at batch 2 runs at batch 3
    assert verify_batch(converted, tmp_path / "m.onnx", torch.randn(3, 3, 8, 8)) < 1e-3


def verify_batch(converted: fx.GraphModule, path: Path, x: torch.Tensor) -> float:
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    return float((torch.from_numpy(got) - converted(x)).abs().max())


tv = pytest.importorskip("torchvision")


def test_shufflenet_v2_shape_code_folded_and_integer(tmp_path: Path) -> None:
    """torchvision shufflenet_v2_x0_5: the channel shuffles run on codes; only the classifier's
    trailing ReLU + mean stay float; ONNX within 1 LSB per op. TVM: the integer part is
    bit-exact; the float tail (a mean summed in another order, ``float_ops.py``) may move the
    classifier's input by one code, so the logits are checked within one input-LSB unit."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    converted = _converted(tv.models.shufflenet_v2_x0_5(weights=None), x)
    assert set(converted_record(converted).float_ops) <= {"conv5_2", "mean"}
    assert not any(n.target in (torch._assert,) or (n.target is not None and getattr(
        n.target, "__name__", "") == "floordiv") for n in converted.graph.nodes)
    _onnx_ok(converted, x, tmp_path)
    tvm_backend = pytest.importorskip("djpq_compiler.backends.tvm")
    compiled = tvm_backend.build(converted, "x86", example_inputs=x)
    fc = converted.get_submodule("djpq_int.linear_fc")
    w = fc.weight.detach().double().abs().sum(1)
    unit = float((fc.in_scale * fc.w_scale.detach().double().reshape(-1) * w).max())
    for seed in (1, 2):
        inp = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        assert float((compiled(inp) - converted(inp)).abs().max()) <= unit * 1.01


@pytest.mark.parametrize("factory", [ShuffleBlock, LayoutOps])
def test_folded_model_saves_and_loads(factory: Callable[[], nn.Module], tmp_path: Path) -> None:
    """Folded constants (ints, tuples) go through the safe save format."""
    from djpq_compiler.serialize import load_converted, save_converted

    x = torch.randn(2, 3, 8, 8)
    converted = _converted(factory(), x)
    loaded = load_converted(save_converted(converted, tmp_path / "m.djpq"))
    assert torch.equal(loaded(x), converted(x))
