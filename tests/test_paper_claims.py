"""The claims benchmark's orchestration, on a tiny budget (the real numbers are in benchmarks/)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _claims():
    spec = importlib.util.spec_from_file_location("paper_claims_run",
                                                  ROOT / "benchmarks/paper_claims/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frontier_and_equal_bops_comparison() -> None:
    claims = _claims()
    front = claims._frontier([(1.0, 0.80), (0.5, 0.85), (2.0, 0.84), (3.0, 0.90)])
    assert front == [(0.5, 0.85), (3.0, 0.90)]
    assert claims._best_at(front, 2.5) == (0.5, 0.85)
    assert claims._best_at(front, 0.4) is None
    # linear in log BOPs between neighbours, nothing outside the front's range
    assert claims._interpolate([(1.0, 0.80), (4.0, 0.90)], 2.0) == pytest.approx(0.85)
    assert claims._interpolate([(1.0, 0.80), (4.0, 0.90)], 4.0) == pytest.approx(0.90)
    assert claims._interpolate([(1.0, 0.80), (4.0, 0.90)], 0.5) is None
    assert claims._interpolate([(1.0, 0.80), (4.0, 0.90)], 8.0) is None
    runs = [{"method": "djpq", "gbops": 0.5, "integer_acc": 0.85, "drop_points": 0.5,
             "bops_reduction": 300.0, "gamma": 1.0},
            {"method": "two_stage", "gbops": 0.6, "integer_acc": 0.84, "drop_points": 1.5,
             "bops_reduction": 250.0, "gamma": 1.0}]
    text = "\n".join(claims._verdict(runs))
    assert "300.0×" in text and "met" in text and "+1.00" in text
    # a DJPQ point between two two-stage points is compared with their log-BOPs interpolation
    pts = [{"method": "two_stage", "gbops": 1.0, "integer_acc": 0.80},
           {"method": "two_stage", "gbops": 4.0, "integer_acc": 0.90},
           {"method": "djpq", "gbops": 2.0, "integer_acc": 0.86}]
    line = claims._compare(pts, "djpq", "two_stage")
    assert "-4.00 points at 1 GBOPs" not in line  # no djpq point at or below 1 GBOPs
    assert "-4.00 points at 4 GBOPs" in line and "djpq minus two_stage is +1.00 points at 2" in line


@pytest.mark.slow
def test_claims_smoke_run_writes_table_and_plot(tmp_path) -> None:
    from djpq_compiler.errors import DataError
    from djpq_compiler.workflows.data import fashion_mnist_loaders

    try:
        fashion_mnist_loaders(train_subset=8, test_subset=8)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")
    results = tmp_path / "results.jsonl"
    argv = ["--models", "vgg7", "--methods", "djpq", "two_stage", "w8a8", "fp32_finetune",
            "--gammas", "1",
            "--steps", "2", "--threads", "1", "--train-subset", "256", "--test-subset", "64",
            "--results", str(results), "--out-dir", str(tmp_path)]
    _claims().main(argv)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["djpq", "two_stage", "w8a8", "fp32_finetune"]
    assert all(r["test_images"] == 64 and r["steps"] == 2 for r in rows)
    assert all(0.0 <= r["integer_acc"] <= 1.0 for r in rows)
    assert all(r["gbops"] < r["fp32_gbops"] for r in rows[:3])
    tuned = rows[3]  # a float model at FP32 BOPs, same recipe fields as the others
    assert tuned["float_model"] and tuned["bops_reduction"] == 1.0
    assert tuned["gbops"] == tuned["fp32_gbops"] and tuned["bits"] == {}
    assert {k: tuned[k] for k in ("weight_lr", "djpq_lr", "schedule", "seed")} == \
        {k: rows[0][k] for k in ("weight_lr", "djpq_lr", "schedule", "seed")}
    text = (tmp_path / "RESULTS.md").read_text()
    section = text.split("\n## vgg7")[1]  # rows name no model; the overview's row does
    assert section.count("| vgg7") == 0 and "| w8a8 | 1 | 2 | 64 |" in section
    assert "## Where each net stands" in text and "| vgg7 | " in text.split("\n## vgg7")[0]
    assert "| fp32_finetune | 1 | 2 | 64 |" in text and "(float) | — |" in text
    assert "FP32 fine-tuned with this recipe" in text and "Not run in this section: w4a4" in text
    assert "djpq vs two_stage" in text or "two_stage point" in text or "do not overlap" in text
    assert (tmp_path / "accuracy_vs_gbops.png").stat().st_size > 1000
    _claims().main(argv)  # resumes: everything measured already, nothing appended
    assert len(results.read_text().splitlines()) == 4


def test_seeds_are_averaged_and_restricted_variants_compared() -> None:
    claims = _claims()
    base = {"model": "m", "steps": 10, "djpq_lr": 0.03, "test_images": 100, "fp32_acc": 0.90,
            "fp32_gbops": 100.0}
    runs = [dict(base, method="djpq", gamma=1.0, seed=0, integer_acc=0.88, gbops=0.4),
            dict(base, method="djpq", gamma=1.0, seed=1, integer_acc=0.90, gbops=0.6),
            dict(base, method="djpq_restricted", gamma=1.0, integer_acc=0.70, gbops=0.5),
            dict(base, method="two_stage_restricted", gamma=1.0, integer_acc=0.80, gbops=0.5)]
    points = {p["method"]: p for p in claims._points(runs)}
    djpq = points["djpq"]
    assert djpq["seeds"] == 2 and djpq["acc_range"] == (0.88, 0.90)
    assert abs(djpq["integer_acc"] - 0.89) < 1e-12 and abs(djpq["gbops"] - 0.5) < 1e-12
    assert abs(djpq["bops_reduction"] - 200.0) < 1e-9 and abs(djpq["drop_points"] - 1.0) < 1e-9
    text = "\n".join(claims._verdict(list(points.values())))
    assert "djpq vs two_stage: not both measured" in text
    assert "-10.00 points at 0.5 GBOPs" in text  # restricted DJPQ is worse and the text says so
    assert claims._key(runs[0]) != claims._key(runs[1])  # the seed tells the runs apart


def test_drop_is_against_the_stronger_fp32_of_a_section() -> None:
    claims = _claims()
    base = {"model": "m", "steps": 10, "djpq_lr": 0.03, "test_images": 100, "fp32_acc": 0.90,
            "fp32_gbops": 100.0}
    djpq = dict(base, method="djpq", gamma=1.0, integer_acc=0.895, gbops=0.4)  # 250x
    # no fine-tune measured: against the checkpoint, flagged provisional
    assert claims.reference_fp32([djpq]) == (0.90, "checkpoint only")
    text = "\n".join(claims._verdict(claims._points([djpq]), "checkpoint only"))
    assert "250.0× at 0.50 points" in text and "provisional" in text and "met" in text
    # a fine-tune above the checkpoint becomes the reference: 1.5 points down, target not met
    tuned = [dict(base, method="fp32_finetune", gamma=1.0, integer_acc=a, gbops=100.0, seed=s)
             for s, a in ((0, 0.905), (1, 0.915))]
    reference, source = claims.reference_fp32([djpq, *tuned])
    assert abs(reference - 0.91) < 1e-12 and source == "fp32_finetune"
    points = claims._points([djpq, *tuned], reference)
    assert abs(next(p for p in points if p["method"] == "djpq")["drop_points"] - 1.5) < 1e-9
    text = "\n".join(claims._verdict(points, source))
    assert "No DJPQ run stays within 1 point of the stronger FP32 (its same-recipe fine-tune)" \
        in text
    # a fine-tune below the checkpoint leaves the checkpoint as the reference
    low = dict(tuned[0], integer_acc=0.85)
    assert claims.reference_fp32([djpq, low]) == (0.90, "checkpoint")
    assert "the stronger FP32 (the checkpoint)" in "\n".join(
        claims._verdict(claims._points([djpq, low], 0.90), "checkpoint"))
    # the section header says what the drops are against and which baselines are missing
    header = claims._reference_text([djpq, *tuned], reference, source)
    assert "91.00 %" in header and "the fine-tune" in header
    assert "Not run in this section: w8a8, w4a4" in header
    # a section of FP32 fine-tunes only names no missing baseline: its quantized runs live in
    # the recipe's finalize variants
    float_only = claims._reference_text(tuned, reference, source)
    assert "FP32 fine-tunes only" in float_only and "Not run in this section" not in float_only
    assert "not run in this section" in claims._reference_text([djpq], 0.90, "checkpoint only")
    # a distilled fine-tune above the plain one is the reference, and the texts name it
    distilled = dict(tuned[0], method="fp32_finetune_kd", integer_acc=0.92)
    reference, source = claims.reference_fp32([djpq, *tuned, distilled])
    assert abs(reference - 0.92) < 1e-12 and source == "fp32_finetune_kd"
    assert "(the distilled fine-tune, 92.00 %)" in claims._reference_text(
        [djpq, *tuned, distilled], reference, source)
    assert "the stronger FP32 (its same-recipe fine-tune distilling the checkpoint)" in \
        "\n".join(claims._verdict(claims._points([djpq, *tuned, distilled], reference), source))
    # level fine-tunes: the plain one is named
    level = dict(distilled, integer_acc=0.91)
    assert claims.reference_fp32([djpq, *tuned, level])[1] == "fp32_finetune"
    w8a8 = dict(base, method="w8a8", gamma=1.0, integer_acc=0.91, gbops=6.25)
    assert "W8A8 with this recipe reaches 91.00 %, above the checkpoint" in \
        claims._reference_text([djpq, w8a8], 0.90, "checkpoint only")


def test_a_new_checkpoint_is_a_new_run_and_a_new_section(tmp_path: Path) -> None:
    claims = _claims()
    base = {"model": "vgg7", "method": "djpq", "gamma": 1.0, "steps": 10, "djpq_lr": 0.03,
            "test_images": 100, "fp32_acc": 0.90, "fp32_gbops": 100.0, "integer_acc": 0.89,
            "fake_quant_acc": 0.89, "gbops": 0.5, "bops_reduction": 200.0, "drop_points": 1.0}
    legacy = dict(base)  # written before the checkpoint was recorded: the 2026-11-30 file
    same = dict(base, checkpoint=claims.LEGACY_CHECKPOINTS["vgg7"])
    new = dict(base, checkpoint="0123456789ab", fp32_acc=0.93, integer_acc=0.925)
    assert claims._key(legacy) == claims._key(same) != claims._key(new)
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in (legacy, new)))
    text = claims.summarize(results, tmp_path)
    assert text.count("## vgg7: 10 steps") == 2
    assert f"(checkpoint {claims.LEGACY_CHECKPOINTS['vgg7']})" in text
    assert "(checkpoint 0123456789ab)" in text and "FP32 checkpoint: 93.00 %" in text
    assert len(claims.checkpoint_id("vgg7")) == 12


def test_depthwise_weight_floor_method_sets_min_bits_on_depthwise_convs_only() -> None:
    import torch

    import djpq_compiler as djpq
    from djpq_compiler.modules.quantizers import DQQuantizer
    from djpq_compiler.workflows import zoo

    single = _claims()._single_run_module()
    model = zoo.get_model("mobilenetv2")
    depthwise = single.depthwise_convs(model)
    # one 3x3 depthwise conv per inverted-residual block, nothing else
    assert depthwise and all(name.startswith("blocks.") for name in depthwise)
    assert len(depthwise) == len(model.blocks)
    cfg = single.method_config("djpq_dw_w4", model)
    assert cfg.prune and cfg.quantize and not cfg.restricted
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            weight = cfg.resolve(name, type(module)).weight
            assert weight is not None
            assert weight.min_bits == (single.DEPTHWISE_WEIGHT_FLOOR if name in depthwise else 2)
    prepared = djpq.prepare(model, torch.randn(2, 1, 28, 28), cfg)
    floors = [m for m in prepared.modules()
              if isinstance(m, DQQuantizer) and m.min_bits == single.DEPTHWISE_WEIGHT_FLOOR]
    assert len(floors) == len(depthwise)
    assert single.method_config("djpq", model) == djpq.DJPQConfig()
    with pytest.raises(SystemExit, match="no depthwise conv"):
        single.method_config("djpq_dw_w4", zoo.get_model("vgg7"))


def test_finalize_fraction_is_a_new_run_and_section_sharing_the_fp32_finetune(
        tmp_path: Path) -> None:
    claims = _claims()
    base = {"model": "vgg7", "gamma": 1.0, "steps": 10, "djpq_lr": 0.03, "weight_lr": 1e-3,
            "schedule": "cosine", "test_images": 100, "fp32_acc": 0.90, "fp32_gbops": 100.0,
            "fake_quant_acc": 0.89, "checkpoint": "0123456789ab", "seed": 0}
    old = dict(base, method="djpq", integer_acc=0.89, gbops=0.5, bops_reduction=200.0,
               drop_points=1.0)  # written before finalize was recorded: the default
    default = dict(old, finalize=0.1)
    longer = dict(old, finalize=0.3, integer_acc=0.905, gbops=0.4, bops_reduction=250.0)
    tuned = dict(base, method="fp32_finetune", finalize=0.0, integer_acc=0.91, gbops=100.0,
                 bops_reduction=1.0, drop_points=-1.0, float_model=True)
    assert claims._key(old) == claims._key(default) != claims._key(longer)
    # the FP32 fine-tune freezes nothing: --finalize does not make it a new run
    assert claims._key(tuned) == claims._key(dict(tuned, finalize=0.3))
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in (default, longer, tuned)))
    text = claims.summarize(results, tmp_path)
    assert text.count("## vgg7: 10 steps") == 2
    title = "cosine rates, last 0.3 of the steps at frozen gates and bits (checkpoint"
    assert text.count(title) == 1
    longer_section = text.split(title)[1]
    # its drops are against the shared FP32 fine-tune (91 %): 0.50 points at 250x
    assert "FP32 fine-tuned with this recipe: 91.00 %" in longer_section
    assert "250.0× at 0.50 points" in longer_section
    assert "| fp32_finetune | 1 | 10 |" in longer_section
    with pytest.raises(SystemExit):
        claims.main(["--finalize", "1.0", "--results", str(results), "--out-dir",
                     str(tmp_path)])


def test_distilled_djpq_method_is_plain_djpq_config_with_a_teacher() -> None:
    import djpq_compiler as djpq
    from djpq_compiler.workflows import zoo

    claims = _claims()
    single = claims._single_run_module()
    assert "djpq_kd" in claims.METHODS and "djpq_kd" not in claims.ONCE
    assert single.method_config("djpq_kd", zoo.get_model("vgg7")) == djpq.DJPQConfig()
    weight, temperature, config_of = single.DISTILLED["djpq_kd"]
    assert 0 < weight <= 1 and temperature > 0 and config_of == "djpq"
    args = single.build_parser().parse_args(["--model", "vgg7", "--method", "djpq_kd"])
    assert args.method == "djpq_kd"
    points = [{"method": "djpq_kd", "gamma": 8.0, "seeds": 1, "integer_acc": 0.93,
               "gbops": 0.04, "drop_points": 0.9, "bops_reduction": 205.0}]
    verdict = "\n".join(claims._verdict(points, claims.FP32_FINETUNE))
    assert "No DJPQ run stays within 1 point" in verdict  # djpq_kd is not plain DJPQ
    assert "djpq_kd" in verdict and "205.0× at 0.90 points" in verdict and "met)" in verdict


def test_distilled_fp32_finetune_raises_the_bar_of_its_section(tmp_path: Path) -> None:
    claims = _claims()
    base = {"model": "vgg7", "gamma": 1.0, "steps": 10, "djpq_lr": 0.03, "weight_lr": 1e-3,
            "schedule": "cosine", "test_images": 100, "fp32_acc": 0.90, "fp32_gbops": 100.0,
            "checkpoint": "0123456789ab", "seed": 0}
    floats = dict(base, finalize=0.0, gbops=100.0, bops_reduction=1.0, drop_points=-1.0,
                  float_model=True)
    tuned = dict(floats, method="fp32_finetune", integer_acc=0.91, fake_quant_acc=0.91)
    tuned_kd = dict(floats, method="fp32_finetune_kd", integer_acc=0.915, fake_quant_acc=0.915,
                    distill=0.7, distill_temperature=2.0)
    kd = dict(base, method="djpq_kd", finalize=0.3, integer_acc=0.907, fake_quant_acc=0.907,
              gbops=0.4, bops_reduction=250.0, drop_points=-0.7)
    assert "fp32_finetune_kd" in claims.ONCE
    # both float fine-tunes are filed under the default finalize and shared by the 0.3 section
    assert claims._key(tuned_kd) == claims._key(dict(tuned_kd, finalize=0.3))
    assert claims._key(tuned_kd) != claims._key(tuned)
    reference, source = claims.reference_fp32([tuned, tuned_kd])
    assert abs(reference - 0.915) < 1e-12 and source == "fp32_finetune_kd"
    assert claims.reference_fp32([tuned])[0] == 0.91
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in (tuned, tuned_kd, kd)))
    text = claims.summarize(results, tmp_path)
    section = text.split("last 0.3 of the steps")[1]
    assert "(fp32_finetune_kd): 91.50 %" in section and "stronger of the three" in section
    assert "(the distilled fine-tune, 91.50 %)" in section
    # 0.8 points below the distilled fine-tune (91.5 %), not 0.3 below the plain one
    assert "250.0× at 0.80 points" in section


#: method -> (weight min_bits, bind_min_bits, gamma_scale) of every depthwise conv; every other
#: conv keeps the global (2, False, 1.0).
DEPTHWISE_LEVERS = {
    "djpq_dw_w4": (4, False, 1.0),
    "djpq_dw_w4_bound": (4, True, 1.0),
    "djpq_dw_gamma3": (2, False, 3.0),
    "djpq_dw_gamma05": (2, False, 0.5),
}


@pytest.mark.parametrize(("method", "expected"), DEPTHWISE_LEVERS.items())
def test_depthwise_levers_configure_the_depthwise_convs_only(
        method: str, expected: tuple[int, bool, float]) -> None:
    import torch

    import djpq_compiler as djpq
    from djpq_compiler.prepared import prepared_layers
    from djpq_compiler.workflows import zoo

    claims = _claims()
    single = claims._single_run_module()
    assert method in claims.METHODS and method in single.MODEL_METHODS
    assert method not in claims.ONCE and method in claims.LEVERS
    model = zoo.get_model("mobilenetv2")
    depthwise = set(single.depthwise_convs(model))
    cfg = single.method_config(method, model)
    assert cfg.prune and cfg.quantize and not cfg.restricted
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            r = cfg.resolve(name, type(module))
            assert r.weight is not None
            got = (r.weight.min_bits, r.weight.bind_min_bits, r.gamma_scale)
            assert got == (expected if name in depthwise else (2, False, 1.0)), name
    prepared = djpq.prepare(model, torch.randn(2, 1, 28, 28), cfg)
    scales = {r.name: r.gamma_scale for r in prepared_layers(prepared)}
    assert {n for n, s in scales.items() if s != 1.0} == (depthwise if expected[2] != 1.0
                                                           else set())
    with pytest.raises(SystemExit, match="no depthwise conv"):
        single.method_config(method, zoo.get_model("vgg7"))
    points = [{"method": method, "gamma": 8.0, "seeds": 1, "integer_acc": 0.93,
               "gbops": 0.04, "drop_points": 0.9, "bops_reduction": 125.0}]
    verdict = "\n".join(claims._verdict(points, claims.FP32_FINETUNE))
    assert "No DJPQ run stays within 1 point" in verdict  # a lever is not plain DJPQ
    assert f"({method})" in verdict and "125.0× at 0.90 points" in verdict
    assert "not met)" in verdict


def test_activation_floor_lever_binds_three_bits_on_every_learned_activation() -> None:
    """``djpq_a3_bound``: plain DJPQ except that every learned activation quantizer keeps its
    training bit-width at >= 3 (``QuantSpec.bind_min_bits``); weights keep the default floor;
    the network input stays fixed at 8 bits."""
    import torch

    import djpq_compiler as djpq
    from djpq_compiler.prepared import quantizers
    from djpq_compiler.workflows import zoo

    claims = _claims()
    single = claims._single_run_module()
    assert "djpq_a3_bound" in claims.METHODS and "djpq_a3_bound" in claims.LEVERS
    assert "djpq_a3_bound" not in claims.ONCE
    cfg = single.method_config("djpq_a3_bound", zoo.get_model("resnet20"))
    assert cfg.prune and cfg.quantize and not cfg.restricted
    assert (cfg.activation.min_bits, cfg.activation.bind_min_bits) == (3, True)
    assert (cfg.weight.min_bits, cfg.weight.bind_min_bits) == (2, False)
    assert cfg.activation.bits == 8 and cfg.activation.learn_bits
    prepared = djpq.prepare(zoo.get_model("resnet20"), torch.randn(2, 1, 28, 28), cfg)
    acts = {name: q for name, q in quantizers(prepared) if name.startswith("djpq_quant.")}
    assert acts["djpq_quant.a_x"].fixed_bits  # the network input: 8 bits, not learned
    learned = [q for q in acts.values() if not q.fixed_bits]
    assert learned and all((q.min_bits, q.bind_min_bits) == (3, True) for q in learned)
    weights = [q for name, q in quantizers(prepared) if not name.startswith("djpq_quant.")]
    assert weights and not any(q.bind_min_bits for q in weights)


def test_distilled_activation_floor_is_the_floor_config_with_djpq_kd_teacher() -> None:
    """``djpq_a3_kd``: ``djpq_a3_bound``'s config, distilled like ``djpq_kd`` (same weight and
    temperature), and a lever with its own verdict line."""
    from djpq_compiler.workflows import zoo

    claims = _claims()
    single = claims._single_run_module()
    assert "djpq_a3_kd" in claims.METHODS and "djpq_a3_kd" in claims.LEVERS
    assert "djpq_a3_kd" not in claims.ONCE
    model = zoo.get_model("resnet20")
    assert (single.method_config("djpq_a3_kd", model)
            == single.method_config("djpq_a3_bound", model))
    kd, a3_kd = single.DISTILLED["djpq_kd"], single.DISTILLED["djpq_a3_kd"]
    assert (a3_kd.weight, a3_kd.temperature) == (kd.weight, kd.temperature)
    args = single.build_parser().parse_args(["--model", "resnet20", "--method", "djpq_a3_kd"])
    assert args.method == "djpq_a3_kd"


def test_distilled_restricted_is_the_restricted_config_with_djpq_kd_teacher() -> None:
    """``djpq_restricted_kd``: ``djpq_restricted``'s config (power-of-two bits), distilled like
    ``djpq_kd``, and a lever with its own verdict line."""
    from djpq_compiler.workflows import zoo

    claims = _claims()
    single = claims._single_run_module()
    assert "djpq_restricted_kd" in claims.METHODS and "djpq_restricted_kd" in claims.LEVERS
    assert "djpq_restricted_kd" not in claims.ONCE
    model = zoo.get_model("resnet20")
    config = single.method_config("djpq_restricted_kd", model)
    assert config == single.method_config("djpq_restricted", model) and config.restricted
    assert single.DISTILLED["djpq_restricted_kd"][:2] == single.DISTILLED["djpq_kd"][:2]


#: (model, method, gamma, finalize, checkpoint) of committed rows -> BOPs share (%) per layer kind,
#: from ``benchmarks/paper_claims/layers.py`` (the per-layer reading in NOTES.md).
LAYER_SHARES = [
    (("mobilenetv2", "djpq", 12.0, 0.1, "01d749cd6be1"),
     {"depthwise": 14.3, "linear": 0.2, "pointwise": 78.5, "stem": 7.0}),
    (("mobilenetv2", "djpq", 5.0, 0.1, "01d749cd6be1"),
     {"depthwise": 17.3, "linear": 0.1, "pointwise": 77.6, "stem": 5.0}),
    (("vgg7", "djpq_kd", 10.0, 0.3, "0447be57a773"), {"conv": 90.3, "linear": 3.2, "stem": 6.5}),
]


@pytest.mark.parametrize(("key", "expected"), LAYER_SHARES)
def test_layer_shares_reproduce_the_recorded_reduction(key: tuple, expected: dict) -> None:
    import torch

    from djpq_compiler.workflows import zoo

    spec = importlib.util.spec_from_file_location("paper_claims_layers",
                                                  ROOT / "benchmarks/paper_claims/layers.py")
    layers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = layers  # its dataclasses look their module up
    spec.loader.exec_module(layers)
    model, method, gamma, finalize, checkpoint = key
    rows = [json.loads(line) for line in
            (ROOT / "benchmarks/paper_claims/results.jsonl").read_text().splitlines()]
    row = next(r for r in rows if (r["model"], r["method"], r["gamma"], r.get("finalize", 0.1),
                                   r.get("checkpoint")) == key and r.get("seed", 0) == 0
               and r.get("steps") == 700)
    s = layers.shares(row, zoo.get_model(model), torch.zeros(1, 1, 28, 28))
    assert s.estimated_reduction == pytest.approx(s.recorded_reduction, rel=1e-3)
    assert {k: round(100 * v, 1) for k, v in s.by_kind} == expected
    assert sum(la.bops_share for la in s.layers) == pytest.approx(1.0)


def test_overview_lists_the_installed_checkpoints_sections_first(tmp_path: Path) -> None:
    """RESULTS.md opens with one row per section on the installed checkpoint: its stronger FP32,
    DJPQ's largest reduction within 1 point of it (plain or power-of-two restricted, named when
    restricted), the smallest drop at >= 200x and plain DJPQ minus two-stage / DQ-only at equal
    BOPs; sections on other checkpoints follow, marked as such."""
    claims = _claims()
    base = {"model": "vgg7", "steps": 10, "djpq_lr": 0.03, "weight_lr": 1e-3,
            "schedule": "cosine", "test_images": 100, "fp32_acc": 0.90, "fp32_gbops": 100.0,
            "fake_quant_acc": 0.0, "checkpoint": "0123456789ab", "seed": 0, "finalize": 0.1,
            "drop_points": 0.0}

    def run(method: str, gamma: float, acc: float, gbops: float, **kw: Any) -> dict:
        return dict(base, method=method, gamma=gamma, integer_acc=acc, gbops=gbops,
                    bops_reduction=100.0 / gbops, **kw)

    rows = [run("fp32_finetune", 1, 0.91, 100.0, float_model=True),  # the bar: 91 %
            run("djpq", 1, 0.905, 0.8),    # 125x at 0.50: within
            run("djpq_restricted", 2, 0.902, 0.625),  # 160x at 0.80: within, the largest
            run("djpq", 4, 0.895, 0.5),    # 200x at 1.50
            run("djpq", 4, 0.899, 0.5, seed=1),  # mean 89.70 % at 200x: 1.30
            run("two_stage", 0.5, 0.90, 1.0),    # djpq at or below 1.0 GBOPs: 90.5 -> +0.50
            run("dq_only", 6, 0.908, 0.9),       # djpq at or below 0.9: 90.5 -> -0.30
            dict(run("djpq", 1, 0.80, 0.5), checkpoint="ffffffffffff")]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = claims.summarize(results, tmp_path, installed={"vgg7": "0123456789ab"})
    overview = text.split("## Where each net stands on its installed FP32 checkpoint")[1]
    overview = overview.split("\n## ")[0]
    row = next(line for line in overview.splitlines() if line.startswith("| vgg7 |"))
    assert row == ("| vgg7 | 0123456789ab | 10 steps, weight lr 0.001, DJPQ lr 0.03, cosine "
                   "rates | 91.00 % | djpq_restricted 160.0× at 0.80 (γ=2) | none within 1 point | "
                   "1.30 at 200.0× (γ=4, 2 seeds) | +0.50 | -0.30 |")
    assert "ffffffffffff" not in overview
    titles = [line for line in text.splitlines() if line.startswith("## vgg7")]
    assert titles[0].endswith("(checkpoint 0123456789ab)")
    assert titles[1].endswith("(checkpoint ffffffffffff): not the installed checkpoint "
                              "(0123456789ab), kept for the record")


def test_a_stopped_claims_run_resumes_from_its_state_and_cleans_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--state-dir``: a run stopped after its training (here: at the conversion) leaves its
    state, named by the run; the next invocation resumes it without training again and records
    the same row an unstopped run records; every state file goes once its row is written
    (two-stage runs keep one per stage meanwhile; the FP32 fine-tune resumes alike)."""
    from djpq_compiler.errors import DataError
    from djpq_compiler.workflows.data import fashion_mnist_loaders

    try:
        fashion_mnist_loaders(train_subset=8, test_subset=8)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")
    claims = _claims()
    argv = ["--models", "vgg7", "--methods", "djpq", "two_stage", "fp32_finetune",
            "--gammas", "1", "--steps", "4", "--threads", "1", "--train-subset", "256",
            "--test-subset", "64", "--out-dir", str(tmp_path)]
    plain = tmp_path / "plain.jsonl"
    claims.main([*argv, "--results", str(plain)])

    single = claims._single_run_module()
    convert, seen = single.convert, []

    def stopped_once(*args: Any, **kwargs: Any) -> Any:
        if not seen:
            seen.append(1)
            raise KeyboardInterrupt  # the process is stopped after djpq's training
        return convert(*args, **kwargs)

    monkeypatch.setattr(single, "convert", stopped_once)
    monkeypatch.setattr(claims, "_single_run_module", lambda: single)
    state, results = tmp_path / "state", tmp_path / "results.jsonl"
    with pytest.raises(KeyboardInterrupt):
        claims.main([*argv, "--results", str(results), "--state-dir", str(state)])
    left = [p.name for p in state.iterdir()]
    assert len(left) == 1 and left[0].startswith("vgg7-djpq-g1-s0-4-") and not results.exists()
    import torch

    adam_step, steps = torch.optim.Adam.step, []

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        steps.append(1)
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    claims.main([*argv, "--results", str(results), "--state-dir", str(state)])
    assert len(steps) == 2 + 2 + 4  # two_stage's halves and the fine-tune; djpq resumed done
    assert list(state.iterdir()) == []
    fields = ("method", "integer_acc", "fake_quant_acc", "gbops", "bits")
    want = [{k: r[k] for k in fields} for r in map(json.loads, plain.read_text().splitlines())]
    got = [{k: r[k] for k in fields} for r in map(json.loads, results.read_text().splitlines())]
    assert got == want
