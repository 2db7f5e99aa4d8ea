"""The properties every generated network must satisfy (shared by tests and the long fuzz run).

Each ``check_*`` function builds the network of a :class:`~djpq_compiler.testing.graphs.Recipe`,
runs one part of the compiler on it and raises :class:`PropertyViolation` (an
``AssertionError``) naming the recipe when a property does not hold.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from djpq_compiler.analysis import analyze
from djpq_compiler.bops import bops
from djpq_compiler.config import DJPQConfig, QuantSpec
from djpq_compiler.convert import convert
from djpq_compiler.modules.quantizers import levels
from djpq_compiler.passes.capture import capture
from djpq_compiler.passes.sign_analysis import nonnegative_nodes
from djpq_compiler.prepare import prepare
from djpq_compiler.prepared import (
    freeze_for_deployment,
    gates,
    open_gates,
    quantizers,
    set_gates_deterministic,
    set_quantizers,
)
from djpq_compiler.records import converted_record
from djpq_compiler.testing.graphs import Recipe, build, example_input
from djpq_compiler.verify import integer_agreement, pruning_oracle

__all__ = ["PropertyViolation", "OracleStats", "ConvertStats", "TvmStats", "check_analysis",
           "check_prepare", "check_convert", "check_signs", "check_tvm", "NO_RULE_TARGETS",
           "ORACLE_TOLERANCE", "CONVERT_TOLERANCE", "INTEGER_LSB_BOUND", "TVM_TARGETS",
           "WINOGRAD4_TARGET", "WINOGRAD_TARGET", "WINOGRAD_TARGETS", "winograd_everywhere"]

#: Targets of the generator's ops that have no channel rule (they must be barriers).
NO_RULE_TARGETS: tuple[object, ...] = (torch.cumsum, torch.flip, "roll")
ORACLE_TOLERANCE = 1e-4
#: ``convert(p, integer=False)`` vs ``p`` (eval, quantizers off, hard gates): max abs error
#: relative to the output's max, the bound ``tests/test_convert.py`` asserts on small models.
CONVERT_TOLERANCE = 1e-5
#: Integer reference vs fake-quant, per activation quantizer, each op fed the fake-quant codes
#: (DESIGN invariant 4, ``verify.integer_agreement``).
INTEGER_LSB_BOUND = 1


class PropertyViolation(AssertionError):
    """A generated network broke a property; the message starts with the recipe."""


@dataclass(frozen=True)
class OracleStats:
    """What one :func:`check_analysis` run saw."""

    groups: int
    prunable: int
    missing: int
    rel_err: float
    params_before: int
    params_after: int


def _fail(recipe: Recipe, what: str) -> PropertyViolation:
    return PropertyViolation(f"{recipe!r}\n  {what}")


def check_analysis(recipe: Recipe, seed: int | None = None) -> OracleStats:
    """``analyze`` works (strict=False), the pruning oracle is exact, parameters never grow and
    every group touching an op with no rule is not prunable.

    ``seed`` picks the kept channels (default: ``recipe.seed``, so a failure replays exactly).
    """
    seed = recipe.seed if seed is None else seed
    model, x = build(recipe), example_input(recipe)
    report = analyze(model, x)
    gm = report.graph_module
    no_rule = {n.name for n in gm.graph.nodes
               if n.op in ("call_function", "call_method") and n.target in NO_RULE_TARGETS}
    if not no_rule <= set(report.missing):
        raise _fail(recipe, f"ops with no rule {sorted(no_rule - set(report.missing))} were "
                            f"not reported missing: {report.missing}")
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in report.missing:
        touched = {a.name for a in nodes[name].all_input_nodes} | {name}
        for g in report.prunable_groups:
            if g.nodes & touched:
                raise _fail(recipe, f"group {g.id} touches {name} (no rule) but is prunable")
    _, err, n0, n1 = pruning_oracle(model, x, seed)
    if not err < ORACLE_TOLERANCE:
        raise _fail(recipe, f"masked vs pruned relative error {err:.3g} (seed {seed})\n"
                            f"{report.summary()}")
    if n1 > n0:
        raise _fail(recipe, f"pruning grew the parameter count {n0} -> {n1}")
    return OracleStats(len(report.groups), len(report.prunable_groups), len(report.missing),
                       err, n0, n1)


def _sign_inputs(x: torch.Tensor) -> list[torch.Tensor]:
    """The example input, its negation scaled up and a fresh draw: values of both signs."""
    gen = torch.Generator().manual_seed(12345)
    return [x, -3.0 * x, torch.randn(x.shape, generator=gen)]


def check_signs(recipe: Recipe) -> int:
    """Every node the sign analysis proves non-negative (an unsigned activation quantizer there)
    is ``>= 0`` on the example input, on ``-3x`` and on a fresh random input.

    Returns:
        How many nodes the analysis proved non-negative.
    """
    model, x = build(recipe), example_input(recipe)
    gm = capture(model, x).graph_module
    claimed = nonnegative_nodes(gm)
    values: dict[str, float] = {}

    class _Min(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            if n.name in claimed:
                flat = out if isinstance(out, (tuple, list)) else (out,)
                mins = [float(t.min()) for t in flat if isinstance(t, torch.Tensor) and t.numel()]
                values[n.name] = min([values.get(n.name, math.inf), *mins])
            return out

    with torch.no_grad():
        for inp in _sign_inputs(x):
            _Min(gm).run(inp)
    negative = {k: v for k, v in values.items() if v < 0}
    if negative:
        nodes = {n.name: n.format_node() for n in gm.graph.nodes if n.name in negative}
        raise _fail(recipe, f"proven non-negative but negative on data (min): {negative}\n  "
                            + "\n  ".join(nodes.values()))
    return len(claimed)


def _rows(report: object) -> list[tuple[object, ...]]:
    return [(r.name, r.in_kept, r.out_kept, r.b_w, r.b_a, r.bops)
            for r in report.rows]  # type: ignore[attr-defined]


def check_prepare(recipe: Recipe) -> None:
    """``prepare`` with quantizers off and gates exactly open equals the model, and
    ``bops(prepared)`` (8-bit default, network input at ``input_bits=8``) equals
    ``bops(model, weight_bits=8, act_bits=8)`` row by row."""
    model, x = build(recipe), example_input(recipe)
    torch.manual_seed(0)
    gm = prepare(model, x).eval()
    rows, expected = _rows(bops(gm)), _rows(bops(model, x, weight_bits=8, act_bits=8))
    if rows != expected:
        diff = [(a, b) for a, b in zip(rows, expected, strict=False) if a != b]
        raise _fail(recipe, f"bops(prepared) != bops(model, 8, 8): {diff[:3]}")
    set_quantizers(gm, enabled=False)
    open_gates(gm)
    with torch.no_grad():
        got, want = gm(x), model(x)
    if not torch.equal(got, want):
        err = (got - want).abs().max().item()
        raise _fail(recipe, f"prepared (quantizers off, gates open) differs by {err:.3g}")


@dataclass(frozen=True)
class ConvertStats:
    """What one :func:`check_convert` run saw."""

    float_err: float
    max_lsb: int
    quantizers: int
    float_ops: int
    bops_ratio: float
    coarse_bias: int  # quantizers held to a bound above 1 LSB (coarse integer bias)


def random_state(recipe: Recipe) -> tuple[DJPQConfig, np.random.Generator]:
    """The seeded config of :func:`check_convert`: global weight/activation bits drawn from
    ``recipe.seed`` (the generator it returns then draws gate and quantizer states)."""
    rng = np.random.default_rng(recipe.seed)
    w_bits, a_bits = (int(rng.choice((3, 4, 6, 8))) for _ in range(2))
    return DJPQConfig(weight=QuantSpec(bits=w_bits), activation=QuantSpec(bits=a_bits)), rng


#: Below this calibrated range an activation quantizer saw only zeros (``MIN_RANGE``); see
#: :func:`_randomize`.
DEGENERATE_RANGE = 1e-6


@torch.no_grad()
def _randomize(gm: torch.fx.GraphModule, rng: np.random.Generator) -> None:
    """A trained-looking state: every gate prunes ~0-70 % of its atoms with ``mu`` jittered in
    ±[0.5, 1.5] (one gate in ten closes entirely, then ``convert`` keeps the strongest atom of the
    group and of every concat branch / split piece); each learnable quantizer gets a clip range
    scaled by [0.6, 1.2] and continuous bits in [2, 8]. Then :func:`freeze_for_deployment`: the
    hard gates are the deployed mask, the quantizers their read-out grid.

    An activation quantizer that calibrated on all-zero input (a dead ReLU channel in a
    one-channel tensor) gets a unit range: at ``q_max = 1e-8`` the next layer's bias does not fit
    int32 and ``convert`` refuses it with a ``QuantizationError`` (a documented limitation,
    ``tests/test_fuzz.py::test_dead_activation_range_is_refused_with_a_clear_error``).
    """
    for _, gate in gates(gm):
        n = gate.n_atoms
        mu = torch.from_numpy(rng.uniform(0.5, 1.5, n) * rng.choice((-1.0, 1.0), n, p=(0.2, 0.8)))
        mu[torch.from_numpy(rng.random(n) < rng.uniform(0.0, 0.7))] = 1e-3  # pruned atoms
        if rng.random() < 0.1:
            mu[:] = 1e-3 * mu.sign()
        gate.mu.copy_(mu.to(gate.mu.dtype))
    for _, q in quantizers(gm):
        if float(q.q_max().max()) < DEGENERATE_RANGE:
            q.log_q_max.fill_(0.0)
            if q.log_d is not None:
                q.log_d.fill_(-math.log(float(levels(q.init_bits, q.signed))))
        q.log_q_max.add_(math.log(rng.uniform(0.6, 1.2)))
        if q.log_d is not None and rng.random() < 0.5:
            bits = rng.uniform(2.0, 8.0)
            q.log_d.copy_(torch.log(q.q_grid() / float(levels(bits, q.signed))))
    freeze_for_deployment(gm)


def _bops_mismatch(prepared: torch.fx.GraphModule, converted: torch.fx.GraphModule
                   ) -> list[tuple[object, ...]]:
    """Rows where ``bops(converted)`` disagrees with ``bops(prepared)``: channel counts must be
    equal everywhere, bits where the layer was lowered to integers (float layers count 32x32)."""
    record = converted_record(converted)
    lowered = {rec.name for rec in record.layers if rec.node in record.lowered_layers}
    bad: list[tuple[object, ...]] = []
    for a, b in zip(bops(prepared).rows, bops(converted).rows, strict=True):
        bits = (a.b_w, a.b_a) if a.name in lowered else (32, 32)
        if (a.name, a.in_kept, a.out_kept, *bits) != (b.name, b.in_kept, b.out_kept, b.b_w,
                                                       b.b_a):
            bad.append((a, b))
    return bad


def _prepared(recipe: Recipe) -> tuple[torch.nn.Module, torch.fx.GraphModule, torch.Tensor,
                                         DJPQConfig]:
    """The recipe's model, prepared (eval) with seeded random gates and bit-widths, its input and
    config: what :func:`check_convert` and :func:`check_tvm` convert."""
    model, x = build(recipe), example_input(recipe)
    config, rng = random_state(recipe)
    torch.manual_seed(recipe.seed)
    p = prepare(model, x, config).eval()
    _randomize(p, rng)
    return model, p, x, config


def check_convert(recipe: Recipe) -> ConvertStats:
    """prepare -> seeded random gate states and bit-widths -> convert, float and integer.

    * ``convert(p, integer=False)`` equals ``p`` in eval with quantizers off and hard gates to
      :data:`CONVERT_TOLERANCE` (DESIGN invariant 1);
    * ``convert(p)`` (integer) agrees with the fake-quant model at every activation quantizer
      within :data:`INTEGER_LSB_BOUND` (invariant 4; ops with no integer lowering stay float),
      except after a layer whose integer bias is coarser than its output step: there within
      the larger bound ``convert`` warned about and recorded in
      ``converted_record(c).agreement_bounds``;
    * ``bops(convert(p))`` equals ``bops(p)`` row by row (32x32 for layers left in float), and
      their totals are equal when nothing stayed float (invariant 5);
    * ``p`` itself is unchanged by both conversions.
    """
    model, p, x, config = _prepared(recipe)
    with torch.no_grad():
        before = p(x)
    ref = copy.deepcopy(p)
    set_quantizers(ref, False)
    set_gates_deterministic(ref, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. an observer seeing constant inputs
        converted_float = convert(p, integer=False)
        converted = convert(p)
    with torch.no_grad():
        want, got = ref(x), converted_float(x)
        after = p(x)
    err = float((want - got).abs().max() / (want.abs().max() + 1e-12))
    if not err < CONVERT_TOLERANCE:
        raise _fail(recipe, f"convert(integer=False) vs hard-gated float model: relative error "
                            f"{err:.3g} ({config.weight.bits}/{config.activation.bits} bits)")
    if not torch.equal(before, after):
        raise _fail(recipe, "convert() modified the prepared model")
    lsb = integer_agreement(p, converted, x)
    coarse = converted_record(converted).agreement_bounds
    over = {q: (v, coarse.get(q, INTEGER_LSB_BOUND)) for q, v in lsb.items()
            if v > coarse.get(q, INTEGER_LSB_BOUND)}
    if over:
        raise _fail(recipe, f"integer model vs fake-quant beyond the bound (LSB, bound): {over}"
                            f"\n  float ops: {converted_record(converted).float_ops}")
    bad = _bops_mismatch(p, converted)
    if bad:
        raise _fail(recipe, f"bops(converted) != bops(prepared): {bad[:2]}")
    float_ops = converted_record(converted).float_ops
    total_p, total_c = bops(p).total, bops(converted).total
    if not float_ops and total_p != total_c:
        raise _fail(recipe, f"all-integer model but bops total {total_c} != prepared {total_p}")
    return ConvertStats(err, max(lsb.values(), default=0), len(lsb), len(float_ops),
                        total_c / max(bops(model, x).total, 1), len(coarse))


#: The TVM targets :func:`check_tvm` builds for: this CPU's kernels, and the AVX2 kernels of the
#: issue's 2-core EPYC class of machine (``mcpu=haswell``; skipped on a CPU without AVX2).
TVM_TARGETS = ("x86", "x86-avx2")
#: Further :func:`check_tvm` targets: the ``x86-avx2`` build with a Winograd kernel taken by
#: every 3x3 stride-1 dense layer where it is exact (:func:`winograd_everywhere`): F(2x2, 3x3)
#: (``avx2_wino_s16``) and F(4x4, 3x3) (``avx2_wino4_s16``). The fuzzer's graphs have 1-8
#: channels, below the speed rules' minimums, so neither would run there otherwise.
WINOGRAD_TARGET = "x86-avx2-winograd"
WINOGRAD4_TARGET = "x86-avx2-winograd4"


@contextlib.contextmanager
def winograd_everywhere(tiles: int = 2) -> Iterator[None]:
    """Builds inside give the Winograd kernel of ``tiles`` x ``tiles`` output tiles (2:
    ``avx2_wino_s16``, 4: ``avx2_wino4_s16``) to every AVX2 dense 3x3 stride-1 conv where its
    bounds hold, whatever its channels, output size or bits (``select.winograd``'s speed rules
    lifted, the other scheme's turned off; the exactness rules kept)."""
    from unittest import mock

    from djpq_compiler.backends.tvm.kernels import select

    def lanes(choice: Any, *_: Any) -> bool:
        return choice.kind in ("ubsw", "wd")

    def never(*_: Any) -> bool:
        return False

    with (mock.patch.object(select, "WINOGRAD_MIN_IN", 1),
          mock.patch.object(select, "WINOGRAD_MIN_OUT", 1),
          mock.patch.object(select, "_winograd_replaces", lanes if tiles == 2 else never),
          mock.patch.object(select, "_winograd4_replaces", lanes if tiles == 4 else never)):
        yield


#: Each Winograd target's output tile (:func:`winograd_everywhere`).
WINOGRAD_TARGETS = {WINOGRAD_TARGET: 2, WINOGRAD4_TARGET: 4}


@dataclass(frozen=True)
class TvmStats:
    """What one :func:`check_tvm` run saw: per target the stage's status (``ok``, or
    ``refused`` with a clear :class:`~djpq_compiler.errors.DjpqError`), and the kernels built."""

    outcomes: tuple[tuple[str, str], ...]
    variants: tuple[str, ...]
    tables: int
    float_ops: int
    #: The ops of the nodes TVM has no converter for (where a build was refused).
    unsupported: tuple[str, ...] = ()
    #: Each refusal's message (``backend_zoo``: its first line and the first node it names).
    refusals: tuple[str, ...] = ()


def check_tvm(recipe: Recipe, targets: tuple[str, ...] = TVM_TARGETS) -> TvmStats:
    """prepare -> seeded random state -> ``convert`` (as :func:`check_convert`) -> TVM build for
    each of ``targets`` -> the compiled model equals the reference executor (integer outputs bit
    for bit, a float output within float32 rounding; with float islands, the teacher-forced
    per-op check: every integer op bit-exact, every island within 1 LSB), on two inputs
    (``testing.backend_zoo.check_tvm``, the zoo gate's stage).

    A build refused with a :class:`~djpq_compiler.errors.DjpqError` is allowed (recorded);
    a mismatch or any other exception is a :class:`PropertyViolation`.
    """
    from djpq_compiler.backends.tvm.build import PORTABLE_X86, host_has_features
    from djpq_compiler.testing.backend_zoo import check_tvm_build

    _, p, x, _ = _prepared(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(p)
    outcomes: list[tuple[str, str]] = []
    refusals: list[str] = []
    variants: list[str] = []
    tables = 0
    for target in targets:
        build_target = "x86-avx2" if target in WINOGRAD_TARGETS else target
        if build_target in PORTABLE_X86 and not host_has_features(PORTABLE_X86[build_target][1]):
            continue
        lifted = (winograd_everywhere(WINOGRAD_TARGETS[target]) if target in WINOGRAD_TARGETS
                  else contextlib.nullcontext())
        with warnings.catch_warnings(), lifted:
            warnings.simplefilter("ignore")
            outcome, compiled = check_tvm_build(converted, x, build_target)
        if outcome.status not in ("ok", "refused"):
            raise _fail(recipe, f"TVM {target}: {outcome.status}: {outcome.detail}")
        outcomes.append((target, outcome.status))
        if outcome.status == "refused":
            refusals.append(outcome.detail)
        else:  # the kernels of the last target built
            variants = sorted({k.variant for k in compiled.kernels})
            tables = sum(r.table for r in compiled.eltwise)
    unsupported: tuple[str, ...] = ()
    if any(status == "refused" for _, status in outcomes):
        from djpq_compiler.backends.tvm.emit import unsupported_nodes

        unsupported = tuple(sorted({str(getattr(n.target, "__name__", n.target))
                                    for n, _ in unsupported_nodes(converted)}))
    return TvmStats(tuple(outcomes), tuple(variants), tables,
                    len(converted_record(converted).float_ops), unsupported,
                    tuple(dict.fromkeys(refusals)))
