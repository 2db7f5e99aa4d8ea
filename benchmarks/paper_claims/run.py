"""The paper-claims benchmark: DJPQ against its baselines at equal training budgets.

For each model and each gamma, every method fine-tunes the same committed FP32 checkpoint for the
same number of optimizer steps (``benchmarks/djpq_finetune/run.py`` does one run: DJPQ, DJPQ
bit-restricted, two-stage VIB-then-DQ, two-stage restricted, DQ-only, VIB-only, fixed W8A8 and
W4A4, and DJPQ with REFERENCE's alternative soft-BOPs regulariser) and is scored on the
*integer* converted model: top-1 on the Fashion-MNIST test set and GBOPs. ``fp32_finetune``
(run here) trains the float checkpoint with the same recipe (same optimizer, weight lr, schedule,
steps, batches; no regulariser, nothing quantized) and is scored as a float model: the drop of
every method is measured against the *stronger* FP32 of a section, the checkpoint or its
same-recipe fine-tune, so that extra training of the weights is not counted as compression
quality. Every run appends
one JSON line to ``--results``; ``--summarize`` (also run at the end) turns that file into
``RESULTS.md`` (one table per model; the accuracy-vs-GBOPs comparison of DJPQ and two-stage at
equal BOPs, plain and power-of-two restricted; several seeds of one point are averaged) and
``accuracy_vs_gbops.png``.

Usage (defaults: 700 steps, DJPQ lr 0.03, weight lr 1e-3, cosine rates; NOTES.md lists the
commands behind every committed row):
  python benchmarks/paper_claims/run.py --models resnet20 mobilenetv2 --gammas 6 10 \\
      --methods djpq two_stage dq_only --threads 1
  python benchmarks/paper_claims/run.py --summarize            # tables and plot only
``djpq_dw_w4`` is DJPQ with a read-out floor of 4 weight bits on depthwise convs (issue 18, item 4);
``djpq_dw_w4_bound`` holds that floor during training too (``QuantSpec.bind_min_bits``);
``djpq_dw_gamma3`` / ``djpq_dw_gamma05`` weigh the depthwise convs' terms of the regulariser 3x /
0.5x (``Override.gamma_scale``: per-group regularisation strength).
``djpq_a3_bound`` holds every learned activation quantizer at >= 3 bits during training.
``djpq_kd`` is DJPQ whose task loss distils the FP32 checkpoint (weight 0.7, temperature 2; a lever
of issue 18, not the paper's method; the section's FP32 bar stays the undistilled fine-tune);
``djpq_a3_kd`` combines that distillation with ``djpq_a3_bound``'s activation floor,
``djpq_restricted_kd`` with ``djpq_restricted``'s power-of-two bits.
``--finalize F`` (default 0.1) is the fraction of the steps trained at the end with gates and bits
frozen at their deployed values (weights only); with cosine rates the last 10 % run at under 2.5 %
of the initial learning rate, so a larger fraction gives the weights a real fine-tune at the
deployed bits (issue 18, item 4's "longer finalization"). It is part of a run's identity and of
its section; ``fp32_finetune`` has no finalization phase, so one FP32 fine-tune row serves as the
reference of every finalize variant of its recipe.
``--state-dir DIR`` saves each run's training state there every 200 steps
(``FinetuneConfig.state_file``, a file named by the run's identity): a run stopped part way
resumes from it when the same command is given again, to the row it would have recorded
uninterrupted; the file is deleted once the row is written (a resumed row's ``train_seconds`` and
``wall_seconds`` count its last process only).
Fixed-bit methods (w8a8, w4a4) and fp32_finetune learn nothing that depends on gamma and run once
per model, at the first gamma. ``--seed`` is part of a run's identity: another seed of a
measured point runs again.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METHODS = ("djpq", "djpq_restricted", "two_stage", "two_stage_restricted", "dq_only",
           "vib_only", "w8a8", "w4a4", "djpq_soft_bops", "djpq_dw_w4", "djpq_dw_w4_bound",
           "djpq_dw_gamma3", "djpq_dw_gamma05", "djpq_a3_bound", "djpq_kd", "djpq_a3_kd",
           "djpq_restricted_kd",
           "fp32_finetune", "fp32_finetune_kd")
ONCE = ("w8a8", "w4a4", "fp32_finetune", "fp32_finetune_kd")  # no learned quantity depends on gamma
#: The same-recipe FP32 baseline: a float model, scored with float accuracy at FP32 BOPs.
FP32_FINETUNE = "fp32_finetune"
#: The same-recipe FP32 fine-tune distilling the checkpoint (self-distillation, weight and
#: temperature of ``djpq_kd``): the float bar of the distilled recipe. A section's stronger FP32
#: is the highest of the checkpoint and every float fine-tune in it.
FP32_FINETUNE_KD = "fp32_finetune_kd"
FLOAT_METHODS = (FP32_FINETUNE, FP32_FINETUNE_KD)
#: Same-budget baselines every section should have (the verdict names the missing ones).
BASELINES = ("fp32_finetune", "w8a8", "w4a4")
#: The FP32 checkpoint of rows from before the checkpoint was recorded: every such row used the
#: files committed on 2026-11-30 (unchanged until issue 18), whose SHA-256 starts like this.
LEGACY_CHECKPOINTS = {"resnet20": "1d9f49e27708", "mobilenetv2": "f5c9629120e5",
                      "vgg7": "3612f05c3b3b", "inception": "e90a5bb8558a"}
#: DJPQ variants tried as levers toward 200x (issue 18), each with its own verdict line.
LEVERS = {
    "djpq_kd": "DJPQ with distillation from the FP32 checkpoint (djpq_kd, not the paper's method)",
    "djpq_dw_w4": "DJPQ with a read-out floor of 4 weight bits on depthwise convs (djpq_dw_w4)",
    "djpq_dw_w4_bound": ("DJPQ with a 4-weight-bit floor on depthwise convs held in training "
                         "(djpq_dw_w4_bound)"),
    "djpq_dw_gamma3": "DJPQ with the depthwise convs' regulariser terms ×3 (djpq_dw_gamma3)",
    "djpq_dw_gamma05": "DJPQ with the depthwise convs' regulariser terms ×0.5 (djpq_dw_gamma05)",
    "djpq_a3_bound": "DJPQ with a 3-bit activation floor held in training (djpq_a3_bound)",
    "djpq_a3_kd": ("DJPQ with the 3-bit activation floor and distillation from the FP32 "
                   "checkpoint (djpq_a3_kd, not the paper's method)"),
    "djpq_restricted_kd": ("DJPQ with power-of-two bits and distillation from the FP32 "
                           "checkpoint (djpq_restricted_kd, not the paper's method)"),
}
#: ``--finalize`` of rows from before the option existed (the single-run script's default).
DEFAULT_FINALIZE = 0.1
#: The plot's y axis stops this many points below FP32; runs below it are drawn on the floor (v).
FLOOR_POINTS = 12.0


def _single_run_module() -> Any:
    """``benchmarks/djpq_finetune/run.py`` (a script folder, not a package)."""
    path = HERE.parent / "djpq_finetune" / "run.py"
    spec = importlib.util.spec_from_file_location("djpq_finetune_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finalize(r: dict[str, Any]) -> float:
    """The finalization fraction a row's section is filed under: the row's own, except for
    ``fp32_finetune`` (no gates or bits to freeze, recorded as 0), filed under the default."""
    if r["method"] in FLOAT_METHODS:
        return DEFAULT_FINALIZE
    return float(r.get("finalize", DEFAULT_FINALIZE))


def _recipe(r: dict[str, Any]) -> tuple[int | None, float, float, str, float]:
    """The training recipe of a run: steps, weight lr, DJPQ lr, schedule, finalize fraction (runs
    from before the weight lr and schedule were recorded used 2e-4 and constant rates)."""
    return (r.get("steps"), float(r.get("weight_lr", 2e-4)), float(r["djpq_lr"]),
            r.get("schedule", "constant"), _finalize(r))


def _recipe_text(recipe: tuple[int | None, float, float, str, float]) -> str:
    steps, weight_lr, djpq_lr, schedule, finalize = recipe
    text = f"{steps} steps, weight lr {weight_lr:g}, DJPQ lr {djpq_lr:g}, {schedule} rates"
    if finalize != DEFAULT_FINALIZE:
        text += f", last {finalize:g} of the steps at frozen gates and bits"
    return text


#: A section of the tables: model, checkpoint id, recipe.
Section = tuple[str, str | None, tuple[Any, ...]]


def _section_order(kv: tuple[Section, Any]) -> tuple[Any, ...]:
    """Sections by model, then by recipe with the step budget compared as a number, then by
    checkpoint."""
    (model, checkpoint, (steps, weight_lr, djpq_lr, schedule, finalize)), _ = kv
    return (model, steps if steps is not None else -1, weight_lr, djpq_lr, schedule,
            checkpoint or "", finalize)


def checkpoint_id(model: str) -> str:
    """The first 12 hex digits of the SHA-256 of ``model``'s committed FP32 checkpoint file."""
    from djpq_compiler.workflows import zoo

    return hashlib.sha256(zoo.checkpoint_path(model).read_bytes()).hexdigest()[:12]


