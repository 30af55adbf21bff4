"""Kernels: Triton (or other) implementations, each with a pure-PyTorch reference it is tested against.

`quant_matmul` holds the weight-only quantized linear layers (int8, fp8, group-wise int4).
"""

from tachylm.kernels.quant_matmul import (
    fp8_linear,
    fp8_linear_ref,
    int4_linear,
    int4_linear_ref,
    int8_linear,
    int8_linear_ref,
)

__all__ = [
    "fp8_linear",
    "fp8_linear_ref",
    "int4_linear",
    "int4_linear_ref",
    "int8_linear",
    "int8_linear_ref",
]
