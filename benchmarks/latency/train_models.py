"""Train the small DJPQ models the end-to-end latency benchmark runs, and commit their states.

Each model is fine-tuned from its committed FP32 Fashion-MNIST checkpoint with DJPQ
(``DJPQConfig()`` defaults) the way the paper-claims benchmark does it (recipe B: Adam, weight lr
1e-3, DJPQ lr 0.03, cosine rates, 4 calibration batches of 128 training images), but briefly
(``--steps``). What is saved, per model, in ``--out``:

* ``NAME.pt``: the trained prepared model's ``state_dict``; :func:`load_prepared` loads it into a
  ``prepare()`` of the FP32 checkpoint calibrated on the same 4 training batches (calibration
  decides which activation quantizers are signed, which the state_dict does not hold);
* ``NAME.json``: the config, recipe and calibration, the quantizers' signed flags, and the
  integer model's test accuracy and GBOPs.

Usage (the committed states; vgg7 comes from the demo, see ``--from-demo``):
  python benchmarks/latency/train_models.py --models resnet20:10,mobilenetv2:6 --steps 400
  python benchmarks/latency/train_models.py --from-demo runs/latency-vgg7 --models vgg7
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

import djpq_compiler as djpq
from djpq_compiler.config import DJPQConfig
from djpq_compiler.convert import convert
from djpq_compiler.workflows import zoo
from djpq_compiler.workflows.data import fashion_mnist_loaders
from djpq_compiler.workflows.finetune import FinetuneConfig, accuracy, finetune

HERE = Path(__file__).resolve().parent
INPUT_SHAPE = (1, 28, 28)


def calibration_batches(mode: str, seed: int) -> list[torch.Tensor]:
    """The 4 training batches a model was calibrated on before training.

    ``prepare`` decides each activation quantizer's ``signed`` from the calibration data and
    that flag is not part of the ``state_dict``: a state must be loaded into a ``prepare()``
    calibrated like the one it was trained from (and :func:`load_prepared` checks the flags
    recorded at save time). ``"fresh_iter"``: the first batch of 4 fresh iterators (this
    script); ``"islice"``: the first 4 batches of one iterator (``djpq demo``).
    """
    train_loader, _ = fashion_mnist_loaders(batch_size=128, seed=seed)
    if mode == "fresh_iter":
        return [next(iter(train_loader))[0] for _ in range(4)]
    if mode == "islice":
        return [x for x, _ in itertools.islice(train_loader, 4)]
    raise SystemExit(f"unknown calibration mode {mode!r}")


def signed_flags(prepared: torch.nn.Module) -> dict[str, bool]:
    """Every quantizer's ``signed`` flag (set at calibration, not in the state_dict)."""
    return {n: bool(m.signed) for n, m in prepared.named_modules()
            if isinstance(getattr(m, "signed", None), bool)}


def fresh_prepared(name: str, calibration: str, seed: int) -> torch.nn.Module:
    """``prepare`` of the FP32 checkpoint calibrated as the trained model was."""
    calib = calibration_batches(calibration, seed)
    return djpq.prepare(zoo.load_pretrained(name).eval(), calib[0], DJPQConfig(),
                        calibration_data=calib)


def load_prepared(name: str, models_dir: Path = HERE / "models") -> torch.nn.Module:
    """The committed trained prepared model ``name`` (eval mode).

    Raises:
        SystemExit: Unknown config, or quantizer ``signed`` flags that differ from the ones
            recorded when the state was saved.
    """
    meta = json.loads((models_dir / f"{name}.json").read_text())
    if meta.get("config") != "DJPQConfig()":
        raise SystemExit(f"{name}.json: unknown config (this loader knows DJPQConfig() only)")
    prepared = fresh_prepared(name, meta["calibration"], int(meta.get("seed", 0)))
    prepared.load_state_dict(torch.load(models_dir / f"{name}.pt", weights_only=True))
    recorded = meta.get("quantizer_signed")
    if recorded is not None and recorded != signed_flags(prepared):
        raise SystemExit(f"{name}: the quantizers' signed flags differ from the saved ones; "
                         "the state does not fit this calibration")
    return prepared.eval()


