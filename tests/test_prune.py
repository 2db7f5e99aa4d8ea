"""Physical pruning: exactness against masking, size accounting, and bad requests."""

from __future__ import annotations

import pytest
import tiny_models as T
import torch

from djpq_compiler import PruningError
from djpq_compiler.analysis import analyze, prune
from djpq_compiler.verify import pruning_oracle

CASES = [
    (T.Residual, (2, 3, 8, 8)),
    (T.InvertedResidual, (2, 3, 8, 8)),
    (T.Concat, (2, 3, 8, 8)),
    (T.Split, (2, 3, 8, 8)),
    (T.SqueezeExcite, (2, 3, 8, 8)),
    (T.FlattenLinear, (2, 1, 6, 6)),
    (T.Attention, (2, 5, 6)),
    (T.Decoder, (2, 3, 8, 8)),
]


@pytest.mark.parametrize("model,shape", CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_equals_masked(model: type[torch.nn.Module], shape: tuple[int, ...],
                              seed: int) -> None:
    torch.manual_seed(seed)
    report, err, n0, n1 = pruning_oracle(model().eval(), torch.randn(*shape), seed)
    assert report.prunable_groups
    assert err < 1e-5
    assert n1 < n0


def test_parameter_count_shrinks_as_predicted() -> None:
    model = T.Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    report = analyze(model, x)
    inner = report.group_of("conv1")  # conv1 (8->6) + bn1, consumer conv2 (6->8)
    pruned = prune(model, x, {inner.id: [0, 2, 5]})
    assert pruned.conv1.out_channels == 3 and pruned.conv2.in_channels == 3
    removed = 3 * (8 * 9 + 1) + 3 * 2 + 3 * 9 * 8  # conv1 rows+bias, bn1 affine, conv2 columns
    assert sum(p.numel() for p in model.parameters()) - \
        sum(p.numel() for p in pruned.parameters()) == removed


def test_depthwise_groups_follow() -> None:
    model = T.InvertedResidual().eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(model, x).group_of("dw")
    pruned = prune(model, x, {g.id: list(range(5))})
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels == 5
    assert pruned.bn_d.num_features == 5 and pruned.project.in_channels == 5


def test_flatten_linear_literal_view_is_rewritten() -> None:
    model = T.FlattenLinear().eval()
    x = torch.randn(2, 1, 6, 6)
    g = analyze(model, x).group_of("conv")
    pruned = prune(model, x, {g.id: [1, 3]})
    assert pruned.fc1.in_features == 32
    assert pruned(x).shape == (2, 3)


def test_input_model_untouched() -> None:
    model = T.Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    before = model(x)
    g = analyze(model, x).group_of("add")
    prune(model, x, {g.id: [0, 1]})
    assert torch.equal(model(x), before) and model.conv2.out_channels == 8


def test_bad_requests_raise() -> None:
    model = T.Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    report = analyze(model, x)
    fixed = next(g for g in report.groups if not g.prunable)
    ok = report.prunable_groups[0]
    with pytest.raises(PruningError, match="not prunable"):
        prune(model, x, {fixed.id: [0]})
    with pytest.raises(PruningError, match="empty"):
        prune(model, x, {ok.id: []})
    with pytest.raises(PruningError, match="distinct"):
        prune(model, x, {ok.id: [0, 0]})
    with pytest.raises(PruningError, match="distinct"):
        prune(model, x, {ok.id: [ok.size]})
    with pytest.raises(PruningError, match="groups are"):
        prune(model, x, {99: [0]})


def test_conv_transpose_prunes_both_sides() -> None:
    model = T.Decoder().eval()
    x = torch.randn(1, 3, 8, 8)
    report = analyze(model, x)
    enc, up = report.group_of("enc"), report.group_of("up")
    assert enc.nodes == {"enc", "relu"} and up.gate_points == ("bn",)
    pruned = prune(model, x, {enc.id: [0, 3], up.id: [1, 2, 4]})
    assert pruned.up.in_channels == 2 and pruned.up.out_channels == 3
    assert tuple(pruned.up.weight.shape[:2]) == (2, 3) and pruned.head.in_channels == 3
