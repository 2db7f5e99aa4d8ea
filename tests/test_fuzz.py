"""Property-based fuzzing of random architectures (``djpq_compiler.testing``).

CI runs a bounded, derandomized number of examples; ``benchmarks/fuzz/run.py`` runs thousands.
A failure prints the minimal :class:`~djpq_compiler.testing.graphs.Recipe`; every bug found gets
a regression test below with that recipe.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import djpq_compiler as djpq
from djpq_compiler.errors import PruningError
from djpq_compiler.testing import Recipe, build, check_analysis, check_prepare, example_input
from djpq_compiler.testing.graphs import (
    NO_RULE_OPS,
    Act,
    Concat,
    Conv,
    NoRule,
    Pool,
    Residual,
    Shuffle,
    SplitCat,
    SqueezeExcite,
    recipes,
)
from djpq_compiler.verify import random_keep


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny graphs: one thread avoids oversubscribing the shared CPUs (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CI = settings(max_examples=40, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])


@CI
@given(recipes())
def test_random_graphs_analyze_and_prune_exactly(recipe: Recipe) -> None:
    check_analysis(recipe)


@settings(CI, max_examples=20)
@given(recipes())
def test_random_graphs_prepare_is_the_model_and_bops_agree(recipe: Recipe) -> None:
    check_prepare(recipe)


EVERY_BLOCK = Recipe(blocks=(
    Conv(out=6, k=3, stride=2, groups=1, bn=True, act="hardswish"),
    Conv(out=6, k=3, groups="depthwise", act="relu6"),
    Conv(out=8, k=1, groups=2, bn=False, act="gelu"),
    Residual(mid=4, out=8),
    Residual(mid=4, out=6, proj=True, act="relu6"),
    Concat(branches=((3, 1), (5, 3)), act="tanh"),
    SplitCat(pieces=2, how="chunk"),
    SplitCat(pieces=3, how="split", k=1),
    SqueezeExcite(squeeze=2),
    Shuffle(groups=2),
    Act("sigmoid"),
    Pool("max"),
    Conv(out=4, k=1),
    Pool("avg"),
), head="flatten_linear", size=8, seed=3)


def test_a_recipe_with_every_block_kind_holds_every_property() -> None:
    stats = check_analysis(EVERY_BLOCK)
    assert stats.prunable > 0 and stats.params_after < stats.params_before
    check_prepare(EVERY_BLOCK)


def test_recipes_print_as_readable_recipes() -> None:
    text = repr(Recipe(blocks=(Conv(out=4), NoRule("flip_c")), head="conv"))
    assert text == ("Recipe(blocks=(Conv(out=4, k=3, stride=1, groups=1, bn=True, act='relu'), "
                    "NoRule(op='flip_c')), head='conv', size=8, seed=0)")
    assert isinstance(build(Recipe(blocks=(Conv(out=4),))), torch.nn.Module)


@pytest.mark.parametrize("op", NO_RULE_OPS)
def test_ops_without_rules_are_barriers(op: str) -> None:
    recipe = Recipe(blocks=(Conv(out=4), NoRule(op), Conv(out=4)), head="conv")
    report = djpq.analyze(build(recipe), example_input(recipe))
    assert len(report.missing) == 1
    stats = check_analysis(recipe)
    # the conv before the op is fixed; the conv after it (feeding the head) stays prunable
    before = report.group_of("blocks_0_0_1")  # BN after the first conv
    assert not before.prunable and "no channel rule" in (before.reason or "")
    assert stats.prunable == 1


# --------------------------------------------------------------------------- regressions
#: Found by the fuzzer: random_keep could keep only atoms of one concat branch, leaving the other
#: branch's conv with zero output channels; prune then crashed while re-running the graph.
EMPTY_BRANCH = Recipe(blocks=(Concat(branches=((1, 1), (1, 1)), act=None),), head="conv")


def test_regression_concat_branch_is_never_pruned_to_zero_channels() -> None:
    report = djpq.analyze(build(EMPTY_BRANCH), example_input(EMPTY_BRANCH))
    (group,) = report.prunable_groups
    for seed in range(8):
        keep = random_keep(report, seed)[group.id]
        for member in group.members:
            assert set(keep) & set(member.index)
    check_analysis(EMPTY_BRANCH)


def test_regression_prune_refuses_to_empty_a_concat_branch() -> None:
    model, x = build(EMPTY_BRANCH), example_input(EMPTY_BRANCH)
    report = djpq.analyze(model, x)
    (group,) = report.prunable_groups
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=r"removes every channel of .*blocks_0_branches_0_0"):
        djpq.prune(model, x, keep={group.id: [1]})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


#: Found by the long fuzz run (benchmarks/fuzz/RESULTS.md): a channel shuffle whose ``c // groups``
#: is 1 looked like a pass-through (the size-1 dimension hides the split), so the producer's group
#: was prunable, but the shuffle's ``view`` computes ``size(1) // groups`` at run time and asked for
#: ``[2, 2, 0, 4, 4]`` after pruning. Fixed in passes/dependency/rules_shape.py: a reshape whose
#: size arguments are computed from a channel count (other than that count at the channel
#: position) is a barrier.
SHUFFLE_OF_GROUP_SIZE_ONE = Recipe(blocks=(Conv(out=2, bn=False, act=None), Shuffle(groups=2)),
                                   head="conv", size=4)


def test_regression_channel_shuffle_with_one_channel_per_group() -> None:
    check_analysis(SHUFFLE_OF_GROUP_SIZE_ONE)