def _score(prepared: torch.nn.Module, name: str, test: object) -> dict[str, object]:
    model = zoo.load_pretrained(name).eval()
    x = torch.zeros(1, *INPUT_SHAPE)
    converted = convert(prepared.eval())
    fp32, comp = djpq.bops(model, x), djpq.bops(converted)
    return {"fp32_acc": accuracy(model, test), "integer_acc": accuracy(converted, test),
            "gbops_fp32": fp32.gbops, "gbops": comp.gbops,
            "bops_reduction": fp32.total / comp.total}


def train(name: str, gamma: float, args: argparse.Namespace) -> torch.nn.Module:
    train_loader, _ = fashion_mnist_loaders(batch_size=128, seed=args.seed)
    prepared = fresh_prepared(name, "fresh_iter", args.seed)
    cfg = FinetuneConfig(gamma=gamma, steps=args.steps, minutes=None, weight_lr=1e-3,
                         djpq_lr=0.03, schedule="cosine", log_every=100)
    finetune(prepared, train_loader, cfg, progress=False,
             on_log=lambda log: print(f"  {name} step {log.step} {log.seconds:.0f}s task "
                                      f"{log.task_loss:.3f} GBOPs {log.gbops:.4f}", flush=True))
    return prepared


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20:10,mobilenetv2:6",
                    help="NAME:GAMMA,... (with --from-demo: NAME)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-subset", type=int, default=None,
                    help="score on N random test images (default: all 10k)")
    ap.add_argument("--from-demo", default=None,
                    help="take the prepared.pt of this demo run folder instead of training")
    ap.add_argument("--rescore", action="store_true",
                    help="only recompute the scores of the saved states in --out")
    ap.add_argument("--out", default=str(HERE / "models"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, test = fashion_mnist_loaders(batch_size=256, seed=args.seed, test_subset=args.test_subset)
    for item in args.models.split(","):
        name, _, gamma = item.partition(":")
        meta_path = out / f"{name}.json"
        if args.rescore:  # recompute the scores of a saved state with the current loader
            meta = json.loads(meta_path.read_text())
            meta.update(_score(load_prepared(name, out), name, test),
                        test_images=len(test.dataset))  # type: ignore[arg-type]
            meta_path.write_text(json.dumps(meta, indent=1) + "\n")
            print(json.dumps(meta), flush=True)
            continue
        start = time.perf_counter()
        if args.from_demo:
            prepared = fresh_prepared(name, "islice", args.seed)
            prepared.load_state_dict(torch.load(Path(args.from_demo, "prepared.pt"),
                                                weights_only=True))
            recipe = f"djpq demo --model {name} (run folder {args.from_demo}), DJPQConfig()"
            calibration = "islice"
        else:
            prepared = train(name, float(gamma), args)
            recipe = (f"DJPQ gamma {gamma}, {args.steps} steps, Adam weight lr 1e-3, DJPQ lr "
                      "0.03, cosine, batch 128, 4 calibration batches, seed "
                      f"{args.seed} (paper-claims recipe B, shorter)")
            calibration = "fresh_iter"
        torch.save(prepared.state_dict(), out / f"{name}.pt")
        meta = {"model": name, "config": "DJPQConfig()", "input_shape": list(INPUT_SHAPE),
                "recipe": recipe, "calibration": calibration, "seed": args.seed,
                "quantizer_signed": signed_flags(prepared),
                "train_seconds": round(time.perf_counter() - start),
                "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
                "test_images": len(test.dataset)}  # type: ignore[arg-type]
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        meta.update(_score(load_prepared(name, out), name, test))
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        print(json.dumps(meta), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
