"""The ``djpq`` command line: bops, demo, argument errors, module entry points."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from djpq_compiler import bops, zoo
from djpq_compiler.cli import main


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
    assert "bops" in out and "demo" in out