def _checkpoint(r: dict[str, Any]) -> str | None:
    """The checkpoint a row fine-tuned (rows from before it was recorded: the legacy files)."""
    return r.get("checkpoint") or LEGACY_CHECKPOINTS.get(r["model"])


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a run (results from before seeds were recorded used seed 0): a new FP32
    checkpoint makes every run new."""
    return (r["model"], r["method"], float(r["gamma"]), r.get("test_images"),
            int(r.get("seed", 0))) + _recipe(r) + (_checkpoint(r),)


def _done(results: Path) -> set[tuple[Any, ...]]:
    if not results.exists():
        return set()
    return {_key(json.loads(line)) for line in results.read_text().splitlines()}


def state_path(state_dir: Path, planned: dict[str, Any]) -> str:
    """The training-state file of one run (``--state-dir``): named by the run's identity
    (:func:`_key`), so that only the same run resumes from it."""
    digest = hashlib.sha256(repr(_key(planned)).encode()).hexdigest()[:12]
    return str(state_dir / (f"{planned['model']}-{planned['method']}-g{planned['gamma']:g}-"
                            f"s{planned['seed']}-{planned['steps']}-{digest}.pt"))


def run_all(args: argparse.Namespace) -> None:
    """Run every (model, method, gamma) not yet in ``args.results`` (so a run can resume)."""
    single = _single_run_module()
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = _done(results)
    for model in args.models:
        checkpoint = checkpoint_id(model)
        for gamma in args.gammas:
            for method in args.methods:
                if method in ONCE and gamma != args.gammas[0]:
                    continue
                # the single-run parser does not know fp32_finetune (run here): parse a
                # placeholder method, then set the real one
                run_args = single.build_parser().parse_args([
                    "--model", model, "--method", "w8a8" if method in FLOAT_METHODS else method,
                    "--gamma", str(gamma),
                    "--minutes", "0", "--steps", str(args.steps),
                    "--djpq-lr", str(args.djpq_lr), "--weight-lr", str(args.weight_lr),
                    "--schedule", args.schedule, "--threads", str(args.threads),
                    "--log-every", str(max(1, args.steps // 5)), "--seed", str(args.seed),
                    "--finalize", str(args.finalize),
                    *(["--train-subset", str(args.train_subset)] if args.train_subset else []),
                    *(["--test-subset", str(args.test_subset)] if args.test_subset else [])])
                run_args.minutes = None
                run_args.method = method
                n_test = args.test_subset or 10_000
                planned = {"model": model, "method": method, "gamma": gamma,
                           "test_images": n_test, "seed": args.seed, "steps": args.steps,
                           "weight_lr": args.weight_lr, "djpq_lr": args.djpq_lr,
                           "schedule": args.schedule, "checkpoint": checkpoint,
                           "finalize": args.finalize}
                if _key(planned) in done:  # the identity a recorded row of this run would have
                    print(f"[claims] skip {model} {method} gamma={gamma}: already measured")
                    continue
                run_args.state_file = (state_path(Path(args.state_dir), planned)
                                       if args.state_dir else None)
                print(f"[claims] {model} {method} gamma={gamma} ({args.steps} steps)",
                      flush=True)
                start = time.perf_counter()
                result = (fp32_finetune_run(run_args) if method in FLOAT_METHODS
                          else single.run(run_args))
                result["wall_seconds"] = round(time.perf_counter() - start)
                result["checkpoint"] = checkpoint
                with results.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                if run_args.state_file:  # recorded: a later run of this identity starts afresh
                    state = Path(run_args.state_file)
                    for path in state.parent.glob(f"{state.stem}*{state.suffix}"):
                        path.unlink()
                kind = "float" if result.get("float_model") else "integer"
                print(f"[claims]   {kind} {100 * result['integer_acc']:.2f} % at "
                      f"{result['gbops']:.4f} GBOPs ({result['bops_reduction']:.1f}x)",
                      flush=True)


def fp32_finetune_run(args: argparse.Namespace) -> dict[str, Any]:
    """The FP32 checkpoint fine-tuned with the recipe of the other methods (``finetune`` with
    gamma 0 on the float model: Adam at ``--weight-lr``, the same schedule, steps, batch size,
    seed and data), scored as a float model; a row of the same shape as the other methods'
    (``integer_acc`` and ``fake_quant_acc`` hold the float accuracy, ``gbops`` the FP32 BOPs,
    ``float_model`` says so)."""
    import torch

    import djpq_compiler as djpq
    from djpq_compiler.workflows import zoo
    from djpq_compiler.workflows.data import fashion_mnist_loaders
    from djpq_compiler.workflows.finetune import FinetuneConfig, accuracy, finetune

    if args.steps is None:
        raise SystemExit("fp32_finetune needs a step budget (--steps)")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train, test = fashion_mnist_loaders(batch_size=args.batch_size, seed=args.seed,
                                        train_subset=args.train_subset,
                                        test_subset=args.test_subset)
    model = zoo.load_pretrained(args.model)
    fp32 = djpq.bops(model, next(iter(test))[0][:1])
    fp32_acc = accuracy(model, test)
    method = getattr(args, "method", FP32_FINETUNE)
    # fp32_finetune_kd distils a separate copy of the checkpoint, as djpq_kd does
    kd = _single_run_module().DISTILLED["djpq_kd"]
    distill, temperature = (kd.weight, kd.temperature) if method == FP32_FINETUNE_KD else (0.0, 2.0)
    teacher = zoo.load_pretrained(args.model) if distill else None
    start = time.perf_counter()
    # finalize 0: a float model has no bits or gates to freeze (its weights train every step,
    # as the weights of the other methods do); log_every past the end: no BOPs records
    finetune(model, train, FinetuneConfig(gamma=0.0, steps=args.steps, minutes=None,
                                          weight_lr=args.weight_lr, djpq_lr=args.djpq_lr,
                                          log_every=args.steps + 1, finalize=0.0,
                                          schedule=args.schedule, distill=distill,
                                          distill_temperature=temperature,
                                          state_file=getattr(args, "state_file", None)),
             progress=False, teacher=teacher)
    train_s = time.perf_counter() - start
    acc = accuracy(model, test)
    extra = ({"distill": distill, "distill_temperature": temperature} if distill else {})
    return {
        "model": args.model, "method": method, "gamma": args.gamma, **extra,
        "minutes": None, "steps": args.steps, "finalize": 0.0, "djpq_lr": args.djpq_lr,
        "weight_lr": args.weight_lr, "schedule": args.schedule, "seed": args.seed,
        "train_seconds": round(train_s), "test_images": len(test.dataset),  # type: ignore[arg-type]
        "fp32_acc": fp32_acc, "fake_quant_acc": acc, "integer_acc": acc, "float_model": True,
        "gbops": fp32.gbops, "fp32_gbops": fp32.gbops, "bops_reduction": 1.0, "float_ops": [],
        "bits": {}, "date": time.strftime("%Y-%m-%d"),
        "drop_points": 100 * (fp32_acc - acc),
    }


def _tuned(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The accuracy (mean over seeds) of each float fine-tune method measured in a section."""
    out = {}
    for method in FLOAT_METHODS:
        accs = [r["integer_acc"] for r in runs if r["method"] == method]
        if accs:
            out[method] = sum(accs) / len(accs)
    return out


