"""Model size: bytes of the weights at their deployed bit-widths (packed) vs FP32.

Counted the way a deployment stores them: a ``b``-bit weight tensor takes ``ceil(n * b / 8)``
bytes (sub-byte codes packed), int32 biases 4 bytes per channel, float tensors 4 bytes per
element. The FP32 reference is the original, unpruned model: every parameter at 4 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from djpq_compiler.errors import ConfigError
from djpq_compiler.ir.modules import _IntLayer
from djpq_compiler.records import converted_record, stage

__all__ = ["SizeRow", "SizeReport", "model_size"]


@dataclass(frozen=True)
class SizeRow:
    name: str
    params: int
    bits: int
    bytes: int


@dataclass(frozen=True)
class SizeReport:
    rows: tuple[SizeRow, ...]
    fp32_bytes: int

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.bytes if self.bytes else float("inf")

    def table(self) -> str:
        lines = [f"{'tensor':<44} {'params':>9} {'bits':>4} {'bytes':>9}"]
        lines += [f"{r.name[:44]:<44} {r.params:>9} {r.bits:>4} {r.bytes:>9}" for r in self.rows]
        lines.append(f"total {self.bytes} B vs FP32 {self.fp32_bytes} B: {self.ratio:.1f}x smaller")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _packed(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def model_size(converted: fx.GraphModule) -> SizeReport:
    """Weight storage of a converted model (integer or float) against its FP32 original."""
    if stage(converted) != "converted":
        raise ConfigError("model_size() takes the output of djpq_compiler.convert.convert()")
    rows: list[SizeRow] = []
    for name, mod in converted.named_modules():
        if isinstance(mod, _IntLayer):
            n = mod.weight.numel()
            rows.append(SizeRow(f"{name}.weight", n, mod.w_bits, _packed(n, mod.w_bits)))
            if mod.out_scale is None:
                rows.append(SizeRow(f"{name}.bias", mod.out_bias.numel(), 32,
                                    4 * mod.out_bias.numel()))
            else:
                rows.append(SizeRow(f"{name}.bias", mod.bias.numel(), 32, 4 * mod.bias.numel()))
        elif not isinstance(mod, fx.GraphModule):
            for pname, p in mod.named_parameters(recurse=False):
                rows.append(SizeRow(f"{name}.{pname}", p.numel(), 32, 4 * p.numel()))
    return SizeReport(tuple(rows), 4 * converted_record(converted).source_params)
