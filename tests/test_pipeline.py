"""The pass runner: records handed on, graph checked after every pass, culprit named on failure."""

from __future__ import annotations

import pytest
import tiny_models as T
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

import djpq_compiler as djpq
from djpq_compiler.config import DJPQConfig, QuantSpec
from djpq_compiler.errors import DjpqError, PruningError, QuantizationError
from djpq_compiler.passes.pipeline import (
    PassError,
    PassRunner,
    Recorded,
    check_no_training_modules,
)
from djpq_compiler.records import prepared_record

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _graph() -> fx.GraphModule:
    return fx.symbolic_trace(T.Residual().eval())


def first(gm: fx.GraphModule) -> PassResult:
    return PassResult(gm, False)


def counts(gm: fx.GraphModule) -> Recorded[int]:
    return Recorded(gm, len(gm.graph.nodes), modified=False)


def refuses(gm: fx.GraphModule) -> PassResult:
    raise PruningError("group 3 would be empty")


def crashes(gm: fx.GraphModule) -> PassResult:
    return {}["missing"]  # type: ignore[no-any-return]


def breaks_the_graph(gm: fx.GraphModule) -> PassResult:
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    node.target = "no_such_module"
    return PassResult(gm, True)


def unlinted(gm: fx.GraphModule) -> PassResult:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_before(out):
        late = gm.graph.call_function(torch.neg, (placeholder,))
    placeholder.prepend(late)  # now used... before it is defined: lint must object
    return PassResult(gm, True)


def appends_relu(gm: fx.GraphModule) -> PassResult:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        relu = gm.graph.call_function(torch.relu, (out.args[0],))
    out.args = (relu,)
    return PassResult(gm, True)  # no recompile here: the runner does it


def test_runner_returns_each_pass_result_and_keeps_the_history() -> None:
    gm = _graph()
    run = PassRunner("test")
    assert run(first, gm).graph_module is gm
    assert run(counts, gm).record == len(gm.graph.nodes)
    assert run.history == ["first", "counts"]


def test_a_djpq_error_keeps_its_class_and_names_the_pass_and_history() -> None:
    run = PassRunner("test")
    gm = _graph()
    run(first, gm)
    run(counts, gm)
    with pytest.raises(PruningError, match=r"group 3 would be empty\n\(in pass 'refuses' of test;"
                                           r" passes run before it: first, counts\)"):
        run(refuses, gm)
    assert run.history == ["first", "counts"]  # the failed pass is not in it


def test_any_other_exception_becomes_a_pass_error_naming_the_pass() -> None:
    with pytest.raises(PassError, match=r"(?s)KeyError: 'missing'\n\(in pass 'crashes' of test; "
                                        r"passes run before it: none\).*report it") as info:
        PassRunner("test")(crashes, _graph())
    assert isinstance(info.value, DjpqError) and isinstance(info.value.__cause__, KeyError)


def test_graph_is_linted_after_each_pass() -> None:
    with pytest.raises(PassError, match=r"(?s)does not lint: Argument 'x' of Node 'neg'.*"
                                        r"\(in pass 'unlinted' of test"):
        PassRunner("test")(unlinted, _graph())


def test_targets_must_exist_after_each_pass() -> None:
    with pytest.raises(PassError, match=r"no_such_module.*\n\(in pass 'breaks_the_graph'"):
        PassRunner("test")(breaks_the_graph, _graph())


def test_graph_is_recompiled_after_each_pass() -> None:
    gm = _graph()
    PassRunner("test")(appends_relu, gm)
    assert "torch.relu" in gm.code
    with torch.no_grad():
        assert bool((gm(X) >= 0).all())


def test_a_pass_must_return_a_graph_module() -> None:
    with pytest.raises(PassError, match="returned int, not a PassResult"):
        PassRunner("test")(lambda gm: 3, _graph())  # type: ignore[arg-type,return-value]


def test_a_final_check_names_itself_and_the_history() -> None:
    p = djpq.prepare(T.Residual().eval(), X)  # still has its gates and quantizers
    run = PassRunner("convert")
    run(first, p)
    with pytest.raises(PassError, match=r"(?s)still calls a training module "
                                        r"\((VIBGate|DQQuantizer)\)\n"
                                        r"\(in pass 'check_no_training_modules' of convert; "
                                        r"passes run before it: first\)"):
        run.check(check_no_training_modules, p)
    for integer in (True, False):  # what convert returns passes it
        check_no_training_modules(djpq.convert(p, integer=integer))


def test_convert_names_the_failing_pass_and_what_ran_before() -> None:
    p = djpq.prepare(T.Residual().eval(), X, DJPQConfig(weight=QuantSpec(bits=8,
                                                                          per_channel=True)))
    with pytest.raises(QuantizationError, match=r"per-channel.*\n\(in pass "
                                                r"'strip_weight_quantizers' of convert; passes "
                                                r"run before it: fold_gates\)"):
        djpq.convert(p)


def test_prepare_records_are_one_typed_record() -> None:
    p = djpq.prepare(T.Residual().eval(), X)
    record = prepared_record(p)
    assert [k for k in p.meta if k.startswith("djpq.")] == ["djpq.prepared"]
    assert set(record.gates) == {g.id for g in record.groups if g.prunable}
    assert record.capture.how == "torch.fx.symbolic_trace"
    assert [layer.node for layer in record.layers] == ["stem", "conv1", "conv2", "fc"]
    assert set(record.quantizers.weight) == {"stem", "conv1", "conv2", "fc"}
