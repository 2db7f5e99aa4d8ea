"""Plain-text table of the kernel each layer got (``CompiledModel.kernel_report()``)."""

from __future__ import annotations

from collections.abc import Sequence

from .select import KernelChoice

__all__ = ["kernel_table"]


def _why(c: KernelChoice) -> str:
    """The bound a written kernel relies on (for a pixels-in-lanes kernel also why it was
    chosen over the channel-lane kernel), or why the layer fell back to ``default``."""
    if c.variant == "default":
        return c.note
    return f"{c.bound} [{c.preferred}]" if c.preferred else c.bound


def kernel_table(choices: Sequence[KernelChoice]) -> str:
    """One line per layer: name, op, variant, MACs, input -> output layout, epilogue (how the
    written kernel requantized), and the bound (or why it fell back)."""
    if not choices:
        return "no integer conv/linear layers"
    rows = [("layer", "op", "kernel", "MACs", "layout in -> out", "epilogue",
             "exact because / why default")]
    rows += [(c.layer, c.op, c.variant, f"{c.macs:,}", f"{c.in_layout} -> {c.out_layout}",
              c.epilogue or "-", _why(c)) for c in choices]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(6)) + "  " + r[6] for r in rows]
    fast = sum(c.macs for c in choices if c.variant != "default")
    total = sum(c.macs for c in choices) or 1
    lines.append(f"{100 * fast / total:.1f} % of MACs in written kernels")
    return "\n".join(lines)
