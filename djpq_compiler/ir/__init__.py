"""The integer IR: what ``convert`` produces and every backend consumes.

Its modules (:mod:`djpq_compiler.ir.modules`: ``IntConv2d``, ``IntAdd``, ``IntLUT``, ...) are
both the IR and its reference executor: running a converted model in PyTorch *is* the single
definition of integer semantics that TVM and ONNX are checked against.

The public functions live in :mod:`djpq_compiler.ir.ops` (re-exported here);
``docs/integer_semantics.md`` states the same definitions for the TVM and ONNX backends.
"""

from __future__ import annotations

from .ops import (
    FLOAT64_EXACT,
    INT32_MAX,
    INT32_MIN,
    MAX_SHIFT,
    AddRescale,
    accumulator_bound,
    accumulator_dtype,
    add_rescale,
    concat_rescales,
    dequantize,
    int_adaptive_avg_pool2d,
    int_add,
    int_avg_pool2d,
    int_concat,
    int_conv2d,
    int_linear,
    int_max_pool2d,
    int_relu,
    int_relu6,
    multiplier_bits,
    qrange,
    quantize,
    quantize_bias,
    quantize_multiplier,
    quantize_multipliers,
    requant_params,
    requantize,
    rescale,
)
from .pooling import div_half_up
from .simulate import (
    fake_quantize,
    simulate_add,
    simulate_avg_pool2d,
    simulate_conv2d,
    simulate_linear,
)

__all__ = [
    "FLOAT64_EXACT",
    "INT32_MAX",
    "INT32_MIN",
    "MAX_SHIFT",
    "AddRescale",
    "accumulator_bound",
    "accumulator_dtype",
    "add_rescale",
    "concat_rescales",
    "dequantize",
    "div_half_up",
    "fake_quantize",
    "int_adaptive_avg_pool2d",
    "int_add",
    "int_avg_pool2d",
    "int_concat",
    "int_conv2d",
    "int_linear",
    "int_max_pool2d",
    "int_relu",
    "int_relu6",
    "multiplier_bits",
    "qrange",
    "quantize",
    "quantize_bias",
    "quantize_multiplier",
    "quantize_multipliers",
    "requant_params",
    "requantize",
    "rescale",
    "simulate_add",
    "simulate_avg_pool2d",
    "simulate_conv2d",
    "simulate_linear",
]