def reference_fp32(runs: list[dict[str, Any]]) -> tuple[float, str]:
    """The stronger FP32 of a section: the checkpoint's accuracy or its same-recipe fine-tune's
    (mean over seeds; with ``fp32_finetune_kd`` also measured, the higher of the two fine-tunes),
    whichever is higher, and which one it is: the fine-tune's method (``"fp32_finetune"`` or
    ``"fp32_finetune_kd"``, the higher of the two; the plain one on a tie), ``"checkpoint"`` (a
    fine-tune was measured and is not higher) or ``"checkpoint only"`` (no fine-tune measured in
    the section)."""
    checkpoint = runs[0]["fp32_acc"]
    tuned = _tuned(runs)
    if not tuned:
        return checkpoint, "checkpoint only"
    best = max(tuned, key=lambda m: (tuned[m], m == FP32_FINETUNE))
    if tuned[best] > checkpoint:
        return tuned[best], best
    return checkpoint, "checkpoint"


#: How the texts name the stronger FP32 that :func:`reference_fp32` picked.
_BAR_NAMES = {FP32_FINETUNE: "its same-recipe fine-tune",
              FP32_FINETUNE_KD: "its same-recipe fine-tune distilling the checkpoint",
              "checkpoint": "the checkpoint"}


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front of (gbops, accuracy): ascending BOPs, strictly rising accuracy."""
    front: list[tuple[float, float]] = []
    for g, a in sorted(points):
        if not front or a > front[-1][1]:
            front.append((g, a))
    return front


def _best_at(front: list[tuple[float, float]], gbops: float) -> tuple[float, float] | None:
    """The most accurate (gbops, accuracy) point of a front at or below ``gbops`` (or None)."""
    below = [p for p in front if p[0] <= gbops * (1 + 1e-9)]
    return max(below, key=lambda p: p[1]) if below else None


def _interpolate(front: list[tuple[float, float]], gbops: float) -> float | None:
    """Accuracy of a front at ``gbops``, linear in log BOPs between its neighbouring points;
    None outside the front's BOPs range (no extrapolation)."""
    for (g0, a0), (g1, a1) in zip(front, front[1:], strict=False):
        if g0 <= gbops <= g1:
            t = math.log(gbops / g0) / math.log(g1 / g0) if g1 > g0 else 0.0
            return a0 + t * (a1 - a0)
    if len(front) == 1 and math.isclose(front[0][0], gbops, rel_tol=1e-9):
        return front[0][1]
    return None


