"""Kernels: Triton (or other) implementations, each with a pure-PyTorch reference it is tested against.

`quant_matmul` holds the decode-regime linear layers: weight-only quantized (int8, fp8, group-wise
int4) and dense. `linear` holds `FastLinear`, the `nn.Linear` whose forward takes the dense kernels.
"""

from tachylm.kernels.linear import FastLinear, use_fast_linears
from tachylm.kernels.quant_matmul import (
    dense_linear,
    dense_linear_ref,
    fp8_linear,
    fp8_linear_ref,
    int4_linear,
    int4_linear_ref,
    int8_linear,
    int8_linear_ref,
)

__all__ = [
    "FastLinear",
    "dense_linear",
    "dense_linear_ref",
    "fp8_linear",
    "fp8_linear_ref",
    "int4_linear",
    "int4_linear_ref",
    "int8_linear",
    "int8_linear_ref",
    "use_fast_linears",
]
