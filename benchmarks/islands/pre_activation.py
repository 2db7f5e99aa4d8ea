"""Float ops, tables, BOPs, TVM and ONNX agreement of torchvision nets with the pre-activation
quantizers off and on (``DJPQConfig.quantize_pre_activation``); results in docs/tvm_backend.md.

Usage: ``python benchmarks/islands/pre_activation.py mobilenet_v3_small [more model names]``
(``weights=None``, 1x3x64x64, default config; each model takes minutes: the TVM build).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

import torch
import torchvision as tv

import djpq_compiler as djpq
from djpq_compiler.backends import onnx as onnx_backend
from djpq_compiler.backends import tvm as tvm_backend
from djpq_compiler.convert import convert
from djpq_compiler.records import converted_record, prepared_record
from djpq_compiler.verify import integer_agreement


def measure(name: str, flag: bool, x: torch.Tensor) -> dict[str, object]:
    torch.manual_seed(0)
    model = tv.models.get_model(name, weights=None).eval()
    prepared = djpq.prepare(model, x, djpq.DJPQConfig(quantize_pre_activation=flag)).eval()
    converted = convert(prepared)
    row: dict[str, object] = {
        "bops": djpq.bops(prepared).total,
        "input_quantizers": dict(prepared_record(prepared).quantizers.input),
        "float_ops": len(converted_record(converted).float_ops),
        "luts": len(converted_record(converted).lut_ops),
    }
    if flag:
        row["max_lsb_vs_fake_quant"] = max(integer_agreement(prepared, converted, x).values())
        start = time.time()
        compiled = tvm_backend.build(converted, "x86", example_inputs=x)
        row["tvm_bit_exact"] = bool(torch.equal(compiled(x), converted(x)))
        row["tvm_build_s"] = round(time.time() - start)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.onnx")
            onnx_backend.export(converted, path, x)
            row["onnx_max_lsb_per_op"] = onnx_backend.verify(converted, path, x)["max_lsb_per_op"]
    return row


def main(names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name in names:
        off, on = measure(name, False, x), measure(name, True, x)
        same = off.pop("input_quantizers") == on.pop("input_quantizers")
        print(f"{name}: off {off}\n{name}: on  {on}\n{name}: BOPs equal {off['bops'] == on['bops']}"
              f", same input quantizer per layer {same}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
