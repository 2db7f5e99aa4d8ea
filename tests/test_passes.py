"""Each convert pass on its own: structure (golden node/shape facts on tiny graphs) and numerics.

``fold_gates``, ``strip_weight_quantizers``, ``prune_graph`` and ``fold_scales`` take what the
earlier stage recorded as arguments and return what they computed; these tests call them one at a
time on a copy of a prepared (or captured) tiny model.
"""

from __future__ import annotations

import copy

import pytest
import tiny_models as T
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

import djpq_compiler as djpq
from djpq_compiler.analysis import analyze
from djpq_compiler.config import DJPQConfig
from djpq_compiler.errors import PruningError, QuantizationError
from djpq_compiler.modules.gates import VIBGate
from djpq_compiler.passes.fold_gates import fold_gates
from djpq_compiler.passes.fold_scales import fold_scales
from djpq_compiler.passes.insert_channel_masks import insert_channel_masks
from djpq_compiler.passes.prune import prune_graph
from djpq_compiler.passes.strip_weight_quantizers import strip_weight_quantizers
from djpq_compiler.prepared import gates, open_gates, quantizers, set_gates_deterministic
from djpq_compiler.records import prepared_record

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _prepared(model: nn.Module, config: DJPQConfig | None = None) -> fx.GraphModule:
    torch.manual_seed(0)
    return djpq.prepare(model.eval(), X, config).eval()


def _gate_nodes(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), VIBGate)]


def _prune_atoms(p: fx.GraphModule, atoms: dict[int, list[int]]) -> None:
    """Make the gate of each group drop exactly the listed atoms (mu ~ 0 there)."""
    for gid, dropped in atoms.items():
        gate = p.get_submodule(prepared_record(p).gates[gid])
        with torch.no_grad():
            gate.mu[dropped] = 1e-4


# --------------------------------------------------------------------------- fold_gates
def test_fold_gates_removes_every_gate_and_returns_keep_and_mu() -> None:
    p = _prepared(T.Residual())
    _prune_atoms(p, {0: [1, 4, 6], 1: [0, 5]})
    record = prepared_record(p)
    gm = copy.deepcopy(p)
    assert _gate_nodes(gm)
    out = fold_gates(gm, record.gates)
    assert out.graph_module is gm and out.modified
    assert _gate_nodes(gm) == [] and not hasattr(gm, "djpq_gates")
    assert out.record.keep == {0: [0, 2, 3, 5, 7], 1: [1, 2, 3, 4]}
    assert set(out.record.scales) == {"bn0", "bn2", "bn1"}  # the gate points
    mu0 = p.get_submodule(record.gates[0]).mu.detach().to(torch.float64)
    assert out.record.scales["bn0"].dtype == torch.float64
    assert torch.equal(out.record.scales["bn2"], mu0)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert {u.name for u in nodes["bn0"].users} == {"relu"}  # the gate's user reads bn0 now
    assert "djpq.keep" not in gm.meta and "djpq.gate_scales" not in gm.meta


def test_fold_gates_rounds_kept_counts_up() -> None:
    p = _prepared(T.Residual())
    _prune_atoms(p, {0: [1, 4, 6], 1: [0, 5]})
    keep = fold_gates(copy.deepcopy(p), prepared_record(p).gates, round_to=4).record.keep
    assert [len(keep[0]), len(keep[1])] == [8, 4]


def test_fold_gates_of_open_gates_changes_no_output() -> None:
    p = _prepared(T.Residual(), DJPQConfig(quantize=False))
    open_gates(p)
    gm = copy.deepcopy(p)
    fold_gates(gm, prepared_record(p).gates)
    with torch.no_grad():
        assert torch.equal(gm(X), p(X))


# --------------------------------------------------------------------------- fold_scales
def _gated(model: nn.Module, seed: int) -> tuple[fx.GraphModule, fx.GraphModule, dict]:
    """A prepared float model with random signed mu (all kept, deterministic gates) and the
    same model after ``fold_gates``, with the factors that pass returned."""
    p = _prepared(model, DJPQConfig(quantize=False))
    gen = torch.Generator().manual_seed(seed)
    for _, gate in gates(p):
        with torch.no_grad():
            sign = torch.where(torch.rand(gate.mu.shape, generator=gen) < 0.3, -1.0, 1.0)
            gate.mu.copy_(sign * torch.empty(gate.mu.shape).uniform_(0.5, 2.0, generator=gen))
            gate.log_sigma2.fill_(-20.0)  # every atom kept
    set_gates_deterministic(p, True)
    gm = copy.deepcopy(p)
    scales = fold_gates(gm, prepared_record(p).gates).record.scales
    return p, gm, scales


@pytest.mark.parametrize("model", [T.Residual, T.InvertedResidual])
def test_fold_scales_with_layers_equals_the_gated_model(model: type[nn.Module]) -> None:
    p, gm, scales = _gated(model(), seed=1)
    out = fold_scales(gm, scales, scale_layers=True)
    assert out.record == {}  # everything folded
    with torch.no_grad():
        torch.testing.assert_close(gm(X), p(X), rtol=1e-5, atol=1e-5)


