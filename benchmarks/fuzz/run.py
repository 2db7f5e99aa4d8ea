"""Long fuzzing run: random architectures through analyze / prune oracle / prepare / convert
(and, with ``--tvm``, the TVM builds for this CPU and for AVX2, against the reference).

Runs the properties of ``djpq_compiler.testing.properties`` on ``--examples`` random recipes
(hypothesis, one CPU thread) and writes a summary to ``--out``. On the first failure hypothesis
shrinks it to a minimal recipe, which is printed and recorded. TVM builds refused with a clear
error are counted with their reasons (not failures); a mismatch or a crash is a failure.

Usage: python benchmarks/fuzz/run.py --examples 2000 [--seed 0] [--minutes 30] [--tvm]
       [--tvm-targets x86 x86-avx2 cuda-emulated x86-avx2-winograd x86-avx2-winograd4]
       [--out benchmarks/fuzz/RESULTS.md]
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

from djpq_compiler.testing import (
    Recipe,
    check_analysis,
    check_convert,
    check_prepare,
    check_signs,
    check_tvm,
    recipes,
)
from djpq_compiler.testing.properties import TVM_TARGETS


class TimeUp(BaseException):
    """Raised inside the property when the time budget is spent; a BaseException, so hypothesis
    stops at once instead of treating it as a failure to shrink."""


class Tally:
    """Counts of what the run covered."""

    def __init__(self) -> None:
        self.examples = 0
        self.groups = 0
        self.prunable = 0
        self.missing = 0
        self.max_err = 0.0
        self.blocks: collections.Counter[str] = collections.Counter()
        self.heads: collections.Counter[str] = collections.Counter()
        self.quantizers = 0
        self.float_ops = 0
        self.coarse_bias = 0
        self.max_float_err = 0.0
        self.lsb: collections.Counter[int] = collections.Counter()
        self.nonneg = 0
        self.tvm: collections.Counter[str] = collections.Counter()
        self.variants: collections.Counter[str] = collections.Counter()
        self.tables = 0
        self.unsupported: collections.Counter[str] = collections.Counter()
        self.refusals: collections.Counter[str] = collections.Counter()

    def add_tvm(self, stats: object) -> None:
        for target, status in stats.outcomes:  # type: ignore[attr-defined]
            self.tvm[f"{target} {status}"] += 1
        self.variants.update(stats.variants)  # type: ignore[attr-defined]
        self.tables += stats.tables  # type: ignore[attr-defined]
        self.unsupported.update(stats.unsupported)  # type: ignore[attr-defined]
        self.refusals.update(stats.refusals)  # type: ignore[attr-defined]

    def add(self, recipe: Recipe, stats: object, conv: object) -> None:
        self.examples += 1
        self.groups += stats.groups  # type: ignore[attr-defined]
        self.prunable += stats.prunable  # type: ignore[attr-defined]
        self.missing += stats.missing  # type: ignore[attr-defined]
        self.max_err = max(self.max_err, stats.rel_err)  # type: ignore[attr-defined]
        self.blocks.update(type(b).__name__ for b in recipe.blocks)
        self.heads[recipe.head] += 1
        self.quantizers += conv.quantizers  # type: ignore[attr-defined]
        self.float_ops += conv.float_ops  # type: ignore[attr-defined]
        self.coarse_bias += conv.coarse_bias  # type: ignore[attr-defined]
        self.max_float_err = max(self.max_float_err, conv.float_err)  # type: ignore[attr-defined]
        self.lsb[conv.max_lsb] += 1  # type: ignore[attr-defined]


def run(examples: int, seed: int, max_blocks: int, minutes: float | None = None,
        tvm: bool = False,
        tvm_targets: tuple[str, ...] = TVM_TARGETS) -> tuple[Tally, str | None, float]:
    """Check up to ``examples`` recipes (stopping cleanly after ``minutes``)."""
    tally = Tally()
    start = time.perf_counter()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(recipes(max_blocks=max_blocks))
    def prop(recipe: Recipe) -> None:
        if minutes is not None and time.perf_counter() - start > 60 * minutes:
            raise TimeUp
        stats = check_analysis(recipe, seed=recipe.seed)  # a function of the recipe: replayable
        check_prepare(recipe)
        tally.nonneg += check_signs(recipe)
        tally.add(recipe, stats, check_convert(recipe))
        if tvm:
            tally.add_tvm(check_tvm(recipe, tvm_targets))
        if tally.examples % 100 == 0:
            print(f"{tally.examples} examples, {time.perf_counter() - start:.0f} s", flush=True)

    failure = None
    try:
        prop()
    except TimeUp:
        print(f"time budget of {minutes} min spent", flush=True)
    except Exception as exc:  # the shrunk failure: record it
        failure = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return tally, failure, time.perf_counter() - start


def report(tally: Tally, failure: str | None, seconds: float, args: argparse.Namespace) -> str:
    status = "no property violated" if failure is None else "FAILURE (minimal recipe below)"
    targets = ("" if list(args.tvm_targets) == list(TVM_TARGETS)
               else " --tvm-targets " + " ".join(args.tvm_targets))
    lines = [
        f"## Run: {args.examples} requested examples (time budget {args.minutes} min), "
        f"seed {args.seed}, max {args.max_blocks} blocks",
        "",
        f"* command: `python benchmarks/fuzz/run.py --examples {args.examples} --seed {args.seed}"
        f" --max-blocks {args.max_blocks} --minutes {args.minutes}{' --tvm' * args.tvm}"
        f"{targets}` "
        f"(torch {torch.__version__}, "
        f"1 thread, {platform.machine()}, shared 2-core machine)",
        f"* passing examples: {tally.examples} in {seconds:.0f} s; result: **{status}**",
        f"* channel groups analysed: {tally.groups} ({tally.prunable} prunable); ops with no "
        f"rule reported: {tally.missing}; worst pruning-oracle relative error: "
        f"{tally.max_err:.2e}",
        f"* convert: worst float relative error {tally.max_float_err:.2e}; activation "
        f"quantizers compared {tally.quantizers}; examples by worst integer-vs-fake-quant LSB "
        f"{dict(sorted(tally.lsb.items()))}; quantizers with a warned coarse-bias bound > 1 LSB: "
        f"{tally.coarse_bias}; ops left in float: {tally.float_ops}",
        f"* sign analysis: {tally.nonneg} nodes proven non-negative, each checked >= 0 on three "
        f"inputs",
        f"* blocks generated: {dict(sorted(tally.blocks.items()))}",
        f"* heads: {dict(sorted(tally.heads.items()))}",
    ]
    if args.tvm:
        lines.append(f"* TVM (`check_tvm`: the builds for {', '.join(args.tvm_targets)}, each "
                     f"equal to the reference): outcomes {dict(sorted(tally.tvm.items()))}; "
                     f"kernel variants (the last target's build) "
                     f"{dict(sorted(tally.variants.items()))}; lane-wise chains as "
                     f"tables: {tally.tables}; ops of refused builds (examples): "
                     f"{dict(sorted(tally.unsupported.items()))}; refusal messages "
                     f"(examples): {dict(tally.refusals.most_common(8))}")
    if failure is not None:
        lines += ["", "```", failure, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-blocks", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop cleanly (and report) after this many minutes")
    parser.add_argument("--out", type=Path, default=None, help="append the summary to this file")
    parser.add_argument("--tvm", action="store_true",
                        help="also build every example with TVM (this CPU, AVX2) and compare")
    parser.add_argument("--tvm-targets", nargs="+", default=list(TVM_TARGETS),
                        help="the TVM targets --tvm builds (default: %(default)s; "
                             "cuda-emulated: the CUDA build's computation on this CPU; "
                             "x86-avx2-winograd / x86-avx2-winograd4: the AVX2 build with the "
                             "Winograd F(2x2, 3x3) / F(4x4, 3x3) kernel on every 3x3 stride-1 "
                             "dense layer where it is exact)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tally, failure, seconds = run(args.examples, args.seed, args.max_blocks, args.minutes,
                                  args.tvm, tuple(args.tvm_targets))
    text = report(tally, failure, seconds, args)
    print(text)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n" + text)
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
