"""Integer lookup tables for elementwise functions of narrow codes, and the elementwise-op facts.

An elementwise unary function ``f`` between two quantizers (codes ``q`` at scale ``s_in`` with at
most :data:`LUT_MAX_BITS` bits -> ``f(q * s_in)`` -> quantized at ``s_out``) has at most
``2^bits`` distinct inputs, so it is exactly a table of output codes indexed by ``q - qmin``:
``table[i] = Quantize_out(f(Dequantize_in(qmin + i)))``. ``convert`` computes the table in
PyTorch with the very modules the float island would run (the prepared model's ``f`` node between
the reference :class:`~.modules.Dequantize` and :class:`~.modules.Quantize`), so the table *is*
the reference semantics of that island, and every backend reproduces it bit for bit with a
gather (TVM ``take``, ONNX ``Gather``).

The facts about elementwise float ops are derived from ``djpq_compiler/op_facts.py`` (the one
table of op facts), keyed by the target object (module class, function or ``torch.Tensor``
method): :data:`UNARY_OPS` (unary, elementwise; a
table whenever input and output are quantized; the backends lower the float form by the op's
name) and :data:`BINARY_OPS` (elementwise binary arithmetic, broadcasting; float islands).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from djpq_compiler import op_facts as facts
from djpq_compiler.errors import QuantizationError

from .fixedpoint import qrange

__all__ = ["BINARY_OPS", "LUT_MAX_BITS", "UNARY_OPS", "IntLUT", "build_table", "unary_op_name"]

#: Widest input code that becomes a table (``2^8 = 256`` entries).
LUT_MAX_BITS = 8

#: Elementwise unary float ops by target -> canonical name. Each becomes an :class:`IntLUT`
#: when its input codes have <= :data:`LUT_MAX_BITS` bits and a quantizer reads its output;
#: otherwise it stays a float island, lowered by the backends per name.
UNARY_OPS: dict[object, str] = facts.name_table(facts.ELEMENTWISE_UNARY)

#: Elementwise binary float arithmetic (tensor-tensor with broadcasting, tensor-scalar) by target
#: -> name: float islands in every backend (e.g. the squeeze-excite ``x * gate``).
BINARY_OPS: dict[object, str] = facts.name_table(facts.ELEMENTWISE_BINARY)


def unary_op_name(target: object) -> str | None:
    """The canonical name of an elementwise unary op target, or ``None``."""
    try:
        return UNARY_OPS.get(target)
    except TypeError:  # unhashable target
        return None


class IntLUT(nn.Module):
    """``out = table[q - in_qmin]``: an elementwise function of codes as an exact table.

    Attributes:
        table: ``int64`` output codes, one per input code ``in_qmin .. in_qmax``.
        op: Name of the function (``"sigmoid"``, ...), for reports and IR readability.
        in_scale, out_scale: Real scales of the input and output codes.
        in_qmin, in_qmax: Input code range the table covers.
        qmin, qmax: Output code range (every table entry lies in it).
    """

    table: torch.Tensor

    def __init__(self, table: torch.Tensor, op: str, in_scale: float, in_bits: int,
                 in_signed: bool, out_scale: float, out_bits: int, out_signed: bool) -> None:
        super().__init__()
        self.op = str(op)
        self.in_scale, self.out_scale = float(in_scale), float(out_scale)
        self.in_bits, self.in_signed = int(in_bits), bool(in_signed)
        self.out_bits, self.out_signed = int(out_bits), bool(out_signed)
        self.in_qmin, self.in_qmax = qrange(self.in_bits, self.in_signed)
        self.qmin, self.qmax = qrange(self.out_bits, self.out_signed)
        table = table.detach().to(torch.int64).reshape(-1)
        if table.numel() != self.in_qmax - self.in_qmin + 1:
            raise QuantizationError(f"IntLUT({op}): {table.numel()} entries for input codes "
                                    f"[{self.in_qmin}, {self.in_qmax}]")
        if table.numel() and (int(table.min()) < self.qmin or int(table.max()) > self.qmax):
            raise QuantizationError(f"IntLUT({op}): entries outside [{self.qmin}, {self.qmax}]")
        self.register_buffer("table", table)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.table[q.to(torch.int64) - self.in_qmin]

    def extra_repr(self) -> str:
        return (f"op={self.op}, in_scale={self.in_scale:.6g}, out_scale={self.out_scale:.6g}, "
                f"in=[{self.in_qmin}, {self.in_qmax}], out=[{self.qmin}, {self.qmax}]")


def build_table(fn: Callable[[torch.Tensor], torch.Tensor], dequantize: Callable[[Any], Any],
                quantize: Callable[[Any], Any], in_qmin: int, in_qmax: int) -> torch.Tensor:
    """``quantize(fn(dequantize(codes)))`` for every code ``in_qmin .. in_qmax`` (int64).

    ``dequantize``/``quantize`` are the reference modules the float island would run, so each
    entry is what the island computes for that code. The codes are evaluated in one tensor
    tiled to a multiple of 64 elements, so that every entry goes through PyTorch's vectorized
    kernel (the one large activation tensors take), not a scalar remainder loop.
    """
    codes = torch.arange(in_qmin, in_qmax + 1, dtype=torch.int64)
    n = codes.numel()
    tiled = codes.repeat(-(-64 // n) if n < 64 else 1)
    pad = (-tiled.numel()) % 64
    tiled = torch.cat([tiled, tiled[:pad]]) if pad else tiled
    with torch.no_grad():
        out = quantize(fn(dequantize(tiled)))
    return out[:n].to(torch.int64)