def _points(runs: list[dict[str, Any]], reference: float | None = None) -> list[dict[str, Any]]:
    """One point per (method, gamma) of runs with one recipe: integer accuracy and GBOPs averaged
    over seeds; ``drop_points`` against ``reference`` (default: the checkpoint's accuracy)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["method"], float(r["gamma"]))].append(r)
    points = []
    for (method, gamma), rs in groups.items():
        acc = sum(r["integer_acc"] for r in rs) / len(rs)
        gbops = sum(r["gbops"] for r in rs) / len(rs)
        points.append({"method": method, "gamma": gamma, "seeds": len(rs),
                       "integer_acc": acc, "gbops": gbops,
                       "acc_range": (min(r["integer_acc"] for r in rs),
                                     max(r["integer_acc"] for r in rs)),
                       "drop_points": 100 * ((rs[0]["fp32_acc"] if reference is None
                                              else reference) - acc),
                       "bops_reduction": rs[0]["fp32_gbops"] / gbops})
    return points


def _sections(rows: list[dict[str, Any]]) -> dict[Section, list[dict[str, Any]]]:
    """Rows by (model, checkpoint, recipe). A section of a non-default ``--finalize`` also gets
    the ``fp32_finetune`` rows of its recipe (filed under the default finalize: a float fine-tune
    freezes nothing, so it is the same run for every finalize variant)."""
    sections: dict[Section, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        sections[(r["model"], _checkpoint(r), _recipe(r))].append(r)
    for (model, checkpoint, recipe), runs in list(sections.items()):
        if recipe[4] == DEFAULT_FINALIZE or any(r["method"] in FLOAT_METHODS for r in runs):
            continue
        base = sections.get((model, checkpoint, (*recipe[:4], DEFAULT_FINALIZE)), [])
        runs.extend(r for r in base if r["method"] in FLOAT_METHODS)
    return sections


def summarize(results: Path, out_dir: Path, installed: dict[str, str | None] | None = None) -> str:
    """RESULTS.md text (also written) and the accuracy-vs-GBOPs plot from ``results``.

    ``installed``: each model's installed checkpoint id (default: :func:`checkpoint_id` of the
    committed files); its sections come first, after an overview of them (:func:`overview`),
    the others are marked as kept for the record."""
    rows = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.exists() else []
    lines = ["# Paper claims on Fashion-MNIST: DJPQ vs baselines at equal budgets", "",
             "Generated by `python benchmarks/paper_claims/run.py --summarize` from "
             "`results.jsonl` (one line per run; the command of each run is in the file's "
             "`method`/`gamma`/`seed` and recipe fields). Accuracy: the integer converted model "
             "on the test set; GBOPs: `djpq.bops` of that model. One section per model and "
             "training recipe (and FP32 checkpoint, named by the first 12 hex digits of its "
             "SHA-256); methods are compared only within a section. Where a point was run "
             "with several seeds, the statements below use the mean over seeds.", ""]
    sections = _sections(rows)
    if installed is None:
        installed = {m: _installed_id(m) for m in {r["model"] for r in rows}}
    lines += overview(sections, installed)

    def order(kv: tuple[Section, Any]) -> tuple[Any, ...]:  # the installed checkpoints first
        (model, checkpoint, _), _ = kv
        return (installed.get(model) != checkpoint,) + _section_order(kv)

    for (model, checkpoint, recipe), runs in sorted(sections.items(), key=order):
        fp32 = runs[0]
        reference, source = reference_fp32(runs)
        current = installed.get(model)
        status = ("" if current is None or current == checkpoint else
                  f": not the installed checkpoint ({current}), kept for the record")
        lines += [f"## {model}: {_recipe_text(recipe)} (checkpoint {checkpoint}){status}", "",
                  f"FP32 checkpoint: {100 * fp32['fp32_acc']:.2f} % at "
                  f"{fp32['fp32_gbops']:.3f} GBOPs. {_reference_text(runs, reference, source)}",
                  "",
                  "| method | γ | steps | test images | seed | integer top-1 | fake-quant top-1 | "
                  "drop vs ckpt (pt) | drop vs best FP32 (pt) | GBOPs | reduction |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(runs, key=lambda r: (METHODS.index(r["method"])
                                             if r["method"] in METHODS else 99, r["gamma"],
                                             r.get("seed", 0))):
            float_model = r.get("float_model", False)
            fake_quant = "—" if float_model else f"{100 * r['fake_quant_acc']:.2f} %"
            lines.append(
                f"| {r['method']} | {r['gamma']:g} | {r.get('steps')} | "
                f"{r.get('test_images', 10000)} | {r.get('seed', 0)} | "
                f"{100 * r['integer_acc']:.2f} %{' (float)' if float_model else ''} | "
                f"{fake_quant} | "
                f"{r['drop_points']:.2f} | {100 * (reference - r['integer_acc']):.2f} | "
                f"{r['gbops']:.4f} | {r['bops_reduction']:.1f}× |")
        lines += [""] + _verdict(_points(runs, reference), source) + [""]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "RESULTS.md").write_text(text)
    _plot(sections, out_dir / "accuracy_vs_gbops.png")
    return text


def _installed_id(model: str) -> str | None:
    """:func:`checkpoint_id`, or None for a model without a committed checkpoint."""
    try:
        return checkpoint_id(model)
    except (OSError, KeyError, ValueError):
        return None


def _largest_within(points: list[dict[str, Any]], methods: tuple[str, ...]) -> str:
    """The largest reduction of ``methods``' points at <= 1 point drop, as table text."""
    ok = [p for p in points if p["method"] in methods and p["drop_points"] <= 1.0]
    if not ok:
        return "none within 1 point"
    best = max(ok, key=lambda p: p["bops_reduction"])
    return _point_text(best, f"{best['bops_reduction']:.1f}× at {best['drop_points']:.2f}")


