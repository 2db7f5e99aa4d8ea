"""DJPQ fine-tune on Fashion-MNIST from a committed FP32 checkpoint, and its baselines.

Each method gets the same budget (optimizer steps with ``--steps``, else wall-clock minutes) from
the same checkpoint; accuracy is measured on the
full 10k test set with the *integer* converted model (hard gates, read-out bits), BOPs with
``djpq.bops`` of that model. Results append to a JSON-lines file.

Usage:
  python benchmarks/djpq_finetune/run.py --model resnet20 --method djpq --minutes 15 --gamma 1
  python benchmarks/djpq_finetune/run.py --model resnet20 --method two_stage --minutes 0 \
      --steps 700 --gamma 1
  methods: djpq, djpq_restricted, djpq_soft_bops, djpq_dw_w4, djpq_dw_w4_bound, djpq_dw_gamma3,
    djpq_dw_gamma05, djpq_a3_bound, djpq_kd, djpq_a3_kd, djpq_restricted_kd, two_stage,
    two_stage_restricted, dq_only, vib_only, w8a8, w4a4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

import djpq_compiler as djpq
from djpq_compiler.config import DJPQConfig, Override, QuantSpec
from djpq_compiler.convert import convert
from djpq_compiler.records import converted_record
from djpq_compiler.workflows import zoo
from djpq_compiler.workflows.data import fashion_mnist_loaders
from djpq_compiler.workflows.finetune import SCHEDULES, FinetuneConfig, accuracy, finetune

METHODS: dict[str, dict[str, Any]] = {
    "djpq": {},
    "djpq_restricted": {"restricted": True},
    "djpq_soft_bops": {"loss_kind": "soft_bops"},  # REFERENCE's alternative regulariser
    "dq_only": {"prune": False},
    "dq_only_restricted": {"prune": False, "restricted": True},
    "vib_only": {"quantize": False},
    "w8a8": {"prune": False, "weight": QuantSpec(bits=8, learn_bits=False),
             "activation": QuantSpec(bits=8, learn_bits=False)},
    "w4a4": {"prune": False, "weight": QuantSpec(bits=4, learn_bits=False),
             "activation": QuantSpec(bits=4, learn_bits=False)},
    # issue 18 lever: every learned activation quantizer held at >= 3 bits in training (at
    # resnet20's 200x point DJPQ took stages 1-2 to 2-bit activations and pruned them little)
    "djpq_a3_bound": {"activation": QuantSpec(min_bits=3, bind_min_bits=True)},
}
#: Per-group regularisation strength (issue 18, item 4): method -> the factor on the depthwise
#: convs' terms of the DJPQ regulariser (``Override.gamma_scale``; every other layer keeps 1).
DEPTHWISE_GAMMA = {"djpq_dw_gamma3": 3.0, "djpq_dw_gamma05": 0.5}
#: Methods whose config depends on the model's layers (issue 18, item 4: levers for mobilenetv2,
#: whose 3x3 depthwise filters hold few weights each): DJPQ with a floor of
#: ``DEPTHWISE_WEIGHT_FLOOR`` weight bits on every depthwise conv, at read-out only
#: (``djpq_dw_w4``) or held during training too (``djpq_dw_w4_bound``, ``QuantSpec.bind_min_bits``),
#: and DJPQ with the depthwise convs' share of the regulariser scaled (``DEPTHWISE_GAMMA``).
MODEL_METHODS = ("djpq_dw_w4", "djpq_dw_w4_bound", *DEPTHWISE_GAMMA)
DEPTHWISE_WEIGHT_FLOOR = 4


class Distilled(NamedTuple):
    """A DJPQ variant whose task loss distils the FP32 checkpoint (issue 18 lever, not the
    paper's method): the distillation weight and temperature of :class:`FinetuneConfig`, and the
    method (a key of :data:`METHODS`) whose config it trains."""

    weight: float
    temperature: float
    config_of: str


#: Distilled methods: ``djpq_kd`` is plain DJPQ with a teacher; ``djpq_a3_kd`` is
#: ``djpq_a3_bound`` (3-bit activation floor held in training) with the same teacher;
#: ``djpq_restricted_kd`` is ``djpq_restricted`` (power-of-two bits) with it.
DISTILLED = {"djpq_kd": Distilled(0.7, 2.0, "djpq"),
             "djpq_a3_kd": Distilled(0.7, 2.0, "djpq_a3_bound"),
             "djpq_restricted_kd": Distilled(0.7, 2.0, "djpq_restricted")}


def depthwise_convs(model: torch.nn.Module) -> list[str]:
    """Qualified names of ``model``'s depthwise convs (``groups == in_channels > 1``)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]


def method_config(method: str, model: torch.nn.Module) -> DJPQConfig:
    """The DJPQConfig of a single-stage ``method`` for ``model``."""
    if method in DISTILLED:
        return DJPQConfig(**METHODS[DISTILLED[method].config_of])
    if method in MODEL_METHODS:
        names = depthwise_convs(model)
        if not names:
            raise SystemExit(f"{method}: the model has no depthwise conv")
        if method in DEPTHWISE_GAMMA:
            scale = DEPTHWISE_GAMMA[method]
            return DJPQConfig(overrides=tuple(Override(match=n, gamma_scale=scale) for n in names))
        floor = QuantSpec(min_bits=DEPTHWISE_WEIGHT_FLOOR,
                          bind_min_bits=method == "djpq_dw_w4_bound")
        return DJPQConfig(overrides=tuple(Override(match=n, weight=floor) for n in names))
    return DJPQConfig(**METHODS[method])


def _state_file(args: argparse.Namespace, stage: str = "") -> str | None:
    """``--state-file`` (with ``stage`` before its suffix for each half of a two-stage run)."""
    path = getattr(args, "state_file", None)
    if path is None or not stage:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{stage}{p.suffix}"))


def _stage(model: torch.nn.Module, cfg: DJPQConfig, loaders: tuple, args: argparse.Namespace,
           minutes: float | None, gamma: float, steps: int | None,
           finalize: float,
           teacher: torch.nn.Module | None = None,
           state_file: str | None = None) -> torch.fx.GraphModule:
    train, _ = loaders
    calib = [next(iter(train))[0] for _ in range(4)]
    prepared = djpq.prepare(model, calib[0], cfg, calibration_data=calib)
    distilled = DISTILLED.get(args.method)
    distill, temperature = (distilled.weight, distilled.temperature) if distilled else (0.0, 2.0)
    finetune(prepared, train, FinetuneConfig(gamma=gamma, minutes=minutes, steps=steps,
                                             weight_lr=args.weight_lr, djpq_lr=args.djpq_lr,
                                             log_every=args.log_every, finalize=finalize,
                                             schedule=args.schedule, distill=distill,
                                             distill_temperature=temperature,
                                             state_file=state_file),
             teacher=teacher if distill else None,
             progress=False, on_log=lambda log: print(f"  step {log.step} {log.seconds:.0f}s "
                                                      f"task {log.task_loss:.3f} "
                                                      f"R {log.regularizer:.4f} "
                                                      f"GBOPs {log.gbops:.4f}"
                                                      f"{' (final)' if log.finalizing else ''}",
                                                      flush=True))
    return prepared


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    loaders = fashion_mnist_loaders(batch_size=args.batch_size, seed=args.seed,
                                    train_subset=getattr(args, "train_subset", None),
                                    test_subset=getattr(args, "test_subset", None))
    model = zoo.load_pretrained(args.model)
    x = next(iter(loaders[1]))[0][:1]
    fp32 = djpq.bops(model, x)
    fp32_acc = accuracy(model, loaders[1])
    start = time.perf_counter()
    minutes, steps = args.minutes, args.steps
    if args.method.startswith("two_stage"):
        # half the budget each; stage 1 freezes its gates at the end, stage 2 its bits
        half = (None if minutes is None else minutes / 2, None if steps is None else steps // 2)
        stage1 = _stage(model, DJPQConfig(quantize=False), loaders, args, half[0], args.gamma,
                        half[1], args.finalize, state_file=_state_file(args, "stage1"))
        pruned = convert(stage1, integer=False)
        restricted = args.method.endswith("restricted")
        prepared = _stage(pruned, DJPQConfig(prune=False, restricted=restricted), loaders, args,
                          half[0], args.gamma, half[1], args.finalize,
                          state_file=_state_file(args, "stage2"))
    else:
        # the teacher of a distilled method: the same FP32 checkpoint, a separate copy
        teacher = zoo.load_pretrained(args.model) if args.method in DISTILLED else None
        prepared = _stage(model, method_config(args.method, model), loaders, args,
                          minutes, args.gamma, steps, args.finalize, teacher,
                          state_file=_state_file(args))
    train_s = time.perf_counter() - start
    converted = convert(prepared)
    report = djpq.bops(converted)
    result = {
        "model": args.model, "method": args.method, "gamma": args.gamma,
        "minutes": args.minutes, "steps": args.steps, "finalize": args.finalize,
        "djpq_lr": args.djpq_lr, "weight_lr": args.weight_lr, "schedule": args.schedule,
        "seed": args.seed, "train_seconds": round(train_s),
        "test_images": len(loaders[1].dataset),  # type: ignore[arg-type]
        "fp32_acc": fp32_acc, "fake_quant_acc": accuracy(prepared, loaders[1]),
        "integer_acc": accuracy(converted, loaders[1]),
        "gbops": report.gbops, "fp32_gbops": fp32.gbops,
        "bops_reduction": fp32.total / report.total,
        "float_ops": list(converted_record(converted).float_ops),
        "bits": {r.name: [r.b_w, r.b_a, r.out_kept, r.out_total] for r in report.rows},
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.method in DISTILLED:
        result["distill"] = DISTILLED[args.method].weight
        result["distill_temperature"] = DISTILLED[args.method].temperature
    result["drop_points"] = 100 * (result["fp32_acc"] - result["integer_acc"])
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line (also used by ``benchmarks/paper_claims/run.py`` for its defaults)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", choices=sorted(zoo.MODELS))
    parser.add_argument("--method", default="djpq",
                        choices=sorted(METHODS) + list(MODEL_METHODS) + sorted(DISTILLED)
                        + ["two_stage", "two_stage_restricted"])
    parser.add_argument("--minutes", type=float, default=15.0,
                        help="wall-clock budget (0: none, use --steps)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer-step budget")
    parser.add_argument("--finalize", type=float, default=0.1,
                        help="fraction of the budget trained at deployed bits and gates")
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--weight-lr", type=float, default=2e-4)
    parser.add_argument("--djpq-lr", type=float, default=1e-2)
    parser.add_argument("--schedule", default="constant", choices=SCHEDULES,
                        help="learning-rate schedule of every parameter group")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-subset", type=int, default=None, help="(smoke runs only)")
    parser.add_argument("--test-subset", type=int, default=None,
                        help="evaluate on this many test images (default: all 10k)")
    parser.add_argument("--state-file", default=None,
                        help="save the training state here as it goes and resume from it when "
                             "present (needs --minutes 0 and --steps; FinetuneConfig.state_file)")
    parser.add_argument("--out", default="benchmarks/djpq_finetune/results.jsonl")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if not args.minutes:
        args.minutes = None
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "bits"}, indent=1))
    with Path(args.out).open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
