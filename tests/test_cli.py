"""The ``djpq`` command line: bops, demo, argument errors, module entry points."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from djpq_compiler import analyze, bops, zoo
from djpq_compiler.cli import _demo_model, main


def test_bops_zoo_model_prints_table_and_total(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bops", "--model", "vgg7"]) == 0
    out = capsys.readouterr().out
    report = bops(zoo.vgg7(), torch.randn(1, 1, 28, 28))
    assert "features.0" in out and "fc2" in out
    assert f"total {report.gbops:.4f} GBOPs" in out
    assert f"MACs {report.macs / 1e6:.2f} M" in out


def test_bops_bits_and_user_factory(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bops", "--model", "djpq_compiler.zoo:resnet20", "--input-shape", "1,1,32,32",
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
    ["demo", "--model", "djpq_compiler.zoo:vgg7"],
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
    assert main(["bops", "--model", "djpq_compiler.zoo:no_such_model"]) == 1
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
    name, notes = _demo_model(None)
    assert name == "mobilenetv2" and "resnet20" in notes[0]
    assert "running the demo on mobilenetv2" in capsys.readouterr().err
    assert _demo_model("vgg7") == ("vgg7", [])  # an explicit choice is never replaced
    available.add("resnet20")
    assert _demo_model(None) == ("resnet20", [])


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