#: The paper's method in the overview's DJPQ column: plain, and restricted to power-of-two bits
#: (the paper's hardware-friendly variant); the levers (:data:`LEVERS`) are ours.
PAPER_DJPQ = ("djpq", "djpq_restricted")


def _least_drop_at_200(points: list[dict[str, Any]]) -> str:
    """The smallest drop of a DJPQ (either variant) or lever point at >= 200x, as table text."""
    far = [p for p in points if p["method"] in (*PAPER_DJPQ, *LEVERS)
           and p["bops_reduction"] >= 200]
    if not far:
        return "no point at ≥ 200×"
    best = min(far, key=lambda p: p["drop_points"])
    return _point_text(best, f"{best['drop_points']:.2f} at {best['bops_reduction']:.1f}×")


def _point_text(point: dict[str, Any], what: str) -> str:
    """``what`` of one point, as table text: its method unless plain DJPQ, its γ and seeds."""
    seeds = f", {point['seeds']} seeds" if point["seeds"] > 1 else ""
    name = "" if point["method"] == "djpq" else f"{point['method']} "
    return f"{name}{what} (γ={point['gamma']:g}{seeds})"


def _diff_range(points: list[dict[str, Any]], mine: str, theirs: str) -> str:
    diffs = [d for _, _, d in equal_bops_diffs(points, mine, theirs)]
    if not diffs:
        return "—"
    lo, hi = min(diffs), max(diffs)
    return f"{lo:+.2f}" if len(diffs) == 1 else f"{lo:+.2f} to {hi:+.2f}"


