"""Golden tests: exact channel-group partitions and prunable flags on tiny graphs."""

from __future__ import annotations

import pytest
import tiny_models as T
import torch

from djpq_compiler import UnsupportedOpError
from djpq_compiler.analysis import analyze


def partition(model: torch.nn.Module, shape: tuple[int, ...]) -> dict[frozenset[str], bool]:
    report = analyze(model.eval(), torch.randn(*shape))
    return {g.nodes: g.prunable for g in report.groups}


def test_residual_joins_stem_and_block_output() -> None:
    assert partition(T.Residual(), (1, 3, 8, 8)) == {
        frozenset({"stem", "bn0", "relu", "conv2", "bn2", "add", "relu_2", "adaptive_avg_pool2d",
                   "flatten"}): True,
        frozenset({"conv1", "bn1", "relu_1"}): True,
        frozenset({"fc"}): False,
    }


def test_residual_gates_sit_after_batchnorm() -> None:
    report = analyze(T.Residual().eval(), torch.randn(1, 3, 8, 8))
    assert report.group_of("add").gate_points == ("bn0", "bn2")
    assert report.group_of("conv1").gate_points == ("bn1",)


def test_depthwise_inverted_residual() -> None:
    got = partition(T.InvertedResidual(), (1, 3, 8, 8))
    assert got == {
        frozenset({"stem", "project", "bn_p", "add"}): True,
        frozenset({"expand", "bn_e", "relu6", "dw", "bn_d", "relu6_1"}): True,
        frozenset({"head"}): False,
    }
    report = analyze(T.InvertedResidual().eval(), torch.randn(1, 3, 8, 8))
    # the depthwise conv + BN is a second gate point of the expansion group
    assert report.group_of("dw").gate_points == ("bn_e", "bn_d")


def test_concat_offsets_index_map() -> None:
    report = analyze(T.Concat().eval(), torch.randn(1, 3, 8, 8))
    group = report.group_of("cat")
    assert group.prunable and group.size == 10
    assert group.member("a").index == (0, 1, 2, 3)
    assert group.member("b").index == (4, 5, 6, 7, 8, 9)
    assert group.member("cat").index == tuple(range(10))


def test_split_halves_are_selections_of_one_group() -> None:
    report = analyze(T.Split().eval(), torch.randn(1, 3, 8, 8))
    group = report.group_of("a")
    assert group.nodes == {"a", "relu", "getitem", "getitem_1"} and group.prunable
    assert group.member("getitem_1").index == (4, 5, 6, 7)
    assert {r.kind for r in group.roles("select")} == {"select"}
    assert not report.group_of("add").prunable  # network output


def test_squeeze_excite_scale_joins_the_gated_channels() -> None:
    assert partition(T.SqueezeExcite(), (1, 3, 8, 8)) == {
        frozenset({"conv", "relu", "adaptive_avg_pool2d", "fc2", "sigmoid", "mul"}): True,
        frozenset({"fc1", "relu_1"}): True,
        frozenset({"head"}): False,
    }


def test_flatten_to_linear_stride_map() -> None:
    report = analyze(T.FlattenLinear().eval(), torch.randn(1, 1, 6, 6))
    group = report.group_of("conv")
    assert group.nodes == {"conv", "relu", "view"} and group.prunable
    # each conv channel owns 4*4 consecutive linear input features
    assert group.member("view").index == tuple(c for c in range(4) for _ in range(16))
    assert {r.kind for r in group.roles("reshape")} == {"reshape"}


def test_channel_shuffle_is_a_barrier() -> None:
    report = analyze(T.Shuffle().eval(), torch.randn(1, 3, 4, 4))
    group = report.group_of("a")
    assert not group.prunable and "channel shuffle" in (group.reason or "")


def test_attention_residual_fixed_mlp_hidden_prunable() -> None:
    assert partition(T.Attention(), (1, 5, 6)) == {
        frozenset({"embed", "add", "add_1", "fc2"}): False,
        frozenset({"fc1", "gelu"}): True,
    }


def test_unknown_op_is_barrier_and_strict_raises_naming_node() -> None:
    report = analyze(T.Unknown().eval(), torch.randn(1, 3, 4, 4))
    assert not report.group_of("a").prunable
    assert report.missing == ("cumsum",)
    with pytest.raises(UnsupportedOpError, match="cumsum"):
        analyze(T.Unknown().eval(), torch.randn(1, 3, 4, 4), strict=True)


@pytest.mark.parametrize("model", [T.SigmoidBeforeConsumer, T.ConstantAdd])
def test_zero_not_preserved_makes_group_fixed(model: type[torch.nn.Module]) -> None:
    report = analyze(model().eval(), torch.randn(1, 3, 4, 4))
    group = report.group_of("a")
    assert not group.prunable and "zero is not preserved" in (group.reason or "")


def test_ignored_layer_is_never_prunable() -> None:
    report = analyze(T.Residual().eval(), torch.randn(1, 3, 8, 8), ignore=["conv1"])
    assert not report.group_of("conv1").prunable
    assert report.group_of("add").prunable


def test_analysis_leaves_the_model_untouched() -> None:
    model = T.Residual().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze(model, torch.randn(1, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _SliceBySize(torch.nn.Module):
    """Channels sliced with a bound computed from a size: ``x[:, : y.size(1) // 2]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 1)
        self.b = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y)[:, : y.size(1) // 2]


def test_slice_bound_from_a_size_is_understood_not_a_crash() -> None:
    # the slice's stop is an fx node; the analysis used to raise a TypeError on it
    report = analyze(_SliceBySize().eval(), torch.randn(1, 3, 4, 4))
    assert report.group_of("a").prunable
    assert not report.missing
