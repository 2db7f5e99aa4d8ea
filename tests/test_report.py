"""``djpq_compiler.workflows.report``: markdown and plots rendered from fake measured numbers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from djpq_compiler.workflows.report import (
    PLOTS,
    DemoResult,
    KernelRow,
    Latency,
    LayerRow,
    kernel_rows,
    layer_rows,
    render_markdown,
    summary,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(**changes: object) -> DemoResult:
    layers = [
        LayerRow("features.0", 8, 8, 1, 1, 12, 16, 7.2e6 * 128, 5.4e6),
        LayerRow("features.3", 4, 6, 12, 16, 9, 16, 115.6e6 * 128, 20.1e6),
        LayerRow("fc2", 32, 32, 256, 256, 10, 10, 0.18e6 * 128, 2.6e6),
    ]
    result = DemoResult(
        model="vgg7", command="djpq demo --model vgg7 --minutes 2",
        settings={"gamma": 1.0, "minutes": 2.0, "train images": 60000},
        fp32_acc=0.9247, fake_quant_acc=0.9012, integer_acc=0.9008, test_images=10000,
        fp32_gbops=7.668, fake_quant_gbops=0.2812, integer_gbops=0.2801, layers=layers,
        train_steps=321, train_seconds=119.6, float_islands=("fc2",),
        integer_agreement={"q1": 0, "q2": 1}, tvm_bit_exact=True, onnx_max_lsb=1,
        latencies=[Latency("TVM (x86)", 1, 0.412, 50), Latency("TVM (x86)", 32, 3.5, 20),
                   Latency("FP32 PyTorch", 1, 1.25, 50), Latency("onnxruntime", 32, None,
                                                                  note="not installed")],
        artifacts={"ONNX": "model.onnx", "TVM library": "model.so"},
        notes=("resnet20 has no checkpoint; used vgg7",))
    for key, value in changes.items():
        setattr(result, key, value)
    return result


def test_markdown_has_accuracies_bops_layers_latency_and_caveat() -> None:
    text = render_markdown(_result())
    assert "djpq demo --model vgg7 --minutes 2" in text
    assert "92.47 %" in text and "90.12 %" in text and "90.08 %" in text
    assert "7.6680" in text and "0.2801" in text
    assert f"**{7.668 / 0.2801:.1f}x**" in text
    assert "| features.3 | 4 | 6 | 12/16 | 9/16 |" in text
    assert "| fc2 | 32 | 32 | 256/256 | 10/10 |" in text
    assert "Float islands (layers left in float in the integer model): fc2" in text
    assert "TVM vs integer reference: bit-exact" in text
    assert "max 1 LSB over 2 activation quantizers (invariant: <= 1 LSB)" in text
    assert "EXCEEDS" not in text
    assert "| TVM (x86) | 1 | 0.412 | 50 |" in text and "not installed" in text
    assert "shared machine" in text
    assert "resnet20 has no checkpoint" in text
    assert "321 steps" in text


def test_markdown_handles_missing_measurements() -> None:
    text = render_markdown(_result(integer_acc=None, integer_gbops=None, tvm_bit_exact=None,
                                   tvm_note="--no-tvm", onnx_max_lsb=None, latencies=(),
                                   integer_agreement={}, float_islands=()))
    assert "BOPs reduction (FP32 / integer): not measured" in text
    assert "TVM vs integer reference: not run (--no-tvm)" in text
    assert "Latency was not measured." in text
    assert "islands (layers left in float in the integer model): none" in text


def test_mismatch_is_not_hidden() -> None:
    res = _result(tvm_bit_exact=False, integer_agreement={"q1": 0, "q_relu": 2})
    text = render_markdown(res)
    assert "MISMATCH" in text and "MISMATCH" in summary(res)
    assert "max 2 LSB" in text and "EXCEEDS the invariant at q_relu" in text


def test_summary_lines() -> None:
    text = summary(_result())
    assert "FP32 92.47 %" in text and "integer 90.08 %" in text and "27.4x fewer BOPs" in text
    assert "latency TVM (x86) batch 1: 0.412 ms" in text


def test_write_report_writes_markdown_and_pngs(tmp_path: Path) -> None:
    paths = write_report(_result(), tmp_path / "run")
    assert paths["report"] == tmp_path / "run" / "report.md"
    assert "90.08 %" in paths["report"].read_text()
    for kind, name in PLOTS.items():
        png = tmp_path / "run" / name
        assert paths[kind] == png
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000


def test_accuracy_plot_skips_unmeasured_points(tmp_path: Path) -> None:
    paths = write_report(_result(fake_quant_acc=None, integer_gbops=None), tmp_path)
    assert paths["accuracy"].read_bytes().startswith(PNG_MAGIC)


def test_layer_rows_from_bops_rows() -> None:
    row = SimpleNamespace(name="conv", b_w=4.0, b_a=8.0, in_kept=3, in_total=4, out_kept=5,
                          out_total=8, macs_fp=1000, bops=15 * 32.0)
    (got,) = layer_rows([row])
    assert got == LayerRow("conv", 4.0, 8.0, 3.0, 4, 5.0, 8, 1000 * 32 * 32.0, 480.0)


@pytest.mark.parametrize("changes", [{"integer_gbops": 0.0}])
def test_zero_bops_reduction_is_not_measured(changes: dict[str, object]) -> None:
    assert _result(**changes).reduction is None


def test_kernel_rows_from_build_records() -> None:
    """The TVM build's per-layer records (``compiled.kernels``) become report rows: the bound
    for a written kernel, the reason for the default one; missing attributes stay empty."""
    records = [SimpleNamespace(layer="conv1", op="conv2d", variant="avx2_u8s8_p4",
                               bound="2*4*255*8 <= 32767", note="", macs=3_000_000),
               SimpleNamespace(layer="fc", op="linear", variant="default", bound="",
                               note="signed activations", macs=1_000_000),
               SimpleNamespace(layer="odd", variant="avx2_s16")]
    assert kernel_rows(records) == [
        KernelRow("conv1", "conv2d", "avx2_u8s8_p4", 3_000_000, "2*4*255*8 <= 32767"),
        KernelRow("fc", "linear", "default", 1_000_000, "signed activations"),
        KernelRow("odd", "", "avx2_s16", 0, "")]


def test_kernel_table_only_when_the_build_recorded_kernels() -> None:
    assert "TVM kernel per layer" not in render_markdown(_result())
    assert "TVM kernels" not in summary(_result())
    kernels = (KernelRow("features.0", "conv2d", "avx2_u8s8_p4", 3_000_000, "P=4 bound"),
               KernelRow("fc2", "linear", "default", 1_000_000, "float island"))
    text = render_markdown(_result(tvm_kernels=kernels))
    assert "## TVM kernel per layer" in text
    assert "| features.0 | conv2d | avx2_u8s8_p4 | 3.00 | P=4 bound |" in text
    assert "| fc2 | linear | default | 1.00 | float island |" in text
    assert "1 of 2 layers, 75.0 % of the MACs, run in written kernels" in text
    assert "TVM kernels: 1 of 2 layers, 75.0 %" in summary(_result(tvm_kernels=kernels))


def test_kernel_table_shows_layouts_and_epilogues_when_recorded() -> None:
    """A build that recorded layouts and epilogue forms gets both columns; a layer without an
    epilogue (TVM's default lowering) shows "-" there."""
    kernels = (KernelRow("features.0", "conv2d", "avx2_u8s8_p4", 3_000_000, "P=4 bound",
                         "NCHW -> NCHW8c", "int32 requantization"),
               KernelRow("fc2", "linear", "default", 1_000_000, "float island", "NCHW -> NCHW"))
    text = render_markdown(_result(tvm_kernels=kernels))
    assert ("| layer | op | TVM kernel | MMACs | layout in -> out | epilogue | exact because / "
            "why the default |") in text
    assert ("| features.0 | conv2d | avx2_u8s8_p4 | 3.00 | NCHW -> NCHW8c | int32 "
            "requantization | P=4 bound |") in text
    assert "| fc2 | linear | default | 1.00 | NCHW -> NCHW | - | float island |" in text