def overview(sections: dict[Section, list[dict[str, Any]]],
             installed: dict[str, str | None]) -> list[str]:
    """RESULTS.md's first table: one row per section on an installed checkpoint with the
    section's stronger FP32, DJPQ's (:data:`PAPER_DJPQ`) largest reduction within 1 point of
    it, the best lever's
    (:data:`LEVERS`), and DJPQ minus two-stage and minus DQ-only at equal BOPs (points; the
    range over the other method's front, :func:`equal_bops_diffs`)."""
    rows = []
    for key, runs in sorted(sections.items(), key=_section_order):
        model, checkpoint, recipe = key
        if installed.get(model) != checkpoint or not any(
                r["method"] not in FLOAT_METHODS for r in runs):
            continue
        reference, source = reference_fp32(runs)
        points = _points(runs, reference)
        bar = f"{100 * reference:.2f} %" + ("" if source in FLOAT_METHODS else
                                             " (checkpoint only)" if source == "checkpoint only"
                                             else " (checkpoint)")
        rows.append(f"| {model} | {checkpoint} | {_recipe_text(recipe)} | {bar} | "
                    f"{_largest_within(points, PAPER_DJPQ)} | "
                    f"{_largest_within(points, tuple(LEVERS))} | "
                    f"{_least_drop_at_200(points)} | "
                    f"{_diff_range(points, 'djpq', 'two_stage')} | "
                    f"{_diff_range(points, 'djpq', 'dq_only')} |")
    if not rows:
        return []
    return ["## Where each net stands on its installed FP32 checkpoint", "",
            "One row per section below on the installed checkpoint. \"Within 1 point\": the "
            "drop against the section's stronger FP32 (the checkpoint or its same-recipe "
            "fine-tune) is at most 1.00 point; the target is ≥ 200× there (\"at ≥ 200×\": the "
            "smallest drop of a DJPQ or lever point that removes ≥ 200× the BOPs). "
            "DJPQ − two-stage and DJPQ − DQ-only: at each point of the other method's "
            "accuracy-vs-BOPs front, DJPQ's best accuracy at or below its BOPs minus that "
            "point's (points; positive: DJPQ "
            "better; — where not both measured or DJPQ has no point that cheap). One seed "
            "unless stated.", "",
            "| model | checkpoint | recipe | stronger FP32 | DJPQ (plain or restricted) within "
            "1 point | a lever "
            "within 1 point | drop at ≥ 200× | DJPQ − two-stage | DJPQ − DQ-only |",
            "|---|---|---|---:|---|---|---|---:|---:|", *rows, ""]


