"""The ``djpq`` command line: bops, demo, argument errors, module entry points."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from djpq_compiler import ConfigError, analyze, bops, prepare
from djpq_compiler.cli import main
from djpq_compiler.workflows import zoo
from djpq_compiler.workflows.demo import demo_model


def test_bops_zoo_model_prints_table_and_total(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bops", "--model", "vgg7"]) == 0
    out = capsys.readouterr().out
    report = bops(zoo.vgg7(), torch.randn(1, 1, 28, 28))
    assert "features.0" in out and "fc2" in out
    assert f"total {report.gbops:.4f} GBOPs" in out
    assert f"MACs {report.macs / 1e6:.2f} M" in out


def test_bops_bits_and_user_factory(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bops", "--model", "djpq_compiler.workflows.zoo:resnet20", "--input-shape", "1,1,32,32",
            "--weight-bits", "8", "--act-bits", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = bops(zoo.resnet20(), torch.randn(1, 1, 32, 32), weight_bits=8, act_bits=8)
    assert f"total {report.gbops:.4f} GBOPs" in out and "16.0x fewer" in out


@pytest.mark.parametrize("argv", [
    ["bops", "--model", "alexnet"],
    ["bops", "--model", "vgg7", "--input-shape", "1,x"],
    ["bops", "--model", "vgg7", "--weight-bits", "64"],
    ["bops"],
    ["analyze"],
    ["analyze", "--model", "alexnet"],
    ["demo", "--minutes", "-1"],
    ["demo", "--minutes", "soon"],
    ["demo", "--train-subset", "0"],
    ["demo", "--model", "djpq_compiler.workflows.zoo:vgg7"],
    ["demo", "--frobnicate"],
    ["frobnicate"],
    [],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_unloadable_factory_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bops", "--model", "djpq_compiler.workflows.zoo:no_such_model"]) == 1
    err = capsys.readouterr().err
    assert "no_such_model" in err and "module:function" in err


def test_demo_without_data_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DJPQ_DATA", str(tmp_path))
    assert main(["demo", "--no-progress"]) == 1
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("module", ["djpq_compiler", "djpq_compiler.cli"])
def test_python_dash_m_entry_points(module: str, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # runpy is what `python -m` does, without paying for a second torch import
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "bops" in out and "demo" in out and "analyze" in out


def test_analyze_prints_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--model", "resnet20", "--input-shape", "1,1,32,32"]) == 0
    out = capsys.readouterr().out
    expected = analyze(zoo.resnet20(), torch.randn(1, 1, 32, 32)).summary()
    assert out == f"resnet20 on input (1, 1, 32, 32)\n{expected}\n"


def test_analyze_user_factory_error_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--model", "no_such_module_xyz:f"]) == 1
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_demo_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--minutes", "--steps", "--gamma", "--train-subset", "--test-subset",
                 "--out", "--no-tvm", "--no-onnx", "--seed", "--latency-runs", "--data"):
        assert flag in out
    assert "report.md" in out


def test_demo_falls_back_when_resnet20_has_no_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    available = {"mobilenetv2"}
    monkeypatch.setattr(zoo, "checkpoint_path",
                        lambda name: Path(__file__) if name in available else tmp_path / "x.pt")
    name, notes = demo_model(None)
    assert name == "mobilenetv2" and "resnet20" in notes[0]
    assert "running the demo on mobilenetv2" in capsys.readouterr().err
    assert demo_model("vgg7") == ("vgg7", [])  # an explicit choice is never replaced
    available.add("resnet20")
    assert demo_model(None) == ("resnet20", [])


@pytest.mark.slow  # ~90 s on 2 shared cores (two TVM builds, 200-image evaluations)
def test_demo_end_to_end_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "run"
    argv = ["demo", "--model", "vgg7", "--steps", "2", "--train-subset", "256",
            "--test-subset", "200", "--latency-runs", "2", "--out", str(out_dir), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    text = (out_dir / "report.md").read_text()
    assert f"report: {out_dir / 'report.md'}" in out
    assert "djpq " + " ".join(argv) in text
    for line in out.splitlines():  # the accuracies printed are the ones in the report
        if line.startswith(("[fp32]", "[fake-quant]", "[integer]")):
            acc = line.split("accuracy ")[1].split(" %")[0]
            assert f"| {acc} % |" in text
    assert "Top-1 accuracy on 200 Fashion-MNIST test images" in text
    assert "TVM vs integer reference: bit-exact" in text
    assert "onnxruntime vs integer reference: max" in text
    for name in ("model.onnx", "model_tvm.so", "layer_bits.png", "layer_bops.png",
                 "accuracy_vs_gbops.png"):
        assert (out_dir / name).stat().st_size > 1000
    assert (out_dir / "layer_bits.png").read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------ djpq compress

USER_MODULE = '''
import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def rgb():
    torch.manual_seed(0)
    return SmallCNN(3)


def gray():
    torch.manual_seed(0)
    return SmallCNN(1)


def flat16():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))


def ten_classes():
    return SmallCNN(3, classes=10)


def not_a_module():
    return 42


def broken():
    raise FileNotFoundError("weights/small.pt")
'''

CLASSES = ("blue", "green", "red")


def _write_image_folder(root: Path, per_class: dict[str, int], mode: str = "RGB",
                        size: tuple[int, int] = (20, 18)) -> Path:
    """``root/<split>/<class>/*.png``: each class a noisy image of its own dominant colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for channel, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8)
                pixels[..., 2 - channel] += 150  # "blue" is channel 2, "red" channel 0
                Image.fromarray(pixels).convert(mode).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def user_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the current directory with ``user_cnn.py`` and ``images/``."""
    (tmp_path / "user_cnn.py").write_text(USER_MODULE)
    _write_image_folder(tmp_path / "images", {"train": 12, "val": 4})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the cwd; undo it afterwards
    monkeypatch.delitem(sys.modules, "user_cnn", raising=False)
    return tmp_path


def test_compress_user_model_end_to_end(user_project: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = user_project / "run"
    argv = ["compress", "--model", "user_cnn:rgb", "--data", "images", "--input-shape",
            "1,3,16,16", "--steps", "3", "--batch-size", "8", "--latency-runs", "1", "--no-tvm",
            "--no-progress", "--out", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    text = (out_dir / "report.md").read_text()
    assert text.startswith("# djpq compress: user_cnn:rgb on images/val\n")
    assert "djpq " + " ".join(argv) in text
    assert "Top-1 accuracy on 12 images/val test images." in text
    assert "Fashion-MNIST" not in text
    assert "(36 images, 3 classes); evaluated on images/val (12 images)" in text
    assert "resize to 16x16, RGB, normalize mean (" in text and "computed on 36 training" in text
    assert "fine-tune: 3 steps" in text
    for line in out.splitlines():  # the accuracies printed are the ones in the report
        if line.startswith(("[fp32]", "[fake-quant]", "[integer]")):
            acc = line.split("accuracy ")[1].split(" %")[0]
            assert f"| {acc} % |" in text
    fewer = float(out.split("GBOPs (")[1].split("x fewer")[0])
    assert fewer > 4  # W8A8 at least: 32x32 / (8x8) = 16x on every layer but the 8-bit input
    assert "onnxruntime vs integer reference: max" in text and "skipped (--no-tvm)" in text
    assert (out_dir / "model.onnx").stat().st_size > 1000
    from djpq_compiler.plan import CompressionPlan

    assert CompressionPlan.load(out_dir / "plan.json").layers.keys() >= {"fc"}
    state = torch.load(out_dir / "prepared.pt", weights_only=True)
    import user_cnn  # the module the CLI imported from the current directory

    fresh = prepare(user_cnn.rgb(), torch.zeros(1, 3, 16, 16))
    fresh.load_state_dict(state)  # strict: the saved state is a full prepared model


def test_compress_grayscale_file_factory_inferred_shape(
        user_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gray = _write_image_folder(user_project / "gray", {"train": 4, "test": 2}, mode="L",
                               size=(14, 12))
    argv = ["compress", "--model", str(user_project / "user_cnn.py") + ":gray", "--data",
            str(gray), "--steps", "1", "--batch-size", "4", "--latency-runs", "1", "--no-tvm",
            "--no-onnx", "--mean", "0.5", "--std", "0.25", "--no-progress", "--out", "g"]
    assert main(argv) == 0
    text = (user_project / "g" / "report.md").read_text()
    assert "- input shape: 1,1,12,14" in text
    assert "resize to 12x14, grayscale, normalize mean (0.5000) std (0.2500) (given)" in text
    assert f"evaluated on {gray / 'test'} (6 images)" in text


def test_compress_transforms_and_class_remap(tmp_path: Path) -> None:
    from djpq_compiler.workflows.compress import (
        channel_stats,
        find_splits,
        image_folders,
        image_transform,
    )

    root = _write_image_folder(tmp_path, {"train": 3, "val": 2})
    for path in (root / "val" / "blue").iterdir():  # val lacks a class: indices must not shift
        path.unlink()
    (root / "val" / "blue").rmdir()
    train, held_out = image_folders(*find_splits(root))
    assert held_out.classes == list(CLASSES)
    assert sorted(set(held_out.targets)) == [1, 2]  # green, red as in train, not 0, 1
    train.transform = image_transform((1, 1, 8, 6))
    assert train[0][0].shape == (1, 8, 6)
    train.transform = image_transform((1, 3, 8, 6))
    mean, std = channel_stats(train)
    assert len(mean) == 3 and all(0 < m < 1 for m in mean) and min(std) > 0
    train.transform = image_transform((1, 3, 8, 6), mean, std)
    pixels = torch.stack([train[i][0] for i in range(len(train))])
    torch.testing.assert_close(pixels.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("extra", "code", "needle"), [
    (["--model", "no_such_mod_xyz:f"], 1, "no_such_mod_xyz"),
    (["--model", "user_cnn:no_such_function"], 1, "no_such_function"),
    (["--model", "user_cnn:not_a_module"], 1, "returned int, not a torch.nn.Module"),
    (["--model", "user_cnn:broken"], 1, "raised FileNotFoundError: weights/small.pt"),
    (["--model", "missing_file.py:f"], 1, "no file missing_file.py"),
    (["--model", "user_cnn:ten_classes"], 1, "returns 10 logits but the training folder has 3"),
    (["--model", "user_cnn:flat16", "--input-shape", "1,3,8,8"], 1, "fails on input shape"),
    (["--model", "user_cnn:flat16"], 1, "fails on input shape 1,3,18,20"),  # inferred
    (["--input-shape", "1,2,16,16"], 1, "C = 1 or 3"),
    (["--input-shape", "3,16,16"], 1, "N,C,H,W"),
    (["--input-shape", "1,3,x"], 2, "invalid shape"),
    (["--data", "no_such_dir"], 1, "no_such_dir does not exist"),
    (["--data", "images/train"], 1, "has no train/ folder"),
    (["--weights", "nope.pt"], 1, "cannot load weights nope.pt"),
    (["--mean", "0.5"], 1, "give both mean and std"),
    (["--mean", "0.5,0.5", "--std", "1,1"], 1, "1 or 3 values"),
    (["--model", "user_cnn"], 2, "module:function"),
    (["--steps", "0"], 2, "positive integer"),
])
def test_compress_bad_arguments_one_line(user_project: Path, extra: list[str], code: int,
                                         needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compress", "--model", "user_cnn:rgb", "--data", "images", "--no-progress", *extra]
    if code == 2:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    else:
        assert main(argv) == 1
    captured = capsys.readouterr()
    assert needle in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    if code == 1:
        assert captured.err.count("\n") == 1 and captured.err.startswith("djpq compress: error:")
    assert not (user_project / "runs").exists()


def test_compress_missing_split_and_required_args(user_project: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _write_image_folder(user_project / "only_train", {"train": 1})
    assert main(["compress", "--model", "user_cnn:rgb", "--data", "only_train"]) == 1
    assert "no val/ or test/ folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["compress", "--model", "user_cnn:rgb"])
    assert info.value.code == 2 and "--data" in capsys.readouterr().err


def test_compress_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compress", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--input-shape", "--weights", "--mean", "--std",
                 "--workers", "--minutes", "--steps", "--gamma", "--train-subset",
                 "--test-subset", "--batch-size", "--out", "--no-tvm", "--no-onnx", "--seed",
                 "--latency-runs", "--no-progress"):
        assert flag in out
    assert "ImageFolder" in out and "val" in out


def test_options_are_validated() -> None:
    from djpq_compiler.workflows.compress import CompressOptions
    from djpq_compiler.workflows.demo import DemoOptions

    with pytest.raises(ConfigError, match="minutes"):
        DemoOptions(minutes=float("nan"))
    with pytest.raises(ConfigError, match="test_subset"):
        DemoOptions(test_subset=0)
    with pytest.raises(ConfigError, match="std values"):
        CompressOptions(model="m:f", data=".", mean=(0.5,), std=(0.0,))
    assert CompressOptions(model="m:f", data=".").batch_size == 32


def test_run_demo_from_python(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from djpq_compiler.workflows.data import find_root
    from djpq_compiler.workflows.demo import DemoOptions, run_demo

    if not find_root().is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    options = DemoOptions(model="vgg7", steps=1, train_subset=64, test_subset=50, batch_size=32,
                          latency_runs=1, tvm=False, onnx=False, progress=False, out=tmp_path)
    outcome = run_demo(options)
    assert outcome.ok and outcome.report == tmp_path / "report.md"
    result = outcome.result
    assert result.model == "vgg7" and result.train_steps == 1 and result.test_images == 50
    assert result.integer_gbops is not None and result.integer_gbops < result.fp32_gbops / 10
    assert result.tvm_bit_exact is None and result.onnx_max_lsb is None
    text = outcome.report.read_text()
    assert "run_demo(DemoOptions(" in text and "model='vgg7'" in text
    assert f"report: {outcome.report}" in capsys.readouterr().out
    assert {"plan.json", "prepared.pt"} <= {p.name for p in tmp_path.iterdir()}
