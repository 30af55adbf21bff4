"""Kernels: Triton (or other) implementations, each with a pure-PyTorch reference it is tested against.

`quant_matmul` holds the decode-regime linear layers: weight-only quantized (int8, fp8, group-wise
int4) and dense, with the fusions around them (RMSNorm, SiLU-multiply, residual). `linear` holds
the model's `FusedLinear` and `FastLinear`, the `nn.Linear`s whose forward takes the fusions
(in PyTorch ops, or the dense kernels). `attention` holds the decode attention kernel,
`elementwise` the element-wise steps of prefill (SwiGLU; rotary embedding with the cache write),
`topk` the top-k sampling kernels.
"""

import torch

from tachylm.kernels.attention import decode_attention, decode_attention_ref
from tachylm.kernels.linear import FastLinear, FusedLinear, use_fast_linears
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
from tachylm.kernels.topk import topk_sample, topk_sample_ref


def custom_ops() -> tuple:
    """The torch.library operators tachylm's kernels register (opaque to torch.compile)."""
    ops = torch.ops.tachylm
    return (ops.dense_linear.default, ops.dense_mlp.default, ops.int8_linear.default,
            ops.fp8_linear.default, ops.int4_linear.default, ops.rms_norm.default,
            ops.decode_attention.default, ops.decode_attention_write.default,
            ops.topk_sample.default, ops.topk_sample_feed.default)


__all__ = [
    "custom_ops",
    "decode_attention",
    "decode_attention_ref",
    "FastLinear",
    "FusedLinear",
    "dense_linear",
    "dense_linear_ref",
    "fp8_linear",
    "fp8_linear_ref",
    "int4_linear",
    "int4_linear_ref",
    "int8_linear",
    "int8_linear_ref",
    "topk_sample",
    "topk_sample_ref",
    "use_fast_linears",
]