def _reference_text(runs: list[dict[str, Any]], reference: float, source: str) -> str:
    """Which FP32 the drops of a section are measured against, and what is missing."""
    tuned = _tuned(runs)
    if tuned:
        which = {FP32_FINETUNE: "the fine-tune", FP32_FINETUNE_KD: "the distilled fine-tune"}.get(
            source, "the checkpoint")
        text = (f"FP32 fine-tuned with this recipe: {100 * tuned[FP32_FINETUNE]:.2f} %. "
                if FP32_FINETUNE in tuned else "")
        if FP32_FINETUNE_KD in tuned:
            text += (f"FP32 fine-tuned with this recipe distilling the checkpoint "
                     f"({FP32_FINETUNE_KD}): {100 * tuned[FP32_FINETUNE_KD]:.2f} %. ")
        n = "two" if len(tuned) == 1 else "three"
        text += f"Drops are against the stronger of the {n} ({which}, {100 * reference:.2f} %)."
    else:
        text = ("The FP32 fine-tune with this recipe was not run in this section: drops are "
                "against the checkpoint only, and the target line below is provisional.")
        w8a8 = [r["integer_acc"] for r in runs if r["method"] == "w8a8"]
        if w8a8 and sum(w8a8) / len(w8a8) > reference:
            text += (f" (W8A8 with this recipe reaches {100 * sum(w8a8) / len(w8a8):.2f} %, above "
                     "the checkpoint: the recipe's extra training alone adds accuracy.)")
    if runs and all(r["method"] in FLOAT_METHODS for r in runs):
        text += (" FP32 fine-tunes only: no quantized run used this recipe at the default "
                 "finalization (a float fine-tune freezes nothing, so any section of this recipe "
                 "with a longer finalization lists these rows beside its own).")
        return text
    missing = [b for b in BASELINES[1:] if not any(r["method"] == b for r in runs)]
    if missing:
        text += f" Not run in this section: {', '.join(missing)}."
    return text


def _verdict(points: list[dict[str, Any]], source: str = "checkpoint only") -> list[str]:
    """Plain statements: the best reduction at <= 1 pt drop (the points' ``drop_points`` are
    against the section's stronger FP32, named by ``source``), and DJPQ vs two-stage at equal BOPs
    (also for the power-of-two restricted variants) and vs DQ-only (does pruning add anything)."""
    out = []
    against = (f"the stronger FP32 ({_BAR_NAMES[source]})" if source in _BAR_NAMES
               else "the FP32 checkpoint (no same-recipe FP32 fine-tune measured: provisional)")
    ok = [p for p in points if p["method"] == "djpq" and p["drop_points"] <= 1.0]
    if ok:
        best = max(ok, key=lambda p: p["bops_reduction"])
        seeds = f", mean of {best['seeds']} seeds" if best.get("seeds", 1) > 1 else ""
        out.append(f"* DJPQ's largest reduction at ≤ 1 point below {against}: "
                   f"{best['bops_reduction']:.1f}× at {best['drop_points']:.2f} points "
                   f"(γ={best['gamma']:g}{seeds}; target ≥ 200×: "
                   f"{'met' if best['bops_reduction'] >= 200 else 'not met'}).")
    else:
        out.append(f"* No DJPQ run stays within 1 point of {against} in this section.")
    for lever, what in LEVERS.items():
        within = [p for p in points if p["method"] == lever and p["drop_points"] <= 1.0]
        if within:
            best = max(within, key=lambda p: p["bops_reduction"])
            out.append(f"* {what}: largest reduction at ≤ 1 point below {against}: "
                       f"{best['bops_reduction']:.1f}× at {best['drop_points']:.2f} points "
                       f"(γ={best['gamma']:g}; target ≥ 200×: "
                       f"{'met' if best['bops_reduction'] >= 200 else 'not met'}).")
    for mine, theirs in (("djpq", "two_stage"), ("djpq_restricted", "two_stage_restricted"),
                         ("djpq", "dq_only")):
        out.append(_compare(points, mine, theirs))
    return out


def _fronts(points: list[dict[str, Any]], *methods: str) -> dict[str, list[tuple[float, float]]]:
    return {m: _frontier([(p["gbops"], p["integer_acc"]) for p in points if p["method"] == m])
            for m in methods}


def equal_bops_diffs(points: list[dict[str, Any]], mine: str,
                     theirs: str) -> list[tuple[float, float, float]]:
    """``(gbops, gbops_mine, points)`` at each point of ``theirs``'s front that ``mine`` has a
    point at or below: ``mine``'s best accuracy there minus ``theirs``'s, in points (positive:
    ``mine`` better), and the BOPs of ``mine``'s point. The conservative comparison: ``mine``
    is never credited with more BOPs than ``theirs`` spent."""
    fronts = _fronts(points, mine, theirs)
    out = []
    for g, a in fronts[theirs]:
        best = _best_at(fronts[mine], g)
        if best is not None:
            out.append((g, best[0], 100 * (best[1] - a)))
    return out


