"""The scripts in ``examples/`` run and do what they say (quickstart; DDP under torchrun)."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import djpq_compiler as djpq
from djpq_compiler.workflows.data import find_root
from djpq_compiler.workflows.zoo import load_pretrained

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _gbops(out: str, label: str) -> float:
    match = re.search(rf"^{label}: ([0-9.]+) GBOPs", out, re.MULTILINE)
    assert match, f"no '{label}: ... GBOPs' line in:\n{out}"
    return float(match.group(1))


@pytest.mark.parametrize("data", ["fashion-mnist", "synthetic"])
def test_quickstart_compresses_and_exports(data: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    if data == "synthetic":
        monkeypatch.setenv("DJPQ_DATA", str(tmp_path / "no-data-here"))
    elif not find_root().is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--steps", "2", "--out", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert f"data: {'synthetic' if data == 'synthetic' else 'Fashion-MNIST'}; 2 fine-tune" in out
    fp32, ours = _gbops(out, "FP32"), _gbops(out, "DJPQ integer")
    assert fp32 == pytest.approx(djpq.bops(load_pretrained("vgg7"),
                                           torch.zeros(1, 1, 28, 28)).gbops, abs=1e-4)
    assert ours < fp32 / 10  # 8-bit weights and activations at least: 16x fewer
    model = onnx.load(str(tmp_path / "quickstart.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    if data == "fashion-mnist":  # the checkpoint and the short fine-tune keep the accuracy
        acc = float(out.split("DJPQ integer:")[1].split("accuracy ")[1].split(" %")[0])
        assert acc > 80


@pytest.mark.slow  # two torchrun processes importing torch: ~45 s on 2 shared cores
def test_ddp_example_two_processes_stay_in_sync(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(EXAMPLES / "ddp_finetune.py"), "--steps", "4", "--finalize", "0.25",
           "--batch-size", "16", "--train-subset", "256", "--test-subset", "200",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "2 process(es), gloo backend" in out
    finished = dict(re.findall(r"rank (\d)/2 finished 4 steps, parameters ([0-9a-f]{16})", out))
    assert finished.keys() == {"0", "1"}, out
    assert finished["0"] == finished["1"]  # DDP kept the ranks' parameters identical
    initial = re.search(r"initial parameters (\w+)", out)
    assert initial and initial.group(1) != finished["0"]  # and training changed them
    assert len(re.findall(r"^step +\d+ ", out, re.MULTILINE)) == 4  # rank 0 logs every step
    assert _gbops(out, "DJPQ integer") < _gbops(out, "FP32") / 10
    state = torch.load(tmp_path / "prepared.pt", weights_only=True)
    x = torch.zeros(16, 1, 28, 28)
    fresh = djpq.prepare(load_pretrained("vgg7"), x)
    fresh.load_state_dict(state)  # the rank-0 checkpoint is a complete prepared model
    assert djpq.bops(djpq.convert(fresh)).gbops < _gbops(out, "FP32") / 10
    assert (tmp_path / "model.onnx").stat().st_size > 1000
