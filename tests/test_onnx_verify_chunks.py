"""The ONNX verifier checks in chunks: same result as one whole-graph run, bounded working set.

``backends/onnx/verify.py`` runs the exported file chunk by chunk (one onnxruntime session per
chunk and mode) while the reference streams its codes, so a big model (vit_h_14) is checked
without holding every intermediate at once. These tests pin that the chunk size changes nothing
in the report (also where ops disagree), that the bound holds (what each run fetches, what is
kept between runs) and that no float tensor crosses a chunk boundary.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
tv = pytest.importorskip("torchvision")

from djpq_compiler.backends.onnx import export, verify  # noqa: E402
from djpq_compiler.backends.onnx.verify import VerifyRun  # noqa: E402
from djpq_compiler.errors import BackendError  # noqa: E402
from djpq_compiler.testing.backend_zoo import pruned_converted, tiny_swin  # noqa: E402

# the package re-exports the function ``verify`` under the module's name
verify_module = importlib.import_module("djpq_compiler.backends.onnx.verify")

_CACHE: dict[str, tuple[Any, torch.Tensor]] = {}


def _model(name: str) -> tuple[Any, torch.Tensor]:
    """``(converted, x)``: a 3-layer torchvision ViT or a two-stage Swin, pruned at random."""
    if name not in _CACHE:
        if name == "vit":
            torch.manual_seed(0)
            model = tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=3,
                                                num_heads=2, hidden_dim=32, mlp_dim=64,
                                                num_classes=10)
            x = torch.randn(2, 3, 32, 32)
            _CACHE[name] = (pruned_converted(model, x)[1], x)
        else:
            _CACHE[name] = tiny_swin()
    return _CACHE[name]


def _runs(converted: Any, path: Path, x: torch.Tensor, **kw: Any) -> tuple[dict, list[VerifyRun]]:
    runs: list[VerifyRun] = []
    return verify(converted, path, x, observe=runs.append, **kw), runs


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_chunked_report_equals_one_chunk(name: str, tmp_path: Path) -> None:
    converted, x = _model(name)
    path = export(converted, tmp_path / "m.onnx", (x,))
    whole, runs = _runs(converted, path, x, chunk=None)
    assert [r.kind for r in runs] == ["free", "forced"]  # one session per mode
    assert runs[0].outputs == len(whole["nodes"]) > 20
    for chunk in (1, 3, 32):
        assert verify(converted, path, x, chunk=chunk) == whole, chunk
    assert set(whole["per_op"]) == set(whole["nodes"])
    assert whole["max_lsb_per_op"] <= 1


def test_chunked_report_equals_one_chunk_where_an_op_disagrees(tmp_path: Path) -> None:
    """A corrupted weight: the op that reads it disagrees on the reference's inputs, its flips
    propagate in the free run; every chunk size reports exactly that."""
    converted, x = _model("vit")
    model = onnx.load(str(export(converted, tmp_path / "m.onnx", (x,))))
    target = "djpq_int_linear_encoder_layers_encoder_layer_1_mlp_0"
    weight = next(t for t in model.graph.initializer if t.name == f"{target}/weight")
    codes = onnx.numpy_helper.to_array(weight).copy()
    codes.flat[: codes.size // 2] = np.clip(codes.flat[: codes.size // 2].astype(int) + 40,
                                            -127, 127)
    weight.CopyFrom(onnx.numpy_helper.from_array(codes, weight.name))
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    whole = verify(converted, path, x, chunk=None)
    bad = [n for n, d in whole["per_op"].items() if d > 1]
    assert bad and all("encoder_layer_1" in n for n in bad), bad
    assert whole["max_lsb_any"] >= whole["max_lsb_per_op"] > 1
    for chunk in (1, 4):
        assert verify(converted, path, x, chunk=chunk) == whole, chunk


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_chunk_bound_limits_what_each_run_fetches_and_what_is_held(name: str,
                                                                   tmp_path: Path) -> None:
    converted, x = _model(name)
    path = export(converted, tmp_path / "m.onnx", (x,))
    report, runs = _runs(converted, path, x, chunk=2)
    total = len(report["nodes"])
    free = [r for r in runs if r.kind == "free"]
    forced = [r for r in runs if r.kind == "forced"]
    assert len(free) == len(forced) >= total // 2
    assert max(r.outputs for r in runs) <= 2 + 1  # two activations (+ a carried shape tensor)
    # kept between runs: the activations later chunks still read (a residual, the skip of a
    # window block), never a growing share of the model's activations
    assert max(r.held for r in runs) <= 6 < total // 4
    assert max(r.inputs for r in runs) <= 2 * 3 + 1


def test_no_float_tensor_crosses_a_chunk(tmp_path: Path) -> None:
    """Chunks end only where every tensor still read later is a cut activation or an integer
    tensor, so onnxruntime fuses each float island as it does in one session."""
    converted, x = _model("swin")
    model = onnx.load(str(export(converted, tmp_path / "m.onnx", (x,))))
    infos, types = verify_module._value_infos(model)
    cut = [n for n in (node.name for node in converted.graph.nodes)
           if types.get(n) in verify_module._NP_TYPES]
    exact = {n for n, t in types.items() if t in verify_module._EXACT_TYPES}
    chunks = verify_module._plan(model.graph, cut, exact, 1)
    assert len(chunks) > 10
    assert sorted(n for c in chunks for n in c.produced) == sorted(cut)
    assert sorted(i for c in chunks for i in c.nodes) == list(range(len(model.graph.node)))
    crossing = {n for c in chunks for n in c.carry_in}
    assert crossing <= exact, crossing - exact
    float_spans = [n for n in types if types[n] == onnx.TensorProto.FLOAT]
    assert float_spans  # the model has float islands, whose tensors stay inside one chunk
    assert not crossing & set(float_spans)


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, "8"])
def test_bad_chunk_is_a_backend_error(chunk: Any, tmp_path: Path) -> None:
    converted, x = _model("vit")
    path = export(converted, tmp_path / "m.onnx", (x,))
    with pytest.raises(BackendError, match="chunk must be a positive int"):
        verify(converted, path, x, chunk=chunk)


def test_wrong_number_of_inputs_is_a_backend_error(tmp_path: Path) -> None:
    converted, x = _model("vit")
    path = export(converted, tmp_path / "m.onnx", (x,))
    with pytest.raises(BackendError, match=r"1 input\(s\) but 2 example input\(s\)"):
        verify(converted, path, (x, x))


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_shape_inference_without_weight_payloads_equals_the_full_one(name: str,
                                                                     tmp_path: Path) -> None:
    """The verifier infers types and shapes on the graph with its large initializers as typed
    inputs (no second copy of the weights): the same value infos as on the whole file."""
    converted, x = _model(name)
    model = onnx.load(str(export(converted, tmp_path / "m.onnx", (x,))))
    infos, types = verify_module._value_infos(model)
    full = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    assert infos == full
    assert len(types) == len(full) > 50