def _compare(points: list[dict[str, Any]], mine: str, theirs: str) -> str:
    """``mine`` vs ``theirs`` at the BOPs of each of ``theirs``'s points."""
    fronts = _fronts(points, mine, theirs)
    if not (fronts[mine] and fronts[theirs]):
        return f"* {mine} vs {theirs}: not both measured yet."
    diffs = [f"{d:+.2f} points at {g:.4g} GBOPs ({mine} point at {g_mine:.4g} GBOPs)"
             for g, g_mine, d in equal_bops_diffs(points, mine, theirs)]
    inside = []
    for g, a in fronts[mine]:
        theirs_acc = _interpolate(fronts[theirs], g)
        if theirs_acc is not None:
            inside.append(f"{100 * (a - theirs_acc):+.2f} points at {g:.4g} GBOPs")
    between = (f" Interpolated: at each {mine} point within the BOPs range of {theirs}'s front, "
               f"{theirs}'s accuracy there taken linear in log BOPs between its neighbouring "
               f"points, {mine} minus {theirs} is {'; '.join(inside)}." if inside else "")
    if not diffs:
        return (f"* {mine} has no point at or below any {theirs} point's BOPs: no conservative "
                f"equal-BOPs comparison is possible here.{between}")
    return (f"* {mine} vs {theirs} at equal BOPs: at the BOPs of each point on {theirs}'s front, "
            f"the best {mine} accuracy at or below those BOPs differs by {'; '.join(diffs)} "
            f"(positive: {mine} better).{between}")


def _plot(sections: dict[Section, list[dict[str, Any]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, NullFormatter
    except ImportError:
        print("[claims] matplotlib missing (extra 'plots'): no plot written", file=sys.stderr)
        return
    if not sections:
        return
    cols = min(3, len(sections))
    rows = -(-len(sections) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(sections):]:
        ax.set_visible(False)
    ordered = sorted(sections.items(), key=_section_order)
    for ax, ((model, checkpoint, recipe), runs) in zip(axes.flat, ordered, strict=False):
        reference, source = reference_fp32(runs)
        # the FP32 fine-tune is drawn as a line (its point would sit at FP32 BOPs, far right)
        points = [p for p in _points(runs, reference) if p["method"] not in FLOAT_METHODS]
        fp32 = runs[0]
        floor = 100 * reference - FLOOR_POINTS  # collapsed runs would flatten the rest
        colors = plt.get_cmap("tab20")
        for i, method in enumerate(METHODS):
            pts = sorted((p["gbops"], 100 * p["integer_acc"]) for p in points
                         if p["method"] == method)
            if not pts:
                continue
            ys = [max(a, floor) for _, a in pts]
            ax.plot([g for g, _ in pts], ys, "o-", color=colors(i), label=method)
            low = [(g, floor) for g, a in pts if a < floor]
            if low:
                ax.plot(*zip(*low, strict=True), "v", color=colors(i), markersize=10)
        ax.axhline(100 * fp32["fp32_acc"], color="black", ls="--", lw=0.8,
                   label="FP32 checkpoint")
        if source != "checkpoint only":
            ax.axhline(100 * max(_tuned(runs).values()), color="black", ls="-.", lw=0.8,
                       label="FP32 same-recipe fine-tune")
        ax.axhline(100 * reference - 1.0, color="grey", ls=":", label="best FP32 − 1 pt")
        # zoom in on the points when none is near the floor
        lowest = min([100 * p["integer_acc"] for p in points] + [100 * reference - 1.0])
        ax.set_ylim(bottom=max(floor, lowest) - 0.5)
        ax.set_xscale("log")
        ax.set_xlabel("GBOPs (integer model, log)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{model} (FP32 {fp32['fp32_gbops']:.2f} GBOPs, checkpoint {checkpoint})\n"
                     f"{_recipe_text(recipe)}",
                     fontsize=9)
        xs = [p["gbops"] for p in points if p["gbops"] > 0]
        # within one decade the log axis has no major tick: label the minor ones instead
        narrow = bool(xs) and max(xs) < 10 * min(xs)
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g") if narrow else NullFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=700)
    # defaults: the recipe that did best in NOTES.md ("recipe B")
    parser.add_argument("--djpq-lr", type=float, default=0.03)
    parser.add_argument("--weight-lr", type=float, default=1e-3)
    parser.add_argument("--schedule", default="cosine", choices=["constant", "cosine"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finalize", type=float, default=DEFAULT_FINALIZE,
                        help="fraction of the steps trained at frozen (deployed) gates and bits")
    parser.add_argument("--train-subset", type=int, default=None, help="(smoke runs only)")
    parser.add_argument("--test-subset", type=int, default=None, help="(smoke runs only)")
    parser.add_argument("--state-dir", default=None,
                        help="save each run's training state in this folder as it goes (every "
                             "200 steps) and resume a stopped run from it; a run's file is "
                             "deleted once its row is recorded")
    parser.add_argument("--results", default=str(HERE / "results.jsonl"))
    parser.add_argument("--out-dir", default=str(HERE))
    parser.add_argument("--summarize", action="store_true", help="only write RESULTS.md + plot")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.djpq_lr) and math.isfinite(args.weight_lr)) or args.steps < 1:
        parser.error("--steps must be >= 1 and --djpq-lr, --weight-lr finite")
    if not 0.0 <= args.finalize < 1.0:
        parser.error("--finalize must be in [0, 1)")
    if not args.summarize:
        run_all(args)
    print(summarize(Path(args.results), Path(args.out_dir)))


if __name__ == "__main__":
    main()
