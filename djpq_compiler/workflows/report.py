"""The ``djpq demo`` report: markdown and plots from numbers that were already measured.

Everything here is a pure function of a :class:`DemoResult` (plain numbers and strings), so the
report is testable without training, converting or compiling anything. :func:`write_report`
writes ``report.md`` and the PNG plots into a run folder::

    result = DemoResult(model="vgg7", command="djpq demo", ...)
    paths = write_report(result, Path("runs/demo-vgg7"))
    print(summary(result))

Plots use matplotlib's ``Agg`` backend (no display needed); matplotlib is the ``plots`` extra.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from djpq_compiler.errors import MissingExtraError

__all__ = ["LayerRow", "Latency", "KernelRow", "DemoResult", "layer_rows", "kernel_rows",
           "render_markdown", "summary", "plot_bits", "plot_bops", "plot_accuracy",
           "write_report", "PLOTS"]

#: Plot file names written by :func:`write_report`.
PLOTS = {"bits": "layer_bits.png", "bops": "layer_bops.png", "accuracy": "accuracy_vs_gbops.png"}


@dataclass(frozen=True)
class LayerRow:
    """One conv/linear layer of the deployed model.

    Attributes:
        name: Layer name (module path).
        b_w: Weight bits (32 for a float layer).
        b_a: Input activation bits (32 for a float layer).
        in_kept, in_total: Input channels kept / in the original model.
        out_kept, out_total: Output channels kept / in the original model.
        bops_fp32: BOPs of the original layer at 32x32 bits.
        bops: BOPs of the deployed layer.
    """

    name: str
    b_w: float
    b_a: float
    in_kept: float
    in_total: int
    out_kept: float
    out_total: int
    bops_fp32: float
    bops: float


@dataclass(frozen=True)
class Latency:
    """Median latency of one executor at one batch size, in milliseconds (``None``: not run)."""

    executor: str
    batch: int
    median_ms: float | None
    runs: int = 0
    note: str = ""


@dataclass(frozen=True)
class KernelRow:
    """The TVM kernel one integer conv/linear layer got (from the build's per-layer records).

    Attributes:
        layer: Layer (fx node) name.
        op: ``"conv2d"``, ``"linear"``, ...
        kernel: The kernel variant (``"default"``: TVM's generic lowering).
        macs: Multiply-accumulates of one call.
        reason: Why it is exact (the bound it relies on), or why no written kernel applies.
        layout: ``"NCHW -> NCHW16c"``: the layouts the kernel read and wrote (empty when the
            build did not record them).
        epilogue: How the kernel requantized (``"int32 requantization"``, ``"int64
            requantization"``, ``"int32 accumulator"``; empty when not recorded).
    """

    layer: str
    op: str
    kernel: str
    macs: int
    reason: str
    layout: str = ""
    epilogue: str = ""


@dataclass
class DemoResult:
    """Every number the demo measured (the input of the report).

    Accuracies are fractions in ``[0, 1]``; ``None`` means "not measured" and is rendered as such.
    """

    model: str
    command: str
    settings: dict[str, Any]
    fp32_acc: float
    fake_quant_acc: float | None
    integer_acc: float | None
    test_images: int
    fp32_gbops: float
    fake_quant_gbops: float | None
    integer_gbops: float | None
    layers: Sequence[LayerRow]
    train_steps: int = 0
    train_seconds: float = 0.0
    float_islands: Sequence[str] = ()
    lookup_tables: Sequence[str] = ()
    integer_agreement: dict[str, int] = field(default_factory=dict)
    tvm_bit_exact: bool | None = None
    tvm_note: str = ""
    tvm_kernels: Sequence[KernelRow] = ()
    onnx_max_lsb: int | None = None
    onnx_note: str = ""
    latencies: Sequence[Latency] = ()
    artifacts: dict[str, str] = field(default_factory=dict)
    notes: Sequence[str] = ()
    dataset: str = "Fashion-MNIST"
    title: str = "DJPQ demo"

    @property
    def reduction(self) -> float | None:
        """FP32 GBOPs / integer-model GBOPs (``None`` if the integer model was not measured)."""
        if not self.integer_gbops:
            return None
        return self.fp32_gbops / self.integer_gbops


def layer_rows(rows: Iterable[Any]) -> list[LayerRow]:
    """:class:`LayerRow` s from :class:`~djpq_compiler.bops.BopsRow` s of a converted model.

    The FP32 BOPs of each layer come from its original MAC count (``macs_fp``) times 32x32.
    """
    return [LayerRow(name=r.name, b_w=float(r.b_w), b_a=float(r.b_a), in_kept=float(r.in_kept),
                     in_total=int(r.in_total), out_kept=float(r.out_kept),
                     out_total=int(r.out_total), bops_fp32=float(r.macs_fp) * 32 * 32,
                     bops=float(r.bops)) for r in rows]


def kernel_rows(records: Iterable[Any]) -> list[KernelRow]:
    """:class:`KernelRow` s from a TVM build's per-layer kernel records (``compiled.kernels``:
    objects with ``layer``, ``op``, ``variant``, ``macs`` and ``bound``/``note``); attributes a
    record lacks are left empty."""
    rows = []
    for rec in records:
        variant = str(getattr(rec, "variant", "?"))
        why = getattr(rec, "note" if variant == "default" else "bound", "") or ""
        layout = (f"{rec.in_layout} -> {rec.out_layout}"
                  if hasattr(rec, "in_layout") and hasattr(rec, "out_layout") else "")
        rows.append(KernelRow(layer=str(getattr(rec, "layer", "?")),
                              op=str(getattr(rec, "op", "")), kernel=variant,
                              macs=int(getattr(rec, "macs", 0) or 0), reason=str(why),
                              layout=layout, epilogue=str(getattr(rec, "epilogue", "") or "")))
    return rows


# ----------------------------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "not measured" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "not measured" if value is None else format(value, fmt)


def _count(value: float) -> str:
    return f"{value:g}"


def _layer_table(layers: Sequence[LayerRow]) -> list[str]:
    lines = ["| layer | b_w | b_a | in kept | out kept | MBOPs FP32 | MBOPs deployed | share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    total = sum(r.bops for r in layers) or 1.0
    for r in layers:
        lines.append(f"| {r.name} | {r.b_w:g} | {r.b_a:g} | {_count(r.in_kept)}/{r.in_total} | "
                     f"{_count(r.out_kept)}/{r.out_total} | {r.bops_fp32 / 1e6:.2f} | "
                     f"{r.bops / 1e6:.2f} | {100 * r.bops / total:.1f} % |")
    return lines


def _latency_table(latencies: Sequence[Latency]) -> list[str]:
    if not latencies:
        return ["Latency was not measured."]
    lines = ["| executor | batch | median ms | runs | note |", "|---|---:|---:|---:|---|"]
    for lat in latencies:
        ms = "—" if lat.median_ms is None else f"{lat.median_ms:.3f}"
        lines.append(f"| {lat.executor} | {lat.batch} | {ms} | {lat.runs} | {lat.note} |")
    return lines


def _kernel_table(kernels: Sequence[KernelRow]) -> list[str]:
    """The per-layer kernel table; the layout and epilogue columns only when the build recorded
    them."""
    heads = ["layer", "op", "TVM kernel", "MMACs"]
    cells = [[k.layer, k.op, k.kernel, f"{k.macs / 1e6:.2f}"] for k in kernels]
    for head, attr in (("layout in -> out", "layout"), ("epilogue", "epilogue")):
        if any(getattr(k, attr) for k in kernels):
            heads.append(head)
            for row, k in zip(cells, kernels, strict=True):
                row.append(getattr(k, attr) or "-")
    heads.append("exact because / why the default")
    for row, k in zip(cells, kernels, strict=True):
        row.append(k.reason)
    align = ["---", "---", "---", "---:"] + ["---"] * (len(heads) - 4)
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return lines + ["", _kernel_share(kernels)]


def _kernel_share(kernels: Sequence[KernelRow]) -> str:
    total = sum(k.macs for k in kernels) or 1
    written = [k for k in kernels if k.kernel != "default"]
    return (f"{len(written)} of {len(kernels)} layers, "
            f"{100 * sum(k.macs for k in written) / total:.1f} % of the MACs, run in written "
            "kernels; the rest in TVM's default lowering")


def _agreement_lines(result: DemoResult) -> list[str]:
    lines = []
    if result.integer_agreement:
        worst = max(result.integer_agreement.values())
        flag = "" if worst <= 1 else f"; EXCEEDS the invariant at {_worst(result)}"
        lines.append(f"- fake-quant (snapped) vs integer reference: max {worst} LSB over "
                     f"{len(result.integer_agreement)} activation quantizers "
                     f"(invariant: <= 1 LSB{flag})")
    else:
        lines.append("- fake-quant vs integer reference: not measured")
    if result.tvm_bit_exact is None:
        lines.append(f"- TVM vs integer reference: not run{_note(result.tvm_note)}")
    else:
        verdict = "bit-exact" if result.tvm_bit_exact else "MISMATCH (not bit-exact)"
        lines.append(f"- TVM vs integer reference: {verdict}{_note(result.tvm_note)}")
    if result.onnx_max_lsb is None:
        lines.append(f"- onnxruntime vs integer reference: not run{_note(result.onnx_note)}")
    else:
        lines.append(f"- onnxruntime vs integer reference: max {result.onnx_max_lsb} LSB per op, "
                     "each op run on the reference's input codes (invariant: <= 1 LSB)"
                     f"{_note(result.onnx_note)}")
    return lines


def _worst(result: DemoResult) -> str:
    return ", ".join(k for k, v in result.integer_agreement.items() if v > 1)


def _note(text: str) -> str:
    return f" ({text})" if text else ""


def render_markdown(result: DemoResult) -> str:
    """The full ``report.md`` text."""
    red = result.reduction
    lines = [f"# {result.title}: {result.model} on {result.dataset}", "",
             "## What was run", "", "```", result.command, "```", ""]
    lines += [f"- {k}: {v}" for k, v in result.settings.items()]
    lines += [f"- fine-tune: {result.train_steps} steps in {result.train_seconds:.0f} s", ""]
    lines += [f"- note: {n}" for n in result.notes]
    lines += ["", "## Accuracy and BOPs", "",
              f"Top-1 accuracy on {result.test_images} {result.dataset} test images.", "",
              "| model | accuracy | GBOPs |", "|---|---:|---:|",
              f"| FP32 checkpoint | {_pct(result.fp32_acc)} | {result.fp32_gbops:.4f} |",
              f"| DJPQ fake-quant (prepared) | {_pct(result.fake_quant_acc)} | "
              f"{_num(result.fake_quant_gbops)} |",
              f"| DJPQ integer (converted, reference executor) | {_pct(result.integer_acc)} | "
              f"{_num(result.integer_gbops)} |", "",
              "BOPs reduction (FP32 / integer): "
              + ("not measured" if red is None else f"**{red:.1f}x**"), "",
              "## Per-layer bits and kept channels", ""]
    lines += _layer_table(result.layers)
    islands = ", ".join(result.float_islands) if result.float_islands else "none"
    tables = ", ".join(result.lookup_tables) if result.lookup_tables else "none"
    lines += ["", f"Float islands (layers left in float in the integer model): {islands}", "",
              f"Integer lookup tables (elementwise functions of codes, exact): {tables}", "",
              "## Integer agreement", ""]
    lines += _agreement_lines(result)
    lines += ["", "## Latency", "",
              "Median wall-clock time per call after warm-up. **Caveat:** measured on a shared "
              "machine under other load; treat these as rough, relative numbers.", ""]
    lines += _latency_table(result.latencies)
    if result.tvm_kernels:
        lines += ["", "## TVM kernel per layer", "",
                  "The kernel the TVM build selected for each integer conv/linear layer (the "
                  "fastest variant that is provably exact for the layer's bit-widths on this "
                  "target).", ""]
        lines += _kernel_table(result.tvm_kernels)
    lines += ["", "## Files", ""]
    lines += [f"- {k}: `{v}`" for k, v in result.artifacts.items()]
    lines += [f"- plot: `{name}`" for name in PLOTS.values()]
    return "\n".join(lines) + "\n"


def summary(result: DemoResult) -> str:
    """A few console lines: accuracies, GBOPs, agreement."""
    red = result.reduction
    lines = [f"{result.model}: FP32 {_pct(result.fp32_acc)} @ {result.fp32_gbops:.4f} GBOPs | "
             f"fake-quant {_pct(result.fake_quant_acc)} | integer {_pct(result.integer_acc)} @ "
             f"{_num(result.integer_gbops)} GBOPs"
             + ("" if red is None else f" ({red:.1f}x fewer BOPs)")]
    lines += [line[2:] for line in _agreement_lines(result)]
    if result.tvm_kernels:
        lines.append("TVM kernels: " + _kernel_share(result.tvm_kernels))
    for lat in result.latencies:
        if lat.median_ms is not None:
            lines.append(f"latency {lat.executor} batch {lat.batch}: {lat.median_ms:.3f} ms")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError("plots need matplotlib: pip install 'djpq-compiler[plots]'"
                                ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bits(layers: Sequence[LayerRow], path: Path) -> Path:
    """Per-layer weight/activation bits (top) and kept output-channel fraction (bottom)."""
    plt = _pyplot()
    names = [r.name for r in layers]
    xs = range(len(layers))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.6 * len(layers)), 6), sharex=True)
    width = 0.4
    top.bar([x - width / 2 for x in xs], [r.b_w for r in layers], width, label="weight bits")
    top.bar([x + width / 2 for x in xs], [r.b_a for r in layers], width, label="activation bits")
    top.set_ylabel("bits")
    top.set_ylim(0, 1.4 * max([r.b_w for r in layers] + [r.b_a for r in layers] + [1]))
    top.legend(loc="upper right", ncols=2)
    top.set_title("Per-layer bit-widths and kept channels")
    kept = [r.out_kept / r.out_total if r.out_total else 1.0 for r in layers]
    bottom.bar(list(xs), kept, color="tab:green")
    for x, r in zip(xs, layers, strict=True):
        bottom.text(x, 0.02, f"{_count(r.out_kept)}/{r.out_total}", ha="center", rotation=90,
                    fontsize=7)
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("kept output channels")
    bottom.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    return _save(fig, plt, path)


def plot_bops(layers: Sequence[LayerRow], path: Path) -> Path:
    """BOPs per layer before (FP32) and after DJPQ, log scale."""
    plt = _pyplot()
    xs = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers)), 4))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [r.bops_fp32 / 1e6 for r in layers], width, label="FP32")
    ax.bar([x + width / 2 for x in xs], [max(r.bops, 1.0) / 1e6 for r in layers], width,
           label="DJPQ")
    ax.set_yscale("log")
    ax.set_ylabel("MBOPs")
    ax.set_title("BOPs per layer before/after")
    ax.set_xticks(list(xs), [r.name for r in layers], rotation=60, ha="right", fontsize=7)
    ax.legend()
    return _save(fig, plt, path)


def plot_accuracy(result: DemoResult, path: Path) -> Path:
    """Test accuracy against GBOPs: the FP32 point and the DJPQ point(s)."""
    plt = _pyplot()
    points = [("FP32", result.fp32_gbops, result.fp32_acc, "s"),
              ("DJPQ fake-quant", result.fake_quant_gbops, result.fake_quant_acc, "^"),
              ("DJPQ integer", result.integer_gbops, result.integer_acc, "o")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, gbops, acc, marker in points:
        if gbops is None or acc is None or not math.isfinite(gbops) or gbops <= 0:
            continue
        ax.scatter([gbops], [100 * acc], marker=marker, s=60, label=label)
        ax.annotate(f"{100 * acc:.1f} %", (gbops, 100 * acc), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("GBOPs (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result.model}: accuracy vs GBOPs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(result: DemoResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` and the plots into ``out_dir``; returns ``{kind: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"bits": plot_bits(result.layers, out / PLOTS["bits"]),
             "bops": plot_bops(result.layers, out / PLOTS["bops"]),
             "accuracy": plot_accuracy(result, out / PLOTS["accuracy"])}
    report = out / "report.md"
    report.write_text(render_markdown(result))
    paths["report"] = report
    return paths