def test_fold_scales_keeps_layer_factors_for_integer_lowering() -> None:
    p, gm, scales = _gated(T.InvertedResidual(), seed=2)
    assert "stem" in scales  # a conv gate point without BN
    stem = gm.get_submodule("stem").weight.detach().clone()
    kept = fold_scales(gm, scales, scale_layers=False).record
    assert set(kept) == {"stem"} and torch.equal(kept["stem"], scales["stem"])
    assert torch.equal(gm.get_submodule("stem").weight, stem)  # left to to_integer
    bn = gm.get_submodule("bn_p")  # a norm gate point is always folded (exact for any sign)
    want = p.get_submodule("bn_p").weight.detach() * scales["bn_p"].to(torch.float32)
    assert torch.equal(bn.weight.detach(), want)


def test_fold_scales_refuses_a_point_that_is_no_layer_or_norm() -> None:
    gm = analyze(T.Residual().eval(), X).graph_module
    with pytest.raises(QuantizationError, match="cannot fold the gate after.*relu"):
        fold_scales(gm, {"relu": torch.ones(8, dtype=torch.float64)}, scale_layers=True)


# ------------------------------------------------------------------ strip_weight_quantizers
def test_strip_weight_quantizers_returns_grids_and_plain_weights() -> None:
    p = _prepared(T.Residual())
    paths = prepared_record(p).quantizers.weight
    assert set(paths) == {"stem", "conv1", "conv2", "fc"}
    gm = copy.deepcopy(p)
    grid = strip_weight_quantizers(gm, paths).record
    assert set(grid) == set(paths) and all(bits == 8 for _, bits in grid.values())
    for layer in ("stem", "conv1", "conv2", "fc"):
        mod = gm.get_submodule(layer)
        assert not parametrize.is_parametrized(mod)
        original = p.get_submodule(layer).parametrizations.weight.original
        assert torch.equal(mod.weight, original)  # the float original (integer=False)
        quant = p.get_submodule(paths[layer])
        assert grid[layer][0] == pytest.approx(float(quant.snapped().d), rel=1e-5)


def test_strip_weight_quantizers_fake_quantized_weights_keep_the_output() -> None:
    p = _prepared(T.Residual())
    for _, q in quantizers(p):
        q.snap_()
    gm = copy.deepcopy(p)
    grid = strip_weight_quantizers(gm, prepared_record(p).quantizers.weight,
                                   fake_quantize=True).record
    for layer, (d, bits) in grid.items():
        codes = gm.get_submodule(layer).weight.detach() / d
        assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the grid
        assert int(codes.round().abs().max()) <= 2 ** (bits - 1) - 1
    with torch.no_grad():
        torch.testing.assert_close(gm(X), p(X), rtol=0, atol=1e-5)


def test_strip_weight_quantizers_refuses_per_channel_quantizers() -> None:
    from djpq_compiler.config import QuantSpec

    p = _prepared(T.Residual(), DJPQConfig(weight=QuantSpec(bits=8, per_channel=True)))
    with pytest.raises(QuantizationError, match="per-channel"):
        strip_weight_quantizers(copy.deepcopy(p), prepared_record(p).quantizers.weight)


# --------------------------------------------------------------------------- prune_graph
KEEP = {0: [0, 2, 5], 1: [1, 3]}


def test_prune_graph_slices_every_member() -> None:
    report = analyze(T.Residual().eval(), X)
    gm = report.graph_module
    prune_graph(gm, report.groups, KEEP)
    shapes = {name: tuple(m.weight.shape) for name, m in gm.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
    assert shapes == {"stem": (3, 3, 3, 3), "bn0": (3,), "conv1": (2, 3, 3, 3), "bn1": (2,),
                      "conv2": (3, 2, 3, 3), "bn2": (3,), "fc": (4, 3)}
    assert gm.get_submodule("bn0").running_mean.shape == (3,)
    assert gm.get_submodule("conv1").in_channels == 3 and gm.get_submodule("fc").in_features == 3


def test_prune_graph_equals_masking_the_removed_channels() -> None:
    report = analyze(T.Concat().eval(), X)
    group = report.group_of("cat")
    keep = {group.id: [0, 3, 4, 8]}
    masked = copy.deepcopy(report.graph_module)
    insert_channel_masks(masked, report.groups, keep)
    pruned = copy.deepcopy(report.graph_module)
    prune_graph(pruned, report.groups, keep)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(X), masked.eval()(X), rtol=1e-5, atol=1e-6)


def test_prune_graph_refuses_bad_keep_and_leaves_the_graph_alone() -> None:
    report = analyze(T.Residual().eval(), X)
    gm = report.graph_module
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(PruningError):
        prune_graph(gm, report.groups, {1: [0, 99]})
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())
