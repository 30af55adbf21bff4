"""Decode-regime linear layers: weight-only int8, fp8 (e4m3), group-wise int4, and dense weights.

This file owns the numerics of `y = x @ w.T + bias` for the three quantized weight layouts of
`tachylm.quant` and for plain (dense) 16-bit weights, in three forms:

* references (`*_linear_ref`): dequantize in float32, then `F.linear` in x's dtype. They are the
  CPU path and the oracle every kernel is tested against.
* Triton kernels for the memory-bound decode regime (few rows of x). Batch-1 decode reads every
  weight once per token, so these kernels are written for bandwidth: 16-byte weight loads
  software-pipelined through shared memory (`tl.range(num_stages=...)`), integer-to-float
  conversion by exponent tricks in inline PTX instead of the slow conversion unit, and no
  dequantized copy of the weight ever written to memory.
* the dispatchers (`int8_linear`, `fp8_linear`, `int4_linear`): Triton on CUDA, references
  elsewhere. `dense_linear` has `F.linear`'s contract and takes the Triton GEMV kernels only where
  they apply (CUDA, x and weight of one dtype, few rows, no autograd); `F.linear` otherwise.

Every dispatcher also takes the element-wise steps of a decoder layer around the product
(`Fusion`): `norm=(weight, eps)` (RMSNorm of x first), `swiglu=True` (the product is [gate | up]:
return SiLU(gate) * up) and `residual=` (added to the result). The one-row kernel does all three;
the tensor-core kernel does SwiGLU and the residual and leaves the RMSNorm to PyTorch ops before
it (inside, it cost int4 decode 7% once and 3% with the current kernels; the kernel still
supports it and the tests cover it); the cuBLAS paths do them as PyTorch
ops (`fused_linear_ref`), where torch.compile fuses them with their neighbours.

Canonical layouts (the kernels read them as they are; there is no repacking step):

    int8  qweight int8 [N, K]; scale float [N]             w = q * scale[n]
    fp8   qweight float8_e4m3fn [N, K]; scale float [N]    w = float(q) * scale[n]
    int4  qweight uint8 [N, K/2], low nibble = even k, high nibble = odd k;
          scale, zero float [N, K/G]                       w = (q - zero[n, k/G]) * scale[n, k/G]
    dense weight [N, K] in x's dtype, no scale             w = weight

Kernels on CUDA, by the number of rows M of x (leading dimensions of x flattened):

    M == 1, int8/fp8  `_qgemv_m1_kernel`, CUDA cores: each program owns BLOCK_N output rows, walks
    and dense         K in BLOCK_K tiles accumulating a [BLOCK_N, BLOCK_K] float32 tile, reduces it
                      once at the end and applies the row scale (none for dense weights).
    M <= 16, and      `_qgemv_dot_kernel`, tensor cores on the swapped product out^T = W @ x^T (the
    every int4 M      weight tile is the large operand; x is padded to a power of two >= 1 rows,
                      >= 2 in a config whose warps multiply several slices: see `_pads_m`).
                      A K tile is K_SLICES slices multiplied as one batched `tl.dot`, the warps
                      splitting the slices, so a program of few rows keeps all its warps busy.
                      int4 has two kinds of tiles, autotuned together: slices of one group, the
                      nibbles unpacked straight into 16-bit MMA operands and each group's scale
                      and zero point applied to the MMA result; and (bfloat16 x) PRESCALE slices
                      of 128 or more, each nibble turned into its bfloat16 weight in registers
                      first (two packed FMAs), which wins for small groups and for more rows.
    M > 16, fp8       `_qgemm_kernel`, a tensor-core GEMM (wgmma) whose weight operand is
                      converted in registers: no dequantized copy of the weight.
    M > 16, int8      `_dequant_kernel` writes the weight in x's dtype, then `F.linear` (cuBLAS):
    and int4          at prefill sizes the matrix product dominates and the extra pass costs
                      1.24-1.36x bf16's time per matrix (BENCHMARKS.md), less than their GEMM's
                      conversions did. Dense weights go to `F.linear` directly.

The dense scheme exists because cuBLAS's M = 1 GEMV reads bf16 weights at about 2.6-2.8 TB/s on an
H100, while `_qgemv_m1_kernel` reads int8 at 2.9-3.1 TB/s; the same kernel with 16-bit loads (8
elements per 16-byte load, float32 multiply-adds) serves bf16/fp16 decode. float32 x and weight
take the m1 kernel too (4 elements per load) and cuBLAS for M > 1, as for the quantized schemes.

Both GEMV kernels can split K across programs (SPLIT_K, chosen per shape so the grid covers every
SM twice): each program stores a float32 partial, and the last program of a row block to arrive
(counted with an atomic on a self-resetting counter) sums the partials in a fixed order, adds the
bias and writes the output. One launch, deterministic results, no memset.

int4 arithmetic: the bits 0x4300 | q are the bfloat16 128 + q (0x6400 | q the float16 1024 + q),
exact, so the MMA on them gives sum((128 + q) * x) per group; with sum(x) over the same group,
scale * (sum((128 + q) * x) - (zero + 128) * sum(x)) is the group's share. The zero point costs
one multiply per group and output, not one per weight.

All four dispatchers work under `torch.compile(fullgraph=True)` and CUDA graphs: the CUDA path
is a `torch.library.custom_op` with a fake (shape) implementation, so the compiler never traces
the Triton launch code. Autotuning runs at the first call of each shape (a few seconds per shape,
weights read from DRAM: see `_tuning_bench`); make that call (a warm-up) before capturing a CUDA
graph, as `torch.compile(mode="reduce-overhead")` does by itself (its warm-up run may be the very
first call: the split-K counters are allocated so that this is safe, see `persistent_zeros`).
"""

import concurrent.futures
import contextlib
import functools
import inspect
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references serve every call
    triton = None

from tachylm.kernels.elementwise import swiglu, swiglu_ref

HAS_TRITON = triton is not None

INT8, FP8, INT4, DENSE = 0, 1, 2, 3  # SCHEME in the kernels, which compare literal values
INT4_GROUP_SIZES = (32, 64, 128, 256)
GEMV_MAX_M = 16  # rows of x up to which the Triton GEMV kernels beat dequantize + cuBLAS
DENSE_GEMV_MAX_M = 16  # rows of x up to which dense_linear takes the GEMV kernels over cuBLAS
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Inline PTX for the integer -> float conversions (see the kernels below). Operands follow Triton's
# packing for `inline_asm_elementwise(pack=4)`: an 8-bit input register holds elements 0..3 in
# bytes 0..3; a 16-bit result is two registers (elements 0, 1 in the low/high half of the first);
# a float32 result is four registers; a second result follows the first. PRMT selector nibbles
# pick bytes from {b, a} (a = bytes 0..3, b = bytes 4..7). tests/test_kernels.py emulates these
# sequences on every byte value against the plain Triton forms.
_PTX_INT8_TO_F32 = """{
    .reg .b32 r;
    xor.b32 r, $4, 0x80808080;
    prmt.b32 $0, r, 0x4B000000, 0x7650;
    prmt.b32 $1, r, 0x4B000000, 0x7651;
    prmt.b32 $2, r, 0x4B000000, 0x7652;
    prmt.b32 $3, r, 0x4B000000, 0x7653;
    sub.f32 $0, $0, 0f4B000080;
    sub.f32 $1, $1, 0f4B000080;
    sub.f32 $2, $2, 0f4B000080;
    sub.f32 $3, $3, 0f4B000080;
}"""
_PTX_INT8_TO_BF16 = """{
    .reg .b32 r, t0, t1, t2, t3;
    xor.b32 r, $2, 0x80808080;
    prmt.b32 t0, r, 0x4B000000, 0x7650;
    prmt.b32 t1, r, 0x4B000000, 0x7651;
    prmt.b32 t2, r, 0x4B000000, 0x7652;
    prmt.b32 t3, r, 0x4B000000, 0x7653;
    sub.f32 t0, t0, 0f4B000080;
    sub.f32 t1, t1, 0f4B000080;
    sub.f32 t2, t2, 0f4B000080;
    sub.f32 t3, t3, 0f4B000080;
    cvt.rn.bf16x2.f32 $0, t1, t0;
    cvt.rn.bf16x2.f32 $1, t3, t2;
}"""
_PTX_INT8_TO_F16 = """{
    .reg .b32 r, t0, t1, c;
    xor.b32 r, $2, 0x80808080;
    mov.b32 c, 0x64806480;
    prmt.b32 t0, r, 0x64646464, 0x5140;
    prmt.b32 t1, r, 0x64646464, 0x7362;
    sub.f16x2 $0, t0, c;
    sub.f16x2 $1, t1, c;
}"""
def _nibbles_ptx(magic: str) -> str:
    """PTX: 4 bytes -> 8 nibbles, each placed under the 16-bit pattern `magic` (see below)."""
    return """{
    .reg .b32 s;
    prmt.b32 $0, $4, MAGIC, 0x5140;
    prmt.b32 $1, $4, MAGIC, 0x7362;
    shr.b32 s, $4, 4;
    prmt.b32 $2, s, MAGIC, 0x5140;
    prmt.b32 $3, s, MAGIC, 0x7362;
    and.b32 $0, $0, 0xFF0FFF0F;
    and.b32 $1, $1, 0xFF0FFF0F;
    and.b32 $2, $2, 0xFF0FFF0F;
    and.b32 $3, $3, 0xFF0FFF0F;
}""".replace("MAGIC", magic)


_PTX_NIBBLES_TO_BF16 = _nibbles_ptx("0x43434343")
_PTX_NIBBLES_TO_F16 = _nibbles_ptx("0x64646464")
# The same 8 nibbles as bfloat16 weights: 128 + q (as above), then q = fma(128 + q, 1, -128)
# (exact), then w = fma(q, scale, m) rounded once, scale ($5, $6) and m ($7, $8) being two
# bfloat16 pairs, elements 0-1 and 2-3 (shared by the low and the high nibble of a byte).
_PTX_NIBBLES_SCALED_BF16 = _nibbles_ptx("0x43434343")[:-1] + """    .reg .b32 one, neg;
    mov.b32 one, 0x3F803F80;
    mov.b32 neg, 0xC300C300;
    fma.rn.bf16x2 $0, $0, one, neg;
    fma.rn.bf16x2 $1, $1, one, neg;
    fma.rn.bf16x2 $2, $2, one, neg;
    fma.rn.bf16x2 $3, $3, one, neg;
    fma.rn.bf16x2 $0, $0, $5, $7;
    fma.rn.bf16x2 $1, $1, $6, $8;
    fma.rn.bf16x2 $2, $2, $5, $7;
    fma.rn.bf16x2 $3, $3, $6, $8;
}"""


# Four byte products summed into an int32: unsigned bytes of $1 (int4 codes) times signed bytes of
# $2 (16-bit x, split into a high and a low byte), plus $3.
_PTX_DP4A = "dp4a.u32.s32 $0, $1, $2, $3;"
# A tagged word ($1, loaded from address $2) whose high half is not the expected tag $3 is read
# again, through to L2 (volatile), until it is: the wait of `_mlp_m1_kernel`'s second phase. A
# branch inside the asm keeps the kernel's loop free of a nested loop, which Triton would not
# software-pipeline; the braces scope the labels, so the block may be inlined many times.
_PTX_AWAIT_TAG = """{
    .reg .pred p;
    .reg .b32 t;
    mov.b32 $0, $1;
    and.b32 t, $1, 0xFFFF0000;
    setp.eq.b32 p, t, $3;
    @p bra DONE;
    WAIT:
    ld.volatile.global.b32 $0, [$2];
    and.b32 t, $0, 0xFFFF0000;
    setp.ne.b32 p, t, $3;
    @p bra WAIT;
    DONE:
}"""
# Columns of x one program of `_int4_x_kernel` prepares, and a feed program of
# `_int4_dp4a_kernel`.
_PREP_COLUMNS = 1024


# ----------------------------------------------------------------------------------------------
# Fusions around the product
# ----------------------------------------------------------------------------------------------

class Fusion(NamedTuple):
    """What a fused linear layer does around its product: y = residual + W @ prologue(x) + bias.

    The decode step of a transformer layer is a chain of matrix-vector products with small
    element-wise steps between them; each step as its own kernel costs a launch and a pass over
    the activations. The GEMV kernels do them in place: the RMSNorm of x (a sum of squares gathered
    while x is read, applied to the result as one scale per row), SiLU(gate) * up as the gate and
    up rows' results meet in one program, and the residual add as the result is written.

    Attributes:
        norm_weight: RMSNorm x first with this weight [K] (and `eps`): `rms_norm_ref`. An empty
            tensor ([0]) is an RMSNorm without a weight, for a layer whose weight has the norm's
            weight folded into its columns (`tachylm.quant.fold_norm`): the kernels then read
            x alone.
        eps: the RMSNorm epsilon.
        swiglu: the weight is [gate; up] (N = 2H rows); the result is SiLU(gate) * up, [..., H].
        residual: [..., N] ([..., H] with swiglu) in x's dtype, added to the result.
    """

    norm_weight: Optional[torch.Tensor] = None
    eps: float = 0.0
    swiglu: bool = False
    residual: Optional[torch.Tensor] = None


NO_FUSION = Fusion()


def make_fusion(norm: Optional[tuple] = None, swiglu: bool = False,
                residual: Optional[torch.Tensor] = None) -> Fusion:
    """The public keyword arguments (`norm=(weight, eps)`, `swiglu`, `residual`) as a Fusion."""
    if norm is None:
        return Fusion(None, 0.0, bool(swiglu), residual)
    weight, eps = norm
    return Fusion(weight, float(eps), bool(swiglu), residual)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Hugging Face computes it: normalised in float32, rounded to x's dtype, then
    multiplied by the weight (an empty weight: by none; see `Fusion`)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight.numel() == 0:  # no weight (folded into the next layer): the product's dtype
        return x32.to(x.dtype).to(torch.promote_types(x.dtype, weight.dtype))
    return weight * x32.to(x.dtype)


def linear_input_ref(x: torch.Tensor, fusion: Fusion) -> torch.Tensor:
    """What the product of a fused linear layer multiplies: x after the fusion's prologue."""
    if fusion.norm_weight is not None:
        x = rms_norm_ref(x, fusion.norm_weight, fusion.eps)
    return x


def _around(linear, x: torch.Tensor, fusion: Fusion, prologue, swiglu_fn) -> torch.Tensor:
    """residual + epilogue(linear(prologue(x))), the norm by `prologue(x, fusion)` and SwiGLU by
    `swiglu_fn`."""
    y = linear(prologue(x, fusion))
    if fusion.swiglu:
        y = swiglu_fn(y)
    return y if fusion.residual is None else fusion.residual + y


def fused_linear_ref(linear, x: torch.Tensor, fusion: Fusion) -> torch.Tensor:
    """residual + epilogue(linear(prologue(x))) in PyTorch ops, for any `linear` callable."""
    return _around(linear, x, fusion, linear_input_ref, swiglu_ref)


def _out_features(n: int, swiglu: bool) -> int:
    """Output width of a weight with n rows: n, or n / 2 when SwiGLU pairs its gate and up rows."""
    return n // 2 if swiglu else n


def _is_fused(fusion: Fusion) -> bool:
    return fusion.norm_weight is not None or fusion.swiglu or fusion.residual is not None


def _check_fusion(name: str, x: torch.Tensor, k: int, n: int, fusion: Fusion) -> None:
    """Check a fusion against a weight [N, K] and x [..., K]."""
    if fusion.swiglu and n % 2:
        raise ValueError(f"{name}: swiglu needs a weight of [gate; up] halves, an even number of "
                         f"rows; this one has {n}")
    w = fusion.norm_weight
    if w is not None:
        if tuple(w.shape) not in ((k,), (0,)) or not w.is_floating_point() or w.device != x.device:
            raise ValueError(f"{name}: the norm weight must be a floating-point [{k}] tensor (or "
                             f"[0]: no weight) on {x.device}, got {w.dtype} {list(w.shape)} on "
                             f"{w.device}")
        if not fusion.eps >= 0:
            raise ValueError(f"{name}: the norm epsilon must be >= 0, got {fusion.eps}")
    r = fusion.residual
    n_out = _out_features(n, fusion.swiglu)
    if r is not None and (tuple(r.shape) != (*x.shape[:-1], n_out) or r.dtype != x.dtype
                          or r.device != x.device):
        raise ValueError(f"{name}: the residual must be a {x.dtype} tensor of shape "
                         f"{[*x.shape[:-1], n_out]} on {x.device}, got {r.dtype} {list(r.shape)} "
                         f"on {r.device}")


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def _check_common(name: str, x: torch.Tensor, qweight: torch.Tensor, bias: Optional[torch.Tensor],
                  k_expected: int) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{name}: x has dtype {x.dtype}; use one of {ACTIVATION_DTYPES}")
    if x.dim() < 1 or x.shape[-1] != k_expected:
        raise ValueError(f"{name}: x has shape {list(x.shape)} but the weight has K = {k_expected} "
                         f"input features; x must be [..., {k_expected}]")
    if x.device != qweight.device:
        raise ValueError(f"{name}: x is on {x.device} but qweight on {qweight.device}; move them "
                         "to one device")
    n = qweight.shape[0]
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{name}: bias has shape {list(bias.shape)}, expected [{n}]")
        if not bias.is_floating_point() or bias.device != qweight.device:
            raise ValueError(f"{name}: bias must be a floating-point tensor on {qweight.device}, "
                             f"got {bias.dtype} on {bias.device}")


def _check_scale(name: str, what: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: {what} has shape {list(t.shape)}, expected {list(shape)}")
    if t.dtype not in SCALE_DTYPES:
        raise ValueError(f"{name}: {what} has dtype {t.dtype}; use one of {SCALE_DTYPES}")
    if t.device != device:
        raise ValueError(f"{name}: {what} is on {t.device} but qweight on {device}")


def _check_rowwise(name: str, want: torch.dtype, x, qweight, scale, bias,
                   fusion: Fusion = NO_FUSION) -> None:
    if qweight.dtype != want or qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be a 2-D {want} tensor [N, K], got "
                         f"{qweight.dtype} of shape {list(qweight.shape)}")
    _check_common(name, x, qweight, bias, qweight.shape[1])
    _check_fusion(name, x, qweight.shape[1], qweight.shape[0], fusion)
    _check_scale(name, "scale", scale, (qweight.shape[0],), qweight.device)


def _check_int4(x, qweight, scale, zero, group_size, bias, fusion: Fusion = NO_FUSION) -> None:
    name = "int4_linear"
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be a 2-D uint8 tensor [N, K/2] (two 4-bit values "
                         f"per byte), got {qweight.dtype} of shape {list(qweight.shape)}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{name}: group_size {group_size} is not supported; use one of "
                         f"{INT4_GROUP_SIZES}")
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if k % group_size:
        raise ValueError(f"{name}: K = {k} (2 * qweight.shape[1]) is not a multiple of "
                         f"group_size {group_size}")
    _check_common(name, x, qweight, bias, k)
    _check_fusion(name, x, k, n, fusion)
    _check_scale(name, "scale", scale, (n, k // group_size), qweight.device)
    _check_scale(name, "zero", zero, (n, k // group_size), qweight.device)


# ----------------------------------------------------------------------------------------------
# References (CPU path and test oracle)
# ----------------------------------------------------------------------------------------------

def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] weight and float [N] scale -> float32 [N, K]."""
    return qweight.to(torch.float32) * scale.to(torch.float32)[:, None]


def dequantize_fp8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [N, K] weight and float [N] scale -> float32 [N, K]."""
    return qweight.to(torch.float32) * scale.to(torch.float32)[:, None]


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (low nibble = even k) -> uint8 codes [N, K] in 0..15."""
    low = qweight & 0x0F
    high = qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Packed int4 [N, K/2] with scale/zero [N, K/G] -> float32 [N, K]."""
    codes = unpack_int4(qweight).to(torch.float32)
    n, k = codes.shape
    groups = codes.reshape(n, k // group_size, group_size)
    w = (groups - zero.to(torch.float32)[..., None]) * scale.to(torch.float32)[..., None]
    return w.reshape(n, k)


def _linear_in_dtype(x: torch.Tensor, w: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    # The matrix product runs in x's dtype (float32 accumulation inside the BLAS for 16-bit types).
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w.to(x.dtype), b)


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference y = x @ (qweight * scale[:, None]).T + bias in pure PyTorch.

    Args:
        x: [..., K] float32 / bfloat16 / float16.
        qweight: int8 [N, K].
        scale: float32 / bfloat16 / float16 [N].
        bias: optional [N].
    Returns:
        [..., N] in x's dtype.
    """
    _check_rowwise("int8_linear", torch.int8, x, qweight, scale, bias)
    return _linear_in_dtype(x, dequantize_int8(qweight, scale), bias)


def fp8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference y = x @ (float(qweight) * scale[:, None]).T + bias; qweight float8_e4m3fn [N, K].

    Arguments and result as `int8_linear_ref`.
    """
    _check_rowwise("fp8_linear", torch.float8_e4m3fn, x, qweight, scale, bias)
    return _linear_in_dtype(x, dequantize_fp8(qweight, scale), bias)


def dense_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     *, norm: Optional[tuple] = None, swiglu: bool = False,
                     residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference y = residual + epilogue(prologue(x) @ weight.T + bias): `F.linear` itself (cuBLAS
    on CUDA), with its contract, and the fusion (`Fusion`) as PyTorch ops around it.

    Args:
        x: [..., K]; weight: [N, K] and bias: optional [N], both in x's dtype.
        norm, swiglu, residual: as `int8_linear`.
    Returns:
        [..., N] ([..., N/2] with swiglu) in x's dtype.
    Raises:
        ValueError: a norm weight or residual that does not fit the weight and x.
    """
    fusion = make_fusion(norm, swiglu, residual)
    if not _is_fused(fusion):
        return F.linear(x, weight, bias)
    if weight.dim() == 2:  # other shapes: F.linear raises its own error
        _check_fusion("dense_linear", x, weight.shape[1], weight.shape[0], fusion)
    return fused_linear_ref(lambda t: F.linear(t, weight, bias), x, fusion)


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference y = x @ w.T + bias with w[n, k] = (q[n, k] - zero[n, k/G]) * scale[n, k/G].

    Args:
        x: [..., K] float32 / bfloat16 / float16.
        qweight: uint8 [N, K/2], two 4-bit codes per byte, the low nibble holding the even k.
        scale, zero: float [N, K/G]; zero is a float (it need not be an integer).
        group_size: G, one of INT4_GROUP_SIZES.
        bias: optional [N].
    Returns:
        [..., N] in x's dtype.
    """
    _check_int4(x, qweight, scale, zero, group_size, bias)
    return _linear_in_dtype(x, dequantize_int4(qweight, scale, zero, group_size), bias)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    # Integer -> float conversions. Both forms write the integer into the low mantissa bits of a
    # float with a fixed exponent, which is exact and costs integer-pipe operations instead of the
    # conversion unit (16 results per clock per SM on Hopper, too slow to keep up with the memory).
    # The FAST forms are the PTX above, four bytes per sequence (one PRMT places a byte under the
    # exponent byte); the plain forms are the same arithmetic in Triton ops, used by the
    # interpreter (it has no inline assembly) and the definition the PTX must match.
    _ASM_INT8_TO_F32 = tl.constexpr(_PTX_INT8_TO_F32)
    _ASM_INT8_TO_BF16 = tl.constexpr(_PTX_INT8_TO_BF16)
    _ASM_INT8_TO_F16 = tl.constexpr(_PTX_INT8_TO_F16)
    _ASM_NIBBLES_TO_BF16 = tl.constexpr(_PTX_NIBBLES_TO_BF16)
    _ASM_NIBBLES_TO_F16 = tl.constexpr(_PTX_NIBBLES_TO_F16)
    _ASM_NIBBLES_SCALED_BF16 = tl.constexpr(_PTX_NIBBLES_SCALED_BF16)
    _ASM_DP4A = tl.constexpr(_PTX_DP4A)
    _ASM_AWAIT_TAG = tl.constexpr(_PTX_AWAIT_TAG)
    PREP_COLUMNS = tl.constexpr(_PREP_COLUMNS)

    @triton.jit
    def _int8_to_f32(w, FAST: tl.constexpr):
        """int8 bits loaded as uint8 -> float32: (w ^ 0x80) = q + 128 under 2**23's exponent."""
        if FAST:
            return tl.inline_asm_elementwise(_ASM_INT8_TO_F32, "=r,=r,=r,=r,r", [w], tl.float32,
                                             is_pure=True, pack=4)
        else:
            bits = (w.to(tl.int32) ^ 0x80) | 0x4B000000
            return bits.to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _int8_to_16bit(w, DTYPE: tl.constexpr, FAST: tl.constexpr):
        """int8 bits loaded as uint8 -> DTYPE (bfloat16 or float16), exactly."""
        if FAST:
            if DTYPE == tl.bfloat16:
                return tl.inline_asm_elementwise(_ASM_INT8_TO_BF16, "=r,=r,r", [w], tl.bfloat16,
                                                 is_pure=True, pack=4)
            else:
                # float16 has an 11-bit significand: 0x6400 | u is 1024 + u, exact for u < 1024.
                return tl.inline_asm_elementwise(_ASM_INT8_TO_F16, "=r,=r,r", [w], tl.float16,
                                                 is_pure=True, pack=4)
        else:
            return _int8_to_f32(w, False).to(DTYPE)

    @triton.jit
    def _nibbles_to_16bit(b, DTYPE: tl.constexpr, FAST: tl.constexpr):
        """uint8 [.., n] -> (low, high) nibbles as DTYPE, each holding OFFSET + q exactly.

        The bits 0x4300 | q are the bfloat16 128 + q; 0x6400 | q the float16 1024 + q.
        """
        if FAST:
            if DTYPE == tl.bfloat16:
                return tl.inline_asm_elementwise(_ASM_NIBBLES_TO_BF16, "=r,=r,=r,=r,r", [b],
                                                 (tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise(_ASM_NIBBLES_TO_F16, "=r,=r,=r,=r,r", [b],
                                                 (tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            MAGIC: tl.constexpr = 0x4300 if DTYPE == tl.bfloat16 else 0x6400
            b = b.to(tl.int16)
            low = ((b & 0xF) | MAGIC).to(DTYPE, bitcast=True)
            high = ((b >> 4) | MAGIC).to(DTYPE, bitcast=True)
            return low, high

    @triton.jit
    def _nibbles_to_weights(b, scale, m, FAST: tl.constexpr):
        """uint8 [..., n] and bfloat16 scale, m of b's shape -> (low, high) nibbles as bfloat16
        weights q * scale + m, each rounded once."""
        if FAST:
            return tl.inline_asm_elementwise(_ASM_NIBBLES_SCALED_BF16, "=r,=r,=r,=r,r,r,r,r,r",
                                             [b, scale, m], (tl.bfloat16, tl.bfloat16),
                                             is_pure=True, pack=4)
        else:
            low, high = _nibbles_to_16bit(b, tl.bfloat16, False)
            sf = scale.to(tl.float32)
            mf = m.to(tl.float32)
            low = ((low.to(tl.float32) - 128.0) * sf + mf).to(tl.bfloat16)
            high = ((high.to(tl.float32) - 128.0) * sf + mf).to(tl.bfloat16)
            return low, high

    @triton.jit
    def _nibble_to_f32(q):
        # q: int32 in 0..15 -> float32, exactly (2**23 + q - 2**23).
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _rowwise_to_f32(w, SCHEME: tl.constexpr, FAST: tl.constexpr):
        """A loaded weight tile of an int8, fp8 or dense scheme -> float32 (unscaled)."""
        if SCHEME == 0:
            return _int8_to_f32(w, FAST)
        else:
            # fp8: hardware e4m3x2 -> f16x2, then f16 -> f32. dense: bf16 -> f32 is a shift,
            # f16 -> f32 a full-rate HADD2.F32; f32 is left as it is.
            return w.to(tl.float32)

    @triton.jit
    def _rowwise_to_16bit(w, SCHEME: tl.constexpr, DTYPE: tl.constexpr, FAST: tl.constexpr):
        """A loaded weight tile of an int8, fp8 or dense scheme -> DTYPE (unscaled) for the MMA."""
        if SCHEME == 0:
            return _int8_to_16bit(w, DTYPE, FAST)
        elif SCHEME == 3:
            return w.to(DTYPE)  # dense: the dispatcher passes weights in x's dtype, so no-op
        else:
            # Through float32: fp8 -> f16x2 (packed) -> f32 -> bf16x2 (packed) avoids the slow
            # scalar f16 -> bf16 conversion the direct cast compiles to.
            return w.to(tl.float32).to(DTYPE)

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        """Under programmatic dependent launch: wait until the kernel before has finished and its
        writes are visible. Every kernel launched with PDL must wait, even one that reads nothing
        its predecessor wrote: that keeps the ordering transitive along the stream."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_release(PDL: tl.constexpr):
        """Under programmatic dependent launch: let the next kernel launch once every program has
        passed here (its programs take SMs as ours finish, and wait in `pdl_start`)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _load_x(x_ptr, x_offs, k_offs, mask, g_ptr, PROLOGUE: tl.constexpr, MASKED: tl.constexpr):
        """The product's input at x_offs (k at k_offs) after the prologue, float32, and x itself
        (float32; what the RMSNorm's sum of squares adds up).

        PROLOGUE 0: x. 1 (RMSNorm): x * g[k]; the 1 / rms factor is applied to the result.
        2 (RMSNorm without a weight, `Fusion`): x, whose squares are summed as with 1.
        """
        if MASKED:
            x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_ptr + x_offs).to(tl.float32)
        if PROLOGUE == 1:
            if MASKED:
                g = tl.load(g_ptr + k_offs, mask=mask, other=0.0).to(tl.float32)
            else:
                g = tl.load(g_ptr + k_offs).to(tl.float32)
            return x * g, x
        else:
            return x, x

    @triton.jit
    def _x_tile(x_ptr, x_offs, k_offs, mask, g_ptr, PROLOGUE: tl.constexpr, MASKED: tl.constexpr):
        """The tensor-core kernel's x tile in x's dtype (after the prologue, rounded), and x in
        float32 for the RMSNorm's sum of squares (with PROLOGUE 0 the tile itself, unused)."""
        if PROLOGUE == 0:
            if MASKED:
                xt = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
            else:
                xt = tl.load(x_ptr + x_offs)
            return xt, xt
        else:
            xf, x_in = _load_x(x_ptr, x_offs, k_offs, mask, g_ptr, PROLOGUE, MASKED)
            return xf.to(x_ptr.dtype.element_ty), x_in

    @triton.jit
    def _row_block(pid_n, N, BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr):
        """(offs_n, rows): the weight rows of row block pid_n. offs_n holds N where a row lies past
        the weight (masked out of every store); rows is offs_n clamped to a real row, so loads
        need no row mask.

        With SWIGLU the weight is [gate; up] (N = 2H) and a block takes output rows
        pid_n * BLOCK_N / 2 + j, interleaved: gate row j at 2j, up row H + j at 2j + 1 (each row
        is still read whole and in order, so the interleave costs nothing).
        """
        i = tl.arange(0, BLOCK_N)
        if SWIGLU:
            half = N // 2
            j = pid_n * (BLOCK_N // 2) + i // 2
            rows = tl.minimum(j, half - 1) + (i % 2) * half
            offs_n = tl.where(j < half, rows, N)
        else:
            offs_n = pid_n * BLOCK_N + i
            rows = tl.minimum(offs_n, N - 1)
        return offs_n, rows

    @triton.jit
    def _write_out(acc, offs_n, offs_m, M, N, pid_n, b_ptr, r_ptr, out_ptr, stride_om,
                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        # acc: [BLOCK_N, BLOCK_M] float32 = out^T for the rows offs_n (`_row_block`). The residual
        # shares out's layout [M, N] ([M, N / 2] with SWIGLU). Returns what it stored, where
        # (offsets into out) and its mask.
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            acc = acc + bias[:, None]
        if SWIGLU:
            # [gate, up] pairs of rows -> SiLU(gate) * up, [BLOCK_N / 2, BLOCK_M]
            pairs = tl.permute(tl.reshape(acc, (BLOCK_N // 2, 2, BLOCK_M)), (0, 2, 1))
            gate, up = tl.split(pairs)
            y = gate * tl.sigmoid(gate) * up
            offs_o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            mask = (offs_o[:, None] < N // 2) & (offs_m[None, :] < M)
        else:
            y = acc
            offs_o = offs_n
            mask = (offs_o[:, None] < N) & (offs_m[None, :] < M)
        idx = offs_m[None, :] * stride_om + offs_o[:, None]
        if HAS_RESIDUAL:
            y = y + tl.load(r_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        stored = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + idx, stored, mask=mask)
        return stored, idx, mask

    @triton.jit
    def _finish(acc, sumsq, offs_n, offs_m, M, N, K, eps, pid_n, pid_k, b_ptr, r_ptr, out_ptr,
                ws_ptr, cnt_ptr, stride_om, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                NORM: tl.constexpr, SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr,
                PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """Write acc ([BLOCK_N, BLOCK_M] float32, scaled) or, under split-K, reduce the partials.
        The partials are indexed by weight row (offs_n), so SwiGLU pairs meet after the sum.

        With NORM, sumsq [BLOCK_M] is this program's sum of x^2 over its K range, and the result
        is scaled by 1 / sqrt(sum / K + eps) (under split-K from the sum over every split).
        """
        pdl_release(PDL)  # the weights are read: the next kernel may launch
        if SPLIT_K == 1:
            if NORM:
                acc = acc / tl.sqrt_rn(sumsq / K + eps)[None, :]
            _write_out(acc, offs_n, offs_m, M, N, pid_n, b_ptr, r_ptr, out_ptr, stride_om,
                       HAS_BIAS, HAS_RESIDUAL, SWIGLU, BLOCK_N, BLOCK_M)
        else:
            mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
            idx = offs_m[None, :] * N + offs_n[:, None]  # into a [M, N] float32 partial
            tl.store(ws_ptr + pid_k * M * N + idx, acc, mask=mask)
            if NORM:
                # Past the partials: [SPLIT_K, M] sums of squares. Every row block of a split
                # stores the same values (same x, same order), so their writes agree.
                tl.store(ws_ptr + SPLIT_K * M * N + pid_k * M + offs_m, sumsq, mask=offs_m < M)
            # Every thread's partial is stored before one thread publishes the arrival (release);
            # the last program's acquire orders its reads of the other partials after theirs.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT_K):  # fixed order: deterministic sums
                    total += tl.load(ws_ptr + s * M * N + idx, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                if NORM:
                    ss = tl.zeros_like(sumsq)
                    for s in tl.static_range(SPLIT_K):
                        ss += tl.load(ws_ptr + SPLIT_K * M * N + s * M + offs_m,
                                      mask=offs_m < M, other=0.0, cache_modifier=".cg")
                    total = total / tl.sqrt_rn(ss / K + eps)[None, :]
                _write_out(total, offs_n, offs_m, M, N, pid_n, b_ptr, r_ptr, out_ptr, stride_om,
                           HAS_BIAS, HAS_RESIDUAL, SWIGLU, BLOCK_N, BLOCK_M)
                # Ready for the next launch.
                tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        # Each split owns whole BLOCK_K tiles, so only the tile that crosses K is ragged.
        if SPLIT_K == 1:
            return 0, K
        else:
            per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
            k_start = pid_k * per_split
            return k_start, tl.minimum(K, k_start + per_split)

    @triton.jit
    def _row_dots(w_ptr, rows, stride_wn, x_ptr, g_ptr, k_start, k_end, K, SCHEME: tl.constexpr,
                  FAST: tl.constexpr, PROLOGUE: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        """The one-row GEMV loop: weight rows `rows` (int8, fp8 or dense, `_rowwise_to_f32`)
        against the prologue of one row of x (`_load_x`) over columns [k_start, k_end), in
        [BLOCK_N, BLOCK_K] float32 tiles of multiply-adds reduced once at the end. Returns the
        unscaled products [BLOCK_N] and, with PROLOGUE 1, x^2 summed per column of the tile
        [1, BLOCK_K] (the RMSNorm's sum of squares once reduced, which the callers leave to
        their epilogues). Without EVEN_K the columns past K are masked."""
        offs_k = tl.arange(0, BLOCK_K)
        # 64-bit row offsets: N * K may pass 2**31 (a 128k-vocab head at K = 16384).
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]  # [BN, BK]
        acc_t = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        sq_t = tl.zeros((1, BLOCK_K), tl.float32)  # RMSNorm: x^2 summed per column of the tile
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            if EVEN_K:
                wf = _rowwise_to_f32(tl.load(w_ptrs + k0), SCHEME, FAST)
                x, x_in = _load_x(x_ptr, k0 + offs_k, k0 + offs_k, None, g_ptr, PROLOGUE, False)
            else:
                # No `other` for the weight (fp8 has no literal zero to fill with); the ragged
                # columns are zeroed after conversion (an fp8 NaN pattern times 0 is NaN).
                k_ok = (k0 + offs_k) < K
                wf = _rowwise_to_f32(tl.load(w_ptrs + k0, mask=k_ok[None, :]), SCHEME, FAST)
                wf = tl.where(k_ok[None, :], wf, 0.0)
                x, x_in = _load_x(x_ptr, k0 + offs_k, k0 + offs_k, k_ok, g_ptr, PROLOGUE, True)
            acc_t += wf * x[None, :]
            if PROLOGUE >= 1:
                sq_t += (x_in * x_in)[None, :]
        return tl.sum(acc_t, axis=1), sq_t

    @triton.jit
    def _qgemv_m1_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, g_ptr, r_ptr, out_ptr, ws_ptr, cnt_ptr,
        N, K, stride_wn, eps,
        SCHEME: tl.constexpr, HAS_BIAS: tl.constexpr, FAST: tl.constexpr,
        PROLOGUE: tl.constexpr, SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
        SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """out[0, n] = scale[n] * sum_k x[0, k] * q[n, k] for one row of x and int8/fp8 weights;
        sum_k x[0, k] * w[n, k] for dense weights (SCHEME 3, s_ptr unused).

        CUDA-core multiply-adds into a [BLOCK_N, BLOCK_K] float32 tile, reduced once at the end.
        Grid (cdiv(N, BLOCK_N), SPLIT_K). Rows past N are clamped to N - 1 (read, never written)
        so the weight loads carry no row mask; with EVEN_K they carry no mask at all.
        PROLOGUE, SWIGLU and HAS_RESIDUAL: the fusions (`Fusion`, `_load_x`, `_row_block`), g_ptr
        the norm weight and r_ptr the residual. PDL: see `pdl_launch`.
        """
        pdl_start(PDL)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n, rows = _row_block(pid_n, N, BLOCK_N, SWIGLU)
        k_start, k_end = _k_range(pid_k, K, BLOCK_K, SPLIT_K)
        acc, sq_t = _row_dots(w_ptr, rows, stride_wn, x_ptr, g_ptr, k_start, k_end, K, SCHEME,
                              FAST, PROLOGUE, EVEN_K, BLOCK_N, BLOCK_K, STAGES)
        if SCHEME != 3:
            acc = acc * tl.load(s_ptr + rows).to(tl.float32)
        offs_m = tl.arange(0, 1)
        _finish(acc[:, None], tl.sum(sq_t, axis=1), offs_n, offs_m, 1, N, K, eps, pid_n, pid_k,
                b_ptr, r_ptr, out_ptr, ws_ptr, cnt_ptr, N, HAS_BIAS, HAS_RESIDUAL, PROLOGUE >= 1,
                SWIGLU, SPLIT_K, PDL, BLOCK_N, 1)

    @triton.jit
    def _await_tag(words, ptrs, tag, FAST: tl.constexpr):
        """Tagged words (int32, a 16-bit value under the tag in the high half) loaded from ptrs,
        once each holds `tag` (int32, of words' shape): on the GPU, words of an older tag are
        read again until their producer has written them. The interpreter runs programs one
        after another, producers first, so a word of another tag there is a bug: it becomes
        0x7FC0, a NaN in bfloat16 and in float16, which the tests see."""
        if FAST:
            return tl.inline_asm_elementwise(_ASM_AWAIT_TAG, "=r,r,l,r", [words, ptrs, tag],
                                             dtype=tl.int32, is_pure=False, pack=1)
        else:
            return tl.where((words & -65536) == tag, words, 0x7FC0 | tag)

    @triton.jit
    def _tagged_to_f32(words, DTYPE: tl.constexpr):
        """The 16-bit values (DTYPE) of tagged words as float32: for bfloat16 one shift, which
        drops the tag."""
        if DTYPE == tl.bfloat16:
            return (words << 16).to(tl.float32, bitcast=True)
        else:
            return (words & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)

    @triton.jit
    def _tag_outputs(tag_ptr, stored, idx, mask, tag):
        """Store 16-bit values as tagged words: their bits under `tag` (int32, a nonzero high
        half) at tag_ptr + idx, so a word is never zero (`_feed_prepare` waits for nonzero
        words, `_await_tag` for this tag)."""
        bits = stored.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        tl.store(tag_ptr + idx, bits | tag, mask=mask)

    @triton.jit
    def _mlp_m1_kernel(
        x_ptr, g_ptr, w1_ptr, w2_ptr, r_ptr, out_ptr, tag_ptr, cnt_ptr,
        N1, K1, N2, stride_w1, stride_w2, eps,
        FAST: tl.constexpr, PDL: tl.constexpr, PROLOGUE: tl.constexpr,
        BLOCK_N1: tl.constexpr, BLOCK_K1: tl.constexpr, BLOCK_N2: tl.constexpr,
        BLOCK_K2: tl.constexpr, STAGES: tl.constexpr, SLOT: tl.constexpr,
        EVEN_K1: tl.constexpr, EVEN_K2: tl.constexpr,
    ):
        """A decode MLP in one launch, for one row of x and dense 16-bit weights:
        out = residual + w2 @ (SiLU(gate) * up) with [gate; up] = w1 @ RMSNorm(x) (w1 [N1 = 2H,
        K1], w2 [N2, H], g_ptr the norm's weight, unread with PROLOGUE 2: a norm without a
        weight, `Fusion`).

        The first cdiv(N1, BLOCK_N1) programs are gate_up's row blocks (as `_qgemv_m1_kernel`
        with the RMSNorm prologue and the SwiGLU epilogue); they store the hidden vector h [H]
        as tagged words: its 16-bit values under a tag in the high half. The other
        cdiv(N2, BLOCK_N2) programs are down's row blocks. Each starts streaming its weights at
        once and takes each tile of h as its words carry this launch's tag (`_await_tag`), so
        down's first weights are read while gate_up's last rows are, and no kernel boundary
        separates the two.

        The tag: cnt_ptr counts down's programs over every launch (each adds one as it
        leaves), so a launch starts with it at a multiple of C = cdiv(N2, BLOCK_N2), and every
        program of the launch reads a count below the next multiple: gate_up's programs read it
        before they store h, and no down program leaves before it has read all of h. Its
        quotient's parity, as 1 or 2 in the high half, differs from the tag the words hold
        from the launch before, and never matches zero (a fresh buffer). Launches of other
        configs (autotuning) keep their own count and words: SLOT picks them
        (`_mlp_buffers`). Gate_up's programs come first in the grid and wait on nothing, so
        they all run whatever down's programs wait for.

        Dense weights only: with one-byte weights (int8, fp8) the hidden vector's 4-byte words
        weigh a quarter as much as down's weights, and on an H100 the launch was 8-11% slower
        than the two GEMVs (BENCHMARKS.md).
        """
        pdl_start(PDL)
        pid = tl.program_id(0)
        blocks1 = tl.cdiv(N1, BLOCK_N1)
        consumers = tl.cdiv(N2, BLOCK_N2)
        H = N1 // 2
        cnt_ptr += SLOT
        tag_ptr += SLOT * H
        # Read where the counts are added (L2, not this SM's L1, which may hold an old line); a
        # plain load, as no ordering with the program's other loads is needed (see above).
        count = tl.load(cnt_ptr, cache_modifier=".cg")
        tag = (((count // consumers) & 1) + 1).to(tl.int32) << 16
        if pid < blocks1:
            offs_n, rows = _row_block(pid, N1, BLOCK_N1, True)
            acc, sq_t = _row_dots(w1_ptr, rows, stride_w1, x_ptr, g_ptr, 0, K1, K1, 3, FAST,
                                  PROLOGUE, EVEN_K1, BLOCK_N1, BLOCK_K1, STAGES)
            pdl_release(PDL)
            acc = acc / tl.sqrt_rn(tl.sum(sq_t, axis=1) / K1 + eps)
            gate, up = tl.split(tl.reshape(acc, (BLOCK_N1 // 2, 2)))
            h = (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty)
            offs_h = pid * (BLOCK_N1 // 2) + tl.arange(0, BLOCK_N1 // 2)
            _tag_outputs(tag_ptr, h, offs_h, offs_h < H, tag)
        else:
            # Names of their own: Triton types a name alike in both branches.
            pid_d = pid - blocks1
            offs_d, rows_d = _row_block(pid_d, N2, BLOCK_N2, False)
            offs_j = tl.arange(0, BLOCK_K2)
            w2_ptrs = w2_ptr + rows_d.to(tl.int64)[:, None] * stride_w2 + offs_j[None, :]
            acc_d = tl.zeros((BLOCK_N2, BLOCK_K2), tl.float32)
            tags = tl.full((BLOCK_K2,), 0, tl.int32) + tag
            for j0 in tl.range(0, H, BLOCK_K2, num_stages=STAGES):
                if EVEN_K2:
                    wd = tl.load(w2_ptrs + j0).to(tl.float32)
                    words = tl.load(tag_ptr + j0 + offs_j)
                else:
                    # Columns past H: weight 0 and a word that already carries the tag (value 0).
                    j_ok = (j0 + offs_j) < H
                    wd = tl.load(w2_ptrs + j0, mask=j_ok[None, :], other=0.0).to(tl.float32)
                    words = tl.load(tag_ptr + j0 + offs_j, mask=j_ok, other=tag)
                words = _await_tag(words, tag_ptr + j0 + offs_j, tags, FAST)
                acc_d += wd * _tagged_to_f32(words, out_ptr.dtype.element_ty)[None, :]
            out = tl.sum(acc_d, axis=1)
            pdl_release(PDL)
            _write_out(out[:, None], offs_d, tl.arange(0, 1), 1, N2, pid_d, out_ptr, r_ptr,
                       out_ptr, N2, False, True, False, BLOCK_N2, 1)
            tl.atomic_add(cnt_ptr, 1, sem="relaxed")

    @triton.jit
    def _int4_prescaled(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, rows, x_rows, offs_s, k_start, k_end, K,
                        stride_xm, stride_wn, stride_sn, acc3, sumsq, GROUP: tl.constexpr,
                        FAST: tl.constexpr, PROLOGUE: tl.constexpr, SUB_K: tl.constexpr,
                        K_SLICES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        STAGES: tl.constexpr, EVEN_K: tl.constexpr):
        """`_qgemv_dot_kernel`'s K loop for int4 with PRESCALE: (acc3, sumsq) after it."""
        NG: tl.constexpr = SUB_K // GROUP  # groups per slice
        HALF: tl.constexpr = GROUP // 2
        offs_g = tl.arange(0, NG)
        offs_j = tl.arange(0, HALF)
        offs_k = tl.arange(0, SUB_K)
        gidx = offs_s[:, None] * NG + offs_g[None, :]  # [K_SLICES, NG] groups in a tile
        byte_off = gidx[:, :, None] * HALF + offs_j[None, None, :]  # [K_SLICES, NG, HALF]
        # [K_SLICES, BLOCK_N, NG, HALF] bytes, [K_SLICES, BLOCK_N, NG] scales
        w_ptrs = (w_ptr + rows.to(tl.int64)[None, :, None, None] * stride_wn
                  + byte_off[:, None, :, :])
        g_ptrs = rows[None, :, None] * stride_sn + gidx[:, None, :]
        kk = offs_s[:, None] * SUB_K + offs_k[None, :]  # [K_SLICES, SUB_K] k in a tile
        x_offs = x_rows[None, None, :] * stride_xm + kk[:, :, None]
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            g0 = k0 // GROUP
            if EVEN_K:
                b = tl.load(w_ptrs + k0 // 2)
                s = tl.load(s_ptr + g_ptrs + g0)
                z = tl.load(z_ptr + g_ptrs + g0)
                xt, x_in = _x_tile(x_ptr, x_offs + k0, kk[:, :, None] + k0, None, g_ptr,
                                   PROLOGUE, False)
            else:
                g_ok = (k0 + gidx * GROUP) < K  # whole groups: K is a multiple of GROUP
                b = tl.load(w_ptrs + k0 // 2, mask=g_ok[:, None, :, None], other=0)
                s = tl.load(s_ptr + g_ptrs + g0, mask=g_ok[:, None, :], other=0.0)
                z = tl.load(z_ptr + g_ptrs + g0, mask=g_ok[:, None, :], other=0.0)
                xt, x_in = _x_tile(x_ptr, x_offs + k0, kk[:, :, None] + k0,
                                   ((k0 + kk) < K)[:, :, None], g_ptr, PROLOGUE, True)
            if PROLOGUE >= 1:
                sumsq += tl.sum(tl.sum(x_in * x_in, axis=1), axis=0)
            sf = s.to(tl.float32)
            s16 = tl.broadcast_to(sf.to(tl.bfloat16)[:, :, :, None], b.shape)
            m16 = tl.broadcast_to((-(z.to(tl.float32) * sf)).to(tl.bfloat16)[:, :, :, None],
                                  b.shape)
            low, high = _nibbles_to_weights(b, s16, m16, FAST)
            wt = tl.reshape(tl.join(low, high), (K_SLICES, BLOCK_N, SUB_K))  # k order restored
            acc3 = tl.dot(wt, xt, acc3)
        return acc3, sumsq

    @triton.jit
    def _qgemv_dot_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, g_ptr, r_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_wn, stride_sn, stride_om, eps,
        SCHEME: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, FAST: tl.constexpr,
        PROLOGUE: tl.constexpr, SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        PDL: tl.constexpr, M_P2: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr,
        K_SLICES: tl.constexpr, STAGES: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
        PRESCALE: tl.constexpr = False, PAD_M: tl.constexpr = False,
    ):
        """out^T[n, m] = sum_k w[n, k] * x[m, k] for a few rows of x, on tensor cores.

        Grid (cdiv(N, BLOCK_N), SPLIT_K). A K tile of K_SLICES * SUB_K is multiplied as a batch of
        K_SLICES products [BLOCK_N, SUB_K] @ [SUB_K, BLOCK_M] (the warps split the batch), summed
        once at the end. For int4 SUB_K == GROUP: each slice is one quantization group. Dense
        weights (SCHEME 3) are in x's dtype and have no scale (s_ptr unused).
        Rows of W past N and rows of x past M are clamped (read, never written). M_P2 is M's
        next power of two (the autotuner's key); the tile takes BLOCK_M = M_P2 rows of x, but 2
        for one row when the config sets PAD_M (K_SLICES > num_warps: a Triton miscompilation,
        see `_pads_m`).
        PROLOGUE, SWIGLU and HAS_RESIDUAL as `_qgemv_m1_kernel`; the prologue's result is rounded
        to x's dtype for the MMA.
        PRESCALE (int4, bfloat16 x): each nibble becomes the bfloat16 weight q * scale + m in
        registers (m = -zero * scale, both rounded to bfloat16 once per group), so the MMA sums
        whole slices of SUB_K (a multiple of GROUP) with no per-group work after it.
        """
        pdl_start(PDL)
        BLOCK_M: tl.constexpr = 2 if (PAD_M and M_P2 == 1) else M_P2
        BLOCK_K: tl.constexpr = SUB_K * K_SLICES
        DTYPE: tl.constexpr = x_ptr.dtype.element_ty
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n, rows = _row_block(pid_n, N, BLOCK_N, SWIGLU)
        offs_m = tl.arange(0, BLOCK_M)
        x_rows = tl.minimum(offs_m, M - 1)
        offs_s = tl.arange(0, K_SLICES)
        k_start, k_end = _k_range(pid_k, K, BLOCK_K, SPLIT_K)
        acc3 = tl.zeros((K_SLICES, BLOCK_N, BLOCK_M), tl.float32)
        sumsq = tl.zeros((BLOCK_M,), tl.float32)  # RMSNorm: sum of x^2 per row of x
        if SCHEME == 2 and PRESCALE:
            tl.static_assert(DTYPE == tl.bfloat16, "PRESCALE needs bfloat16 x")
            acc3, sumsq = _int4_prescaled(
                x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, rows, x_rows, offs_s, k_start, k_end, K,
                stride_xm, stride_wn, stride_sn, acc3, sumsq, GROUP, FAST, PROLOGUE, SUB_K,
                K_SLICES, BLOCK_N, BLOCK_K, STAGES, EVEN_K)
            acc = tl.sum(acc3, axis=0)
        elif SCHEME == 2:
            HALF: tl.constexpr = GROUP // 2
            OFFSET: tl.constexpr = 128.0 if DTYPE == tl.bfloat16 else 1024.0
            offs_j = tl.arange(0, HALF)
            offs_k = tl.arange(0, GROUP)
            byte_off = offs_s[:, None] * HALF + offs_j[None, :]  # [K_SLICES, HALF] bytes in a tile
            w_ptrs = w_ptr + rows.to(tl.int64)[None, :, None] * stride_wn + byte_off[:, None, :]
            kk = offs_s[:, None] * GROUP + offs_k[None, :]  # [K_SLICES, GROUP] k in a tile
            # x^T tile [K_SLICES, GROUP, BLOCK_M]
            x_offs = x_rows[None, None, :] * stride_xm + kk[:, :, None]
            g_ptrs = rows[None, :] * stride_sn + offs_s[:, None]  # [K_SLICES, BLOCK_N]
            for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
                g0 = k0 // GROUP
                if EVEN_K:
                    b = tl.load(w_ptrs + k0 // 2)
                    xt, x_in = _x_tile(x_ptr, x_offs + k0, kk[:, :, None] + k0, None, g_ptr,
                                       PROLOGUE, False)
                    s = tl.load(s_ptr + g_ptrs + g0)
                    z = tl.load(z_ptr + g_ptrs + g0)
                else:
                    s_ok = (k0 + offs_s * GROUP) < K  # whole groups: K is a multiple of GROUP
                    b = tl.load(w_ptrs + k0 // 2, mask=s_ok[:, None, None], other=0)
                    xt, x_in = _x_tile(x_ptr, x_offs + k0, kk[:, :, None] + k0,
                                       s_ok[:, None, None], g_ptr, PROLOGUE, True)
                    s = tl.load(s_ptr + g_ptrs + g0, mask=s_ok[:, None], other=0.0)
                    z = tl.load(z_ptr + g_ptrs + g0, mask=s_ok[:, None], other=0.0)
                if PROLOGUE >= 1:
                    sumsq += tl.sum(tl.sum(x_in * x_in, axis=1), axis=0)
                low, high = _nibbles_to_16bit(b, DTYPE, FAST)  # OFFSET + q, even and odd k
                wt = tl.reshape(tl.join(low, high), (K_SLICES, BLOCK_N, GROUP))  # k order restored
                d = tl.dot(wt, xt)  # [K_SLICES, BLOCK_N, BLOCK_M]: sum((OFFSET + q) * x) per group
                # [K_SLICES, BLOCK_M]: sum(x) per group. On CUDA cores from the same shared-memory
                # copy of x: a second MMA would want x in another layout, and two layouts stop
                # Triton from pipelining the x loads.
                x_sum = tl.sum(xt.to(tl.float32), axis=1)
                zo = z.to(tl.float32) + OFFSET
                acc3 += s.to(tl.float32)[:, :, None] * (d - zo[:, :, None] * x_sum[:, None, :])
            acc = tl.sum(acc3, axis=0)
        else:
            offs_k = tl.arange(0, SUB_K)
            kk = offs_s[:, None] * SUB_K + offs_k[None, :]  # [K_SLICES, SUB_K] offsets in a tile
            # W tile [K_SLICES, BLOCK_N, SUB_K], x^T tile [K_SLICES, SUB_K, BLOCK_M]
            w_ptrs = w_ptr + rows.to(tl.int64)[None, :, None] * stride_wn + kk[:, None, :]
            x_offs = x_rows[None, None, :] * stride_xm + kk[:, :, None]
            for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
                if EVEN_K:
                    wt = _rowwise_to_16bit(tl.load(w_ptrs + k0), SCHEME, DTYPE, FAST)
                    xt, x_in = _x_tile(x_ptr, x_offs + k0, kk[:, :, None] + k0, None, g_ptr,
                                       PROLOGUE, False)
                else:
                    k_ok = (k0 + kk) < K
                    w = tl.load(w_ptrs + k0, mask=k_ok[:, None, :])
                    wt = _rowwise_to_16bit(w, SCHEME, DTYPE, FAST)
                    wt = tl.where(k_ok[:, None, :], wt, 0.0)
                    xt, x_in = _x_tile(x_ptr, x_offs + k0, kk[:, :, None] + k0,
                                       k_ok[:, :, None], g_ptr, PROLOGUE, True)
                if PROLOGUE >= 1:
                    sumsq += tl.sum(tl.sum(x_in * x_in, axis=1), axis=0)
                acc3 = tl.dot(wt, xt, acc3)
            acc = tl.sum(acc3, axis=0)
            if SCHEME != 3:
                acc = acc * tl.load(s_ptr + rows).to(tl.float32)[:, None]
        _finish(acc, sumsq, offs_n, offs_m, M, N, K, eps, pid_n, pid_k, b_ptr, r_ptr, out_ptr, ws_ptr,
                cnt_ptr, stride_om, HAS_BIAS, HAS_RESIDUAL, PROLOGUE >= 1, SWIGLU, SPLIT_K, PDL,
                BLOCK_N, BLOCK_M)

    @triton.jit
    def _dp4a(a, b, c, FAST: tl.constexpr):
        """c + the sum over the 4 bytes of int32 a (unsigned) times those of b (signed)."""
        if FAST:
            return tl.inline_asm_elementwise(_ASM_DP4A, "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            total = c
            for i in tl.static_range(4):
                total += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
            return total

    @triton.jit
    def _pack_words(v):
        """[R, 4] int32 (their low bytes) -> [R] int32 words, byte b of word r = v[r, b]."""
        shift = (tl.arange(0, 4) * 8)[None, :]
        return tl.sum((v & 0xFF) << shift, axis=1)

    @triton.jit
    def _store_x_groups(xf, offs_g, g_ok, row, n_groups, plane, xw_ptr, xs_ptr, sx_ptr,
                        GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
        """xf [BLOCK_G, GROUP] float32, groups offs_g (g_ok: the ones to store) of row `row` of
        an x of n_groups groups a row -> the codes, sums and scales `_int4_x_kernel` describes.
        plane: words a plane (int64), M * K / 8 for M rows."""
        WPG: tl.constexpr = GROUP // 8  # weight words (8 codes each) per group
        amax = tl.max(tl.abs(xf), axis=1)
        scale = tl.where(amax > 0, amax / 32639.0, 1.0)
        q = tl.floor(xf / scale[:, None] + 0.5)
        q = tl.minimum(tl.maximum(q, -32639.0), 32639.0).to(tl.int32)
        hi = (q + 128) >> 8  # in [-128, 127]
        lo = q - hi * 256  # in [-128, 127]
        # column 8 * word + 2 * byte + parity
        hi_even, hi_odd = tl.split(tl.reshape(hi, (BLOCK_G * WPG, 4, 2)))
        lo_even, lo_odd = tl.split(tl.reshape(lo, (BLOCK_G * WPG, 4, 2)))
        word = tl.reshape(offs_g[:, None] * WPG + tl.arange(0, WPG)[None, :], (BLOCK_G * WPG,))
        ok = tl.reshape(tl.broadcast_to(g_ok[:, None], (BLOCK_G, WPG)), (BLOCK_G * WPG,))
        base = row.to(tl.int64) * (n_groups * WPG) + word
        tl.store(xw_ptr + base, _pack_words(hi_even), mask=ok)
        tl.store(xw_ptr + plane + base, _pack_words(hi_odd), mask=ok)
        tl.store(xw_ptr + 2 * plane + base, _pack_words(lo_even), mask=ok)
        tl.store(xw_ptr + 3 * plane + base, _pack_words(lo_odd), mask=ok)
        tl.store(xs_ptr + row * n_groups + offs_g, tl.sum(q, axis=1).to(tl.float32), mask=g_ok)
        tl.store(sx_ptr + row * n_groups + offs_g, scale, mask=g_ok)

    @triton.jit
    def _norm_groups(xf, w, ss_ptr, row, n_groups, offs_g, g_ok):
        """The RMSNorm's part of preparing x's groups xf [BLOCK_G, GROUP] float32: each group's
        sum of x^2 into ss_ptr [M, n_groups], and x * g (w, the norm weight's columns) returned.
        In float32 throughout: the 16-bit codes hold it more finely than x's dtype would (as the
        other GEMV kernels' fused norm, which rounds nothing either)."""
        tl.store(ss_ptr + row * n_groups + offs_g, tl.sum(xf * xf, axis=1), mask=g_ok)
        return xf * w

    @triton.jit
    def _int4_x_kernel(x_ptr, g_ptr, xw_ptr, xs_ptr, sx_ptr, ss_ptr, K, stride_x,
                       GROUP: tl.constexpr, BLOCK_G: tl.constexpr, NORM: tl.constexpr,
                       PDL: tl.constexpr):
        """x [M, K] -> what `_int4_dp4a_kernel` multiplies: per group of GROUP columns, its scale
        amax / 32639 and the codes q = round(x / scale) as 16-bit integers split into a high and
        a low byte (q = 256 * hi + lo, both signed), four int32 planes [4, M, K / 8] (high bytes
        of even columns, high of odd, low of even, low of odd: word i of a plane pairs with word i
        of a weight row, whose low nibbles are its even columns), and the sum of the group's q.

        NORM: the codes are of x * g (g_ptr the RMSNorm's weight), and ss_ptr [M, K / GROUP]
        gets each group's sum of x^2. The norm's 1 / rms scales every code of a row alike, so it
        cancels out of the codes and the GEMV applies it to its result (from those sums): no
        program needs the whole row. Grid (M, cdiv(K / GROUP, BLOCK_G)).
        """
        row = tl.program_id(0)
        n_groups = K // GROUP
        offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        g_ok = offs_g < n_groups
        k = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = g_ok[:, None] & (k < K)
        if NORM:
            w = tl.load(g_ptr + k, mask=mask, other=0.0).to(tl.float32)  # never written: early
        pdl_start(PDL)
        pdl_release(PDL)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + k, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        if NORM:
            xf = _norm_groups(xf, w, ss_ptr, row, n_groups, offs_g, g_ok)
        plane = tl.num_programs(0).to(tl.int64) * (K // 8)
        _store_x_groups(xf, offs_g, g_ok, row, n_groups, plane, xw_ptr, xs_ptr, sx_ptr, GROUP,
                        BLOCK_G)

    @triton.jit
    def _int4_dp4a_kernel(xw_ptr, xs_ptr, sx_ptr, ss_ptr, w_ptr, sz_ptr, b_ptr, r_ptr, out_ptr,
                          fw_ptr, fs_ptr, fsx_ptr, fss_ptr, fg_ptr, tag_ptr,
                          N, KW, stride_wn, stride_sn, eps,
                          GROUP: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                          SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FAST: tl.constexpr,
                          PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                          STAGES: tl.constexpr, EVEN_K: tl.constexpr, GROUPS_P2: tl.constexpr,
                          FEED_GROUP: tl.constexpr, FEED_NORM: tl.constexpr):
        """out[0, n] = sum_g scale[n, g] * sx[g] * (sum_{k in g} q[n, k] * xq[k] - zero[n, g] *
        sum_{k in g} xq[k]) for one row of x prepared by `_int4_x_kernel` (KW = K / 8 words).

        Integer products on the CUDA cores: each 32-bit word of a weight row holds 8 codes, its
        low nibbles the even columns (w & 0x0F0F0F0F) and its high nibbles the odd ones, and one
        dp4a multiplies four codes by four bytes of x. x's high and low bytes take two each, so
        8 weights cost 4 dp4a and 3 bit operations, against a conversion of every nibble to a
        float. Every thread holds several rows of the tile, so the x words it loads serve them
        all. Per group the integer sum becomes float once. sz_ptr: `pack_scale_zero` [N, K/G].
        NORM: x was prepared with the RMSNorm's weight (`_int4_x_kernel`); the result is divided
        by the row's rms, from the groups' sums of squares ss_ptr [K/G] (GROUPS_P2 >= K/G), summed
        in one fixed order whatever the tile. Grid (cdiv(N, BLOCK_N),).

        FEED_GROUP > 0 (one row, 16-bit output): the output also goes to the next Linear
        prepared in groups of FEED_GROUP (`_feed_prepare`) by one more program per PREP_COLUMNS
        outputs, past the row blocks: fw_ptr, fs_ptr, fsx_ptr get the planes, sums and scales,
        and tag_ptr [H] (H outputs) is the int32 words the row blocks hand the outputs over in.
        FEED_NORM: prepared for a Linear with an RMSNorm of weight fg_ptr [H], and fss_ptr gets
        the groups' sums of squares (as `_int4_x_kernel` with NORM).
        """
        # Two calls of `_int4_dp4a_rows`: the feed programs' branch exists only with FEED_GROUP
        # (a branch on a runtime value would be compiled whatever FEED_GROUP is).
        if FEED_GROUP > 0:
            if tl.program_id(0) >= tl.cdiv(N, BLOCK_N):
                if SWIGLU:
                    H = N // 2
                else:
                    H = N
                _feed_prepare(out_ptr, tag_ptr, fw_ptr, fs_ptr, fsx_ptr, fss_ptr, fg_ptr,
                              tl.program_id(0) - tl.cdiv(N, BLOCK_N), H, FEED_GROUP, FEED_NORM,
                              PDL)
            else:
                _int4_dp4a_rows(xw_ptr, xs_ptr, sx_ptr, ss_ptr, w_ptr, sz_ptr, b_ptr, r_ptr,
                                out_ptr, tag_ptr, N, KW, stride_wn, stride_sn, eps, GROUP, NORM,
                                HAS_BIAS, SWIGLU, HAS_RESIDUAL, FAST, PDL, BLOCK_N, BLOCK_W,
                                STAGES, EVEN_K, GROUPS_P2, True)
        else:
            _int4_dp4a_rows(xw_ptr, xs_ptr, sx_ptr, ss_ptr, w_ptr, sz_ptr, b_ptr, r_ptr, out_ptr,
                            tag_ptr, N, KW, stride_wn, stride_sn, eps, GROUP, NORM, HAS_BIAS,
                            SWIGLU, HAS_RESIDUAL, FAST, PDL, BLOCK_N, BLOCK_W, STAGES, EVEN_K,
                            GROUPS_P2, False)

    @triton.jit
    def _feed_prepare(out_ptr, tag_ptr, xw_ptr, xs_ptr, sx_ptr, ss_ptr, g_ptr, chunk, H,
                      GROUP: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
        """One feed program of `_int4_dp4a_kernel`: prepare chunk `chunk` (PREP_COLUMNS outputs)
        of the output h [1, H] as `_int4_x_kernel` would (with NORM, for a Linear with an
        RMSNorm of weight g_ptr), once the row blocks have written it.

        The row blocks also store each output as a tagged word in tag_ptr [H] (`_tag_outputs`),
        which holds zeros between launches: the program reads its chunk until no word is zero,
        so the value it waits for is the flag itself and needs no fence or atomic on either
        side, then zeroes the words. Feed programs come after every row block in the grid and
        row blocks wait on nothing, so the words they wait for are always written."""
        pdl_release(PDL)
        BLOCK_G: tl.constexpr = PREP_COLUMNS // GROUP
        n_groups = H // GROUP
        offs_g = chunk * BLOCK_G + tl.arange(0, BLOCK_G)
        g_ok = offs_g < n_groups
        k = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = tl.broadcast_to(g_ok[:, None], (BLOCK_G, GROUP))
        if NORM:
            w = tl.load(g_ptr + k, mask=mask, other=0.0).to(tl.float32)
        words = tl.load(tag_ptr + k, mask=mask, other=1, volatile=True)
        while tl.min(tl.min(words, axis=1), axis=0) == 0:
            words = tl.load(tag_ptr + k, mask=mask, other=1, volatile=True)
        tl.store(tag_ptr + k, tl.zeros_like(words), mask=mask)  # ready for the next launch
        hf = _tagged_to_f32(words, out_ptr.dtype.element_ty)
        row = tl.program_id(1)  # 0: the grid is one-dimensional
        if NORM:
            hf = _norm_groups(hf, w, ss_ptr, row, n_groups, offs_g, g_ok)
        _store_x_groups(hf, offs_g, g_ok, row, n_groups, (H // 8).to(tl.int64), xw_ptr, xs_ptr,
                        sx_ptr, GROUP, BLOCK_G)

    @triton.jit
    def _int4_dp4a_rows(xw_ptr, xs_ptr, sx_ptr, ss_ptr, w_ptr, sz_ptr, b_ptr, r_ptr, out_ptr,
                        tag_ptr, N, KW, stride_wn, stride_sn, eps,
                        GROUP: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FAST: tl.constexpr,
                        PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                        STAGES: tl.constexpr, EVEN_K: tl.constexpr, GROUPS_P2: tl.constexpr,
                        FEED: tl.constexpr):
        """One row block of `_int4_dp4a_kernel`; with FEED it also stores its outputs tagged for
        the feed programs (`_tag_outputs`)."""
        WPG: tl.constexpr = GROUP // 8
        NGT: tl.constexpr = BLOCK_W // WPG  # groups per tile
        pdl_start(PDL)
        if NORM:  # issued first, used last: its latency hides behind the loop
            offs_ss = tl.arange(0, GROUPS_P2)
            ss = tl.load(ss_ptr + offs_ss, mask=offs_ss < KW // WPG, other=0.0)
        pid_n = tl.program_id(0)
        offs_n, rows = _row_block(pid_n, N, BLOCK_N, SWIGLU)
        offs_w = tl.arange(0, BLOCK_W)
        offs_t = tl.arange(0, NGT)
        rows64 = rows.to(tl.int64)
        w_ptrs = w_ptr + rows64[:, None] * stride_wn + offs_w[None, :]
        sz_ptrs = sz_ptr + rows64[:, None] * stride_sn + offs_t[None, :]
        acc = tl.zeros((BLOCK_N, NGT), tl.float32)
        for w0 in tl.range(0, KW, BLOCK_W, num_stages=STAGES):
            g0 = w0 // WPG
            if EVEN_K:
                w = tl.load(w_ptrs + w0)
                x_he = tl.load(xw_ptr + w0 + offs_w)
                x_ho = tl.load(xw_ptr + KW + w0 + offs_w)
                x_le = tl.load(xw_ptr + 2 * KW + w0 + offs_w)
                x_lo = tl.load(xw_ptr + 3 * KW + w0 + offs_w)
                xs = tl.load(xs_ptr + g0 + offs_t)
                sx = tl.load(sx_ptr + g0 + offs_t)
                sz = tl.load(sz_ptrs + g0)
            else:
                # Whole groups past K are masked: x's sums and scales 0, so they add nothing.
                w_ok = (w0 + offs_w) < KW
                g_ok = (w0 + offs_t * WPG) < KW
                w = tl.load(w_ptrs + w0, mask=w_ok[None, :], other=0)
                x_he = tl.load(xw_ptr + w0 + offs_w, mask=w_ok, other=0)
                x_ho = tl.load(xw_ptr + KW + w0 + offs_w, mask=w_ok, other=0)
                x_le = tl.load(xw_ptr + 2 * KW + w0 + offs_w, mask=w_ok, other=0)
                x_lo = tl.load(xw_ptr + 3 * KW + w0 + offs_w, mask=w_ok, other=0)
                xs = tl.load(xs_ptr + g0 + offs_t, mask=g_ok, other=0.0)
                sx = tl.load(sx_ptr + g0 + offs_t, mask=g_ok, other=0.0)
                sz = tl.load(sz_ptrs + g0, mask=g_ok[None, :], other=0)
            w_even = w & 0x0F0F0F0F
            w_odd = (w >> 4) & 0x0F0F0F0F
            none = tl.zeros_like(w)
            high = _dp4a(w_even, x_he[None, :], _dp4a(w_odd, x_ho[None, :], none, FAST), FAST)
            low = _dp4a(w_even, x_le[None, :], _dp4a(w_odd, x_lo[None, :], none, FAST), FAST)
            # |sum| < 2**31 for a group of up to 256 codes (15 * 32639 * 256 * 1.004)
            dot = tl.sum(tl.reshape(high * 256 + low, (BLOCK_N, NGT, WPG)), axis=2)
            scale = (sz << 16).to(tl.float32, bitcast=True)
            zero = (sz & -65536).to(tl.float32, bitcast=True)
            acc += (dot.to(tl.float32) - zero * xs[None, :]) * (scale * sx[None, :])
        result = tl.sum(acc, axis=1)
        pdl_release(PDL)
        if NORM:
            result = result / tl.sqrt_rn(tl.sum(ss, axis=0) / (KW * 8) + eps)
        stored, idx, mask = _write_out(result[:, None], offs_n, tl.arange(0, 1), 1, N, pid_n,
                                       b_ptr, r_ptr, out_ptr, N, HAS_BIAS, HAS_RESIDUAL, SWIGLU,
                                       BLOCK_N, 1)
        if FEED:
            _tag_outputs(tag_ptr, stored, idx, mask, 0x10000)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn,
                        SCHEME: tl.constexpr, GROUP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[n, k] = dequantized w[n, k] in out's dtype; grid (N / BLOCK_N, K / BLOCK_K)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        n_ok = offs_n < N
        rows = offs_n.to(tl.int64)  # N * K may pass 2**31
        if SCHEME == 2:
            HALF: tl.constexpr = BLOCK_K // 2
            NGB: tl.constexpr = BLOCK_K // GROUP
            offs_h = tl.arange(0, HALF)
            offs_g = tl.arange(0, NGB)
            b = tl.load(w_ptr + rows[:, None] * stride_wn + k0 // 2 + offs_h[None, :],
                        mask=n_ok[:, None] & ((k0 // 2 + offs_h[None, :]) < K // 2), other=0)
            b = b.to(tl.int32)
            q = tl.join(_nibble_to_f32(b & 0xF), _nibble_to_f32(b >> 4))  # [BLOCK_N, HALF, 2]
            q = tl.reshape(q, (BLOCK_N, NGB, GROUP))
            g_ptrs = offs_n[:, None] * stride_sn + k0 // GROUP + offs_g[None, :]
            g_ok = n_ok[:, None] & ((k0 // GROUP + offs_g[None, :]) < K // GROUP)
            s = tl.load(s_ptr + g_ptrs, mask=g_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g_ptrs, mask=g_ok, other=0.0).to(tl.float32)
            w = tl.reshape((q - z[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))
        else:
            offs_k = tl.arange(0, BLOCK_K)
            ok = n_ok[:, None] & ((k0 + offs_k[None, :]) < K)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + k0 + offs_k[None, :], mask=ok)
            s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            w = _rowwise_to_f32(w, SCHEME, False) * s[:, None]  # masked lanes are never stored
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (offs_k[None, :] < K))


    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, K, stride_x, stride_o, eps,
                         BLOCK_K: tl.constexpr, PDL: tl.constexpr, HAS_WEIGHT: tl.constexpr):
        """out[m] = RMSNorm(x[m]) * w, as `rms_norm_ref` (normalised in float32, rounded to x's
        dtype, times the weight, if HAS_WEIGHT); grid (M,), one row of K <= BLOCK_K per program.
        Under PDL it launches while the GEMV before it finishes and lets the next one launch at
        once."""
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        if HAS_WEIGHT:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # never written: early
        pdl_start(PDL)
        pdl_release(PDL)
        row = tl.program_id(0).to(tl.int64)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        y = x / tl.sqrt_rn(tl.sum(x * x, axis=0) / K + eps)
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            y = y * w
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qgemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_wn, stride_om,
                      SCHEME: tl.constexpr, HAS_BIAS: tl.constexpr, FAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      STAGES: tl.constexpr, EVEN_K: tl.constexpr):
        """out[m, n] = scale[n] * sum_k x[m, k] * q[n, k] (+ bias) for many rows of x (prefill),
        on tensor cores, the row-wise quantized weight converted in registers: never written out
        in x's dtype (dequantize + cuBLAS writes and reads 4 bytes a weight more).

        out^T = W @ x^T tile by tile: the weight tile [BLOCK_N, BLOCK_K] is the MMA's first
        operand, which Hopper's MMA (wgmma) takes from registers, right where it is converted;
        x^T [BLOCK_K, BLOCK_M] comes from shared memory. The codes convert exactly to x's 16-bit
        dtype and the row scale multiplies the float32 result once. Only fp8 takes it (see
        `_gemm`). Grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) programs, the M tiles of one row
        block next to each other, so a row block's weights come from DRAM once and then from L2.
        M_BUCKET (M rounded up to a power of two) is only the autotuning key.
        """
        DTYPE: tl.constexpr = x_ptr.dtype.element_ty
        pid = tl.program_id(0)
        m_tiles = tl.cdiv(M, BLOCK_M)
        pid_m = pid % m_tiles
        pid_n = pid // m_tiles
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped: loads need no row mask
        x_rows = tl.minimum(offs_m, M - 1)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + x_rows[None, :].to(tl.int64) * stride_xm + offs_k[:, None]  # x^T tile
        w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            if EVEN_K:
                xt = tl.load(x_ptrs + k0)
                wt = _rowwise_to_16bit(tl.load(w_ptrs + k0), SCHEME, DTYPE, FAST)
            else:
                xt = tl.load(x_ptrs + k0, mask=(k0 + offs_k[:, None]) < K, other=0.0)
                k_ok = (k0 + offs_k[None, :]) < K
                wt = _rowwise_to_16bit(tl.load(w_ptrs + k0, mask=k_ok), SCHEME, DTYPE, FAST)
                wt = tl.where(k_ok, wt, 0.0)  # masked lanes hold anything
            acc = tl.dot(wt, xt, acc)
        acc = acc * tl.load(s_ptr + rows).to(tl.float32)[:, None]
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + rows).to(tl.float32)[:, None]
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        tl.store(out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configurations and autotuning
# ----------------------------------------------------------------------------------------------

# Launch configurations, few on purpose: every one is compiled (about a second each) and timed at
# the first call of each shape. Tiles of 4-16 KB per pipeline stage keep 16-48 KB of weights in
# flight per SM, about what an H100 needs to cover DRAM latency at full bandwidth.
#
# (BLOCK_N, BLOCK_K, num_warps, STAGES) for int8/fp8 with M == 1. BLOCK_N * BLOCK_K / threads <= 64
# keeps the float32 tile in registers.
_M1_CONFIGS = ((16, 512, 4, 3), (8, 512, 4, 4), (16, 1024, 8, 3), (32, 256, 4, 4), (4, 1024, 4, 4))
# The same for dense 2-byte weights: the int8 tiles' bytes (4-16 KB a stage) at half the elements
# per row, one 16-byte load being 8 elements; the float32 tile stays at <= 32 registers a thread.
# Small BLOCK_N gives the 4096-row shapes 256-1024 row blocks, so few need split-K.
_M1_DENSE_CONFIGS = ((8, 512, 4, 4), (16, 256, 4, 4), (4, 1024, 4, 4), (16, 512, 8, 3),
                     (8, 256, 4, 4), (32, 256, 8, 3))
# (BLOCK_N, SUB_K, K_SLICES, num_warps, STAGES) for the tensor-core kernel, int8/fp8. Triton puts
# the warps of a batched dot on the batch axis, so K_SLICES >= num_warps (fewer slices than warps
# would repeat work).
_DOT_ROWWISE_CONFIGS = ((16, 128, 4, 4, 4), (32, 128, 4, 4, 3), (64, 64, 4, 4, 3),
                        (16, 128, 8, 8, 3))
# The same for dense 2-byte weights: the int8 tiles' bytes, half the K elements per slice.
_DOT_DENSE_CONFIGS = ((16, 64, 4, 4, 4), (32, 64, 4, 4, 3), (16, 128, 4, 4, 3), (16, 64, 8, 8, 3))
# (BLOCK_N, bytes per row per tile, num_warps, STAGES) for int4. SUB_K is the group size and
# K_SLICES = max(num_warps, 2 * bytes / group); BLOCK_N <= 32 keeps the nibbles in registers.
# For G < 128, and for the last tile at G = 128, that is more slices than warps, so those
# configs pad one row of x to two (PAD_M, see `_pads_m`).
# The three-stage twins of the first two were the fastest at one row for gate_up and qkv in a
# sweep on an H100 (30.4 against 31.6 us, 10.0 against 10.3 us autotuned without them). The last
# two are not pipelined (one stage: loads straight to registers, no shared-memory staging and no
# barrier a step): at G = 32, gate_up 38.3 against 46.7 us and qkv 11.2 against 12.7 us autotuned
# without them (BENCHMARKS.md).
_DOT_INT4_CONFIGS = ((16, 256, 4, 4), (32, 256, 4, 4), (16, 512, 8, 4), (32, 256, 8, 3),
                     (16, 256, 4, 3), (32, 256, 4, 3), (32, 256, 4, 1), (16, 512, 4, 1))
# Added for more than one row of x and G >= 128: at 16 rows it made gate_up 73.5 against 77.1 us
# and int4 decode of 16 rows 5% faster. Its 8 slices on 4 warps pad one row of x to two; when
# that padding applied to every config of the set it made one-row decode 5% slower
# (BENCHMARKS.md), so one row keeps the set above.
_DOT_INT4_BATCH_CONFIGS = ((32, 512, 4, 3),)
# (BLOCK_N, SUB_K, num_warps, STAGES) for int4 with PRESCALE (bfloat16 x): SUB_K is raised to the
# group size where smaller, K_SLICES = num_warps. From a sweep of 48 tiles at G = 32 on an H100
# (BLOCK_N 16/32, SUB_K 128/256, 4/8 warps, 2-4 stages, with and without a 64-register cap): the
# first two were the fastest uncapped tiles for gate_up (44.8 us) and down (23.8 us); the third
# serves more rows. Programs of 1 or 2 warps were slower at G = 32 and 128 (BENCHMARKS.md).
_DOT_INT4_PRESCALE_CONFIGS = ((16, 128, 4, 3), (16, 128, 4, 4), (32, 128, 4, 3))
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES) for the fp8 prefill GEMM (`_qgemm_kernel`).
# BLOCK_N (weight rows) is the MMA's M side, 64 per warp group. Of nine tiles timed at M = 1024 on
# an H100, the first was fastest at gate_up and down and the last at qkv (BENCHMARKS.md); the
# smaller BLOCK_M serve fewer rows (configs with BLOCK_M > 2 * M are pruned).
_GEMM_CONFIGS = ((256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4),
                 (32, 128, 64, 4, 4), (256, 64, 64, 4, 4))
# (BLOCK_N, BLOCK_W weight words a row, num_warps, STAGES) for `_int4_dp4a_kernel`: the fastest
# of 36 tiles (BLOCK_N 4/8/16, 128-512 words, 2-3 stages, split-K 1-2) at each Llama-3.1-8B shape
# and groups 32 and 128 on an H100 (BENCHMARKS.md); split-K never won.
_DP4A_CONFIGS = ((8, 256, 4, 2), (8, 256, 4, 3), (16, 256, 4, 2), (16, 128, 4, 3), (8, 512, 4, 2))
# (BLOCK_N1, BLOCK_K1, BLOCK_N2, BLOCK_K2, num_warps, STAGES) for `_mlp_m1_kernel`, dense 2-byte
# weights: gate_up's and down's tiles. On an H100 (32 layers of gate_up -> down in a CUDA graph,
# BENCHMARKS.md), us a layer against 117.93 for the two GEMVs at the 8B shape and 93.94 at the 7B
# one: 117.04 / 92.40, 116.77 / 94.21, 117.57 / 93.09; tiles of 8 x 512 for both 118.73 / 94.32.
_MLP_DENSE_CONFIGS = ((4, 1024, 4, 1024, 4, 4), (4, 1024, 8, 512, 4, 4), (8, 512, 4, 1024, 4, 4))
_MAX_SPLIT_K = 8
_SPLIT_TILES_MIN = 2  # never split K into pieces of fewer BLOCK_K tiles than this


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: splitting buys nothing on the CPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _choose_split_k(n_blocks: int, k_tiles: int, sms: int) -> int:
    """Smallest power of two giving >= 2 programs per SM, each keeping >= 2 K tiles."""
    split = 1
    while (n_blocks * split < 2 * sms and split < _MAX_SPLIT_K
           and k_tiles >= 2 * split * _SPLIT_TILES_MIN):
        split *= 2
    return split


def _block_k(kwargs: dict) -> int:
    return kwargs["BLOCK_K"] if "BLOCK_K" in kwargs else kwargs["SUB_K"] * kwargs["K_SLICES"]


def _with_split(configs, n: int, k: int, sms: int, smaller_splits: bool = False) -> list:
    """Each config with SPLIT_K = `_choose_split_k`'s choice for the shape, and with
    `smaller_splits` (int4) also 1, 2, 4, ... below it.

    On an H100 the int4 o projection (4096 x 4096) took 7.8 us unsplit against 8.7 us at the
    chosen 4, and down (4096 x 14336) 17.1 us at 2 against 19.0 us at 4. For int8 and bf16 the
    extra candidates changed nothing end to end but cost ~5 s of first-call tuning, so they are
    int4's only (BENCHMARKS.md).
    """
    out = []
    for c in configs:
        kw = dict(c.kwargs)
        top = _choose_split_k(_cdiv(n, kw["BLOCK_N"]), _cdiv(k, _block_k(kw)), sms)
        split = 1 if smaller_splits else top
        while split <= top:
            out.append(triton.Config(dict(kw, SPLIT_K=split), num_warps=c.num_warps,
                                     num_stages=c.num_stages))
            split *= 2
    return out


def _prune(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    return _with_split(configs, named_args["N"], named_args["K"], _sm_count(x.device),
                       kwargs.get("SCHEME") == INT4)


def _prune_gemm(configs, named_args, **kwargs):
    """The GEMM's tiles for M rows: none taller than twice M (BLOCK_M 32 always stays)."""
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, 2 * named_args["M_BUCKET"])]


_TUNING_REPS = 20
_FLUSH_BYTES = 256 * 1024 * 1024


def _tuning_bench(fn, quantiles):
    """Time one autotuning candidate: quantiles of _TUNING_REPS runs, each from an emptied L2.

    L2 (50 MB on an H100) is emptied by *reading* a 256 MB buffer, so it is left holding clean
    lines; triton.testing.do_bench zeroes its buffer instead, and the dirty lines it leaves are
    written back during the timed kernel, penalizing exactly the small, fast kernels tuned here.
    """
    flush = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(_TUNING_REPS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(_TUNING_REPS)]
    for start, end in zip(starts, ends):
        flush.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)])
    return [float(torch.quantile(times, q)) for q in quantiles]


def _autotune_kwargs() -> dict:
    params = inspect.signature(triton.autotune).parameters
    # Where Triton can, the chosen config is kept in its on-disk cache (TRITON_CACHE_DIR), so a
    # second process skips the timing runs of every shape.
    kwargs = {"cache_results": True} if "cache_results" in params else {}
    if "do_bench" in params:
        return {**kwargs, "do_bench": _tuning_bench}
    return {**kwargs, "warmup": 5, "rep": 25}  # older Triton: its own do_bench


def _make_configs(scheme: int, kind: str, group: int, one_row: bool = False,
                  prescale: bool = False) -> list:
    """The base launch configurations (SPLIT_K = 1) of one scheme and kernel kind, for one row
    of x or for more; with `prescale` (int4, bfloat16 x) the PRESCALE ones too."""
    if kind == "m1":
        table = _M1_DENSE_CONFIGS if scheme == DENSE else _M1_CONFIGS
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "SPLIT_K": 1},
                              num_warps=nw, num_stages=st) for bn, bk, nw, st in table]
    extra = []
    if scheme == INT4:
        batch = () if one_row or group < 128 else _DOT_INT4_BATCH_CONFIGS
        table = [(bn, group, max(nw, 2 * row_bytes // group), nw, st)
                 for bn, row_bytes, nw, st in _DOT_INT4_CONFIGS + batch]
        if prescale:
            extra = [triton.Config({"BLOCK_N": bn, "SUB_K": max(sub, group), "K_SLICES": nw,
                                    "STAGES": st, "SPLIT_K": 1, "PRESCALE": True, "PAD_M": False},
                                   num_warps=nw, num_stages=st)
                     for bn, sub, nw, st in _DOT_INT4_PRESCALE_CONFIGS]
    elif scheme == DENSE:
        table = _DOT_DENSE_CONFIGS
    else:
        table = _DOT_ROWWISE_CONFIGS
    return [triton.Config({"BLOCK_N": bn, "SUB_K": sub, "K_SLICES": ks, "STAGES": st, "SPLIT_K": 1,
                           "PAD_M": _pads_m(ks, nw)},
                          num_warps=nw, num_stages=st) for bn, sub, ks, nw, st in table] + extra


@functools.lru_cache(maxsize=None)
def _tuned_kernel(scheme: int, kind: str, group: int, one_row: bool = False,
                  prescale: bool = False):
    """The autotuned launcher for one scheme, kernel kind ("m1", "dot" or "gemm"), int4 group
    size, one row of x or more, and PRESCALE allowed or not (`_make_configs`)."""
    if kind == "gemm":
        base, prune, key = _qgemm_kernel, _prune_gemm, ["M_BUCKET", "N", "K"]
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st},
                                 num_warps=nw, num_stages=st) for bm, bn, bk, nw, st in _GEMM_CONFIGS]
    else:
        base = _qgemv_m1_kernel if kind == "m1" else _qgemv_dot_kernel
        prune = _prune
        key = ["N", "K", "PROLOGUE", "SWIGLU", "HAS_RESIDUAL"] + ([] if kind == "m1" else ["M_P2"])
        configs = _make_configs(scheme, kind, group, one_row, prescale)
    with_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % _block_k(a) == 0})(base)
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           **_autotune_kwargs())(with_even_k)


@functools.lru_cache(maxsize=None)
def _tuned_dp4a():
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_W": bw, "STAGES": st}, num_warps=nw,
                             num_stages=st) for bn, bw, nw, st in _DP4A_CONFIGS]
    with_even = triton.heuristics({"EVEN_K": lambda a: a["KW"] % a["BLOCK_W"] == 0})(
        _int4_dp4a_kernel)
    return triton.autotune(configs=configs,
                           key=["N", "KW", "GROUP", "SWIGLU", "HAS_RESIDUAL", "FEED_GROUP"],
                           **_autotune_kwargs())(with_even)


@functools.lru_cache(maxsize=None)
def _tuned_mlp():
    configs = [triton.Config({"BLOCK_N1": bn1, "BLOCK_K1": bk1, "BLOCK_N2": bn2, "BLOCK_K2": bk2,
                              "STAGES": st, "SLOT": slot}, num_warps=nw, num_stages=st)
               for slot, (bn1, bk1, bn2, bk2, nw, st) in enumerate(_MLP_DENSE_CONFIGS)]
    even = triton.heuristics({"EVEN_K1": lambda a: a["K1"] % a["BLOCK_K1"] == 0,
                              "EVEN_K2": lambda a: (a["N1"] // 2) % a["BLOCK_K2"] == 0})
    return triton.autotune(configs=configs, key=["N1", "K1", "N2"],
                           **_autotune_kwargs())(even(_mlp_m1_kernel))


# On by default. On an H100 (decode-8b, one process per run, same machine): bf16 184.6 against
# 183.0 tokens/s, int8 303.0 against 299.7, int4 347.6 against 347.7 (BENCHMARKS.md, eighth
# session); earlier pairs gave bf16 180.8 / 179.3 and int8 with its head 315.7 / 311.1. Each kernel
# waits before reading anything another kernel wrote and releases its dependents once its
# weights are read, so the next launch overlaps this kernel's tail.
_PDL = {"enabled": True}


def use_pdl(enabled: bool) -> None:
    """Turn programmatic dependent launch of tachylm's kernels on (the default) or off."""
    _PDL["enabled"] = bool(enabled)


@functools.lru_cache(maxsize=None)
def _pdl_supported(device: torch.device) -> bool:
    if not (HAS_TRITON and device.type == "cuda"):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return ("launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
            and hasattr(tl.extra.cuda, "gdc_wait")
            and torch.cuda.get_device_capability(device) >= (9, 0))


def pdl_launch(device: torch.device) -> dict:
    """Programmatic dependent launch (Hopper and newer, a Triton that has it): the kernel's launch
    overlaps the end of the kernel before it, and the kernel waits (`pdl_start`) before it reads
    anything that kernel wrote. Returns the launch keywords: PDL for the kernel, launch_pdl for
    Triton's launcher; {"PDL": False} elsewhere (the interpreter, older GPUs and Triton)."""
    if _PDL["enabled"] and _pdl_supported(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


_PERSISTENT: dict = {}
_COUNTER_SLOTS = 4096


def persistent_zeros(name: str, device: torch.device, numel: int,
                     dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A zeroed buffer kept for the life of the process, one per (name, device, numel, dtype):
    the counters and state that kernels leave as they found them (or advance on purpose), so
    every launch on a stream shares them.

    They must not come from a CUDA-graph memory pool. During the warm-up runs of torch.compile's
    CUDA-graph trees (which may be the first call of a layer) every allocation of the calling
    thread goes to the graphs' private pool, where each live block must be a graph output: a
    buffer there fails the trees' pool check ("tensor(s) in the cudagraph pool not tracked as
    outputs") or is handed out again when they restore a pool checkpoint. Allocations of other
    threads are not redirected, so a helper thread makes them.
    """
    key = (name, device, numel, dtype)
    buffer = _PERSISTENT.get(key)
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the kernels' first call on a device must not be inside CUDA "
                               f"graph capture ({name}): call the layer once before capturing "
                               "(a warm-up)")

        def allocate() -> torch.Tensor:
            zeros = torch.zeros(numel, dtype=dtype, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # zeroed on this thread's stream: wait for it
            return zeros

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            buffer = pool.submit(allocate).result()
        _PERSISTENT[key] = buffer
    return buffer


def split_counters(device: torch.device, needed: int = 0) -> torch.Tensor:
    """Per-device arrival counters for split-K (and split-KV attention); every launch leaves
    them at zero again, so kernels on one stream share them (`persistent_zeros`). `needed`:
    slots the launch uses."""
    if needed > _COUNTER_SLOTS:
        raise RuntimeError(f"a split launch needs {needed} counters, more than {_COUNTER_SLOTS}")
    return persistent_zeros("split counters", device, _COUNTER_SLOTS)


@functools.lru_cache(maxsize=None)
def _split_needs(scheme: int, kind: str, group: int, one_row: bool, prescale: bool, n: int,
                 k: int, sms: int) -> tuple:
    """(largest SPLIT_K, most row blocks among split configs) the autotuner may pick for a shape."""
    configs = _with_split(_make_configs(scheme, kind, group, one_row, prescale), n, k, sms,
                          scheme == INT4)
    max_split = max(c.kwargs["SPLIT_K"] for c in configs)
    n_blocks = max((_cdiv(n, c.kwargs["BLOCK_N"]) for c in configs if c.kwargs["SPLIT_K"] > 1),
                   default=0)
    return max_split, n_blocks


def _pads_m(k_slices: int, num_warps: int) -> bool:
    """Whether a `_qgemv_dot_kernel` config must pad one row of x to two (its PAD_M): where it
    gives a warp more than one slice (K_SLICES > num_warps). Decided per config: padding costs
    the one-row tiles that do not need it 2-10% (BENCHMARKS.md, twelfth session).

    Triton 3.6's MMAv2 lowering of a batched (3-D) `tl.dot` (TritonNVIDIAGPUToLLVM MMAv2.cpp,
    `batchOffset`) steps from one batch entry of a warp to the next by the elements per thread of
    the [BLOCK_N, BLOCK_M] result, which for a one-column result counts that column once, while
    every m16n8 MMA writes four accumulators (two columns). With BLOCK_M == 1 the batch entries'
    accumulators overlap: a warp's second slice starts from its first slice's rows r + 8 (in
    place of zero) and those rows are lost; the PTX shows the second slice's MMAs tied to two of
    the first slice's registers. On an H100 this gave int4 with group 64 at M = 1 (K_SLICES 8 or
    16 on 4 or 8 warps) a relative error of ~7 on every call; the interpreter does not lower
    `tl.dot` this way and was right. From BLOCK_M = 2 the offset covers the four accumulators.
    Only int4 has such configs (most at G = 32 and 64; at G = 128 the one-stage 8-slice tile).
    tests/test_kernels.py compiles the int4 configs for sm_90 and checks the MMAs.
    """
    return k_slices > num_warps


def _kernel_kind(scheme: int, m: int) -> str:
    # int4 takes the tensor cores here: unpacking nibbles straight into 16-bit MMA operands is
    # cheaper than converting them to float32 for CUDA-core multiply-adds, even for one row. (One
    # row with the packed scales takes integer products instead: `_int4_dp4a_gemv`.)
    return "m1" if m == 1 and scheme != INT4 else "dot"


def _gemv_applies(scheme: int, m: int, dtype: torch.dtype) -> bool:
    """Whether x [m, K] of `dtype` takes a GEMV kernel (else cuBLAS, after dequantizing)."""
    max_m = DENSE_GEMV_MAX_M if scheme == DENSE else GEMV_MAX_M
    # The tensor-core kernel multiplies in x's 16-bit dtype; float32 x takes cuBLAS instead.
    return 1 <= m <= max_m and (dtype != torch.float32 or _kernel_kind(scheme, m) == "m1")


def _norm_prologue(norm_weight: Optional[torch.Tensor]) -> int:
    """The GEMV kernels' PROLOGUE for a fusion's norm weight: 0 no RMSNorm, 1 an RMSNorm with its
    weight, 2 one without (empty: folded into the layer's weight, `Fusion`), so the kernel reads
    no norm weight (+1.0% for int8 decode-8b with its head, BENCHMARKS.md)."""
    if norm_weight is None:
        return 0
    return 1 if norm_weight.numel() else 2


def _gemv(scheme: int, x: torch.Tensor, qweight: torch.Tensor, scale: Optional[torch.Tensor],
          zero: Optional[torch.Tensor], group: int, bias: Optional[torch.Tensor],
          config: Optional[dict] = None, kind: Optional[str] = None,
          fusion: Fusion = NO_FUSION) -> torch.Tensor:
    """Launch a GEMV kernel on x [M, K] (M <= GEMV_MAX_M) and return out [M, N] in x's dtype
    ([M, N / 2] with the fusion's swiglu).

    Args:
        scheme, qweight, scale, zero, group: as `dequantize_triton`; DENSE: qweight is the weight
            in x's dtype and scale None.
        config: None to autotune; else the meta-parameters of one launch, for tests and benchmarks:
            "m1" kernel: BLOCK_N, BLOCK_K, STAGES, SPLIT_K, num_warps;
            "dot" kernel: BLOCK_N, SUB_K (= group for int4), K_SLICES (>= num_warps), STAGES,
            SPLIT_K, num_warps.
        kind: "m1" or "dot" to override `_kernel_kind` (benchmarks; "m1" needs M == 1, not int4).
        fusion: the prologue and epilogues done in the kernel (the norm weight [K], the residual
            contiguous and of out's shape).
    """
    m, k = x.shape
    n = qweight.shape[0]
    kind = kind or _kernel_kind(scheme, m)
    if kind == "m1" and (m != 1 or scheme == INT4):
        raise ValueError("the m1 kernel takes one row of x and int8, fp8 or dense weights")
    if kind == "dot" and x.dtype == torch.float32:
        raise ValueError("the tensor-core GEMV needs bfloat16 or float16 x")
    if (scheme == DENSE) != (scale is None):
        raise ValueError("scale must be None for the dense scheme and given for the others")
    w = qweight.view(torch.uint8) if scheme == INT8 else qweight  # int8 bits, read as bytes
    scale_arg = w if scale is None else scale  # dense: never read
    out = torch.empty((m, _out_features(n, fusion.swiglu)), dtype=x.dtype, device=x.device)
    # PRESCALE configs (int4): bfloat16 x on the GPU (its PTX; the interpreter runs the plain form).
    prescale = scheme == INT4 and x.dtype == torch.bfloat16
    if config is None:
        max_split, n_blocks = _split_needs(scheme, kind, group, m == 1, prescale, n, k,
                                           _sm_count(x.device))
    else:
        max_split = config["SPLIT_K"]
        n_blocks = _cdiv(n, config["BLOCK_N"]) if max_split > 1 else 0
    # Split-K: the [SPLIT_K, M, N] partials, then [SPLIT_K, M] sums of squares for the RMSNorm.
    ws = torch.empty((max_split * (m * n + m) if max_split > 1 else 0,), dtype=torch.float32,
                     device=x.device)
    counters = split_counters(x.device, n_blocks)
    bias_arg = out if bias is None else bias
    norm_arg = out if fusion.norm_weight is None else fusion.norm_weight  # never read if absent
    residual_arg = out if fusion.residual is None else fusion.residual
    prologue = _norm_prologue(fusion.norm_weight)
    # Inline PTX on the GPU; the interpreter (CPU tensors) runs the plain Triton forms.
    fast = x.is_cuda
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    if kind == "m1":
        args = (x, w, scale_arg, bias_arg, norm_arg, residual_arg, out, ws, counters, n, k,
                qweight.stride(0), fusion.eps)
        common = dict(SCHEME=scheme, HAS_BIAS=bias is not None, FAST=fast, PROLOGUE=prologue,
                      SWIGLU=fusion.swiglu, HAS_RESIDUAL=fusion.residual is not None,
                      **pdl_launch(x.device))
        _launch(_qgemv_m1_kernel, (scheme, kind, group, m == 1), grid, args, common, config, k)
    else:
        args = (x, w, scale_arg, scale_arg if zero is None else zero, bias_arg, norm_arg,
                residual_arg, out, ws, counters, m, n, k, x.stride(0), qweight.stride(0),
                scale_arg.stride(0), out.stride(0), fusion.eps)
        if config is not None and "PAD_M" not in config:
            config = dict(config, PAD_M=_pads_m(config["K_SLICES"], config.get("num_warps", 4)))
        common = dict(SCHEME=scheme, GROUP=max(group, 1), HAS_BIAS=bias is not None, FAST=fast,
                      M_P2=triton.next_power_of_2(m), PROLOGUE=prologue, SWIGLU=fusion.swiglu,
                      HAS_RESIDUAL=fusion.residual is not None, **pdl_launch(x.device))
        _launch(_qgemv_dot_kernel, (scheme, kind, group, m == 1, prescale), grid, args, common,
                config, k)
    return out


def _launch(kernel, tuned: tuple, grid, args: tuple, common: dict, config: Optional[dict],
            k: int) -> None:
    """Launch the autotuned `_tuned_kernel(*tuned)` when config is None, else `kernel` with that
    one config (`_run`)."""
    _run(lambda: _tuned_kernel(*tuned), kernel, grid, args, common, config,
         lambda meta: {"EVEN_K": k % _block_k(meta) == 0})


def _run(tuned, kernel, grid, args: tuple, common: dict, config: Optional[dict], flags) -> None:
    """Launch the autotuned kernel `tuned()` returns when config is None, else `kernel` with that
    one config: its meta-parameters, num_warps, STAGES as the pipelining depth, and the
    heuristic flags `flags(meta)` returns for them (what the autotuned kernel's heuristics
    would set)."""
    if config is None:
        tuned()[grid](*args, **common)
        return
    meta = dict(config)
    num_warps = meta.pop("num_warps", 4)
    kernel[grid](*args, **common, **meta, **flags(meta), num_warps=num_warps,
                 num_stages=meta["STAGES"])


def _gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
          bias: Optional[torch.Tensor], config: Optional[dict] = None) -> torch.Tensor:
    """x [M, K] (bfloat16 / float16) -> [M, N] through `_qgemm_kernel` for an fp8 weight
    (arguments as `fp8_linear`, without the fusion).

    config: None to autotune; else BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps of one launch.
    """
    if qweight.dtype != torch.float8_e4m3fn or x.dtype == torch.float32:
        raise ValueError("the prefill GEMM takes an fp8 weight and bfloat16 or float16 x")
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (x, qweight, scale, out if bias is None else bias, out, m, n, k,
            triton.next_power_of_2(m), x.stride(0), qweight.stride(0), out.stride(0))
    common = dict(SCHEME=FP8, HAS_BIAS=bias is not None, FAST=x.is_cuda)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _launch(_qgemm_kernel, (FP8, "gemm", 0), grid, args, common, config, k)
    return out


def dequantize_triton(scheme: int, qweight: torch.Tensor, scale: torch.Tensor,
                      zero: Optional[torch.Tensor], group: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a weight into `dtype` [N, K] with one Triton kernel (one pass over the weight).

    Args:
        scheme: INT8, FP8 or INT4; qweight, scale, zero, group: that scheme's canonical tensors
            (zero None and group 0 for the row-wise schemes).
    """
    n = qweight.shape[0]
    k = 2 * qweight.shape[1] if scheme == INT4 else qweight.shape[1]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    w = qweight.view(torch.uint8) if scheme == INT8 else qweight
    block_n = 32
    block_k = max(256, group) if scheme == INT4 else 256
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](w, scale, scale if zero is None else zero, out, n, k, qweight.stride(0),
                          scale.stride(0), SCHEME=scheme, GROUP=max(group, 1), BLOCK_N=block_n,
                          BLOCK_K=block_k, num_warps=4)
    return out


def pack_scale_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """int4's bfloat16 scale and zero point [N, K/G] as one int32 [N, K/G], the scale's bits in
    the low half: what `_int4_dp4a_kernel` reads, one 4-byte load a group (the GPU pipelines
    loads of 4 bytes or more a thread, not the 2-byte ones of separate tensors)."""
    if scale.dtype != torch.bfloat16 or zero.dtype != torch.bfloat16 or scale.shape != zero.shape:
        raise ValueError(f"pack_scale_zero takes a bfloat16 scale and zero point of one shape, got "
                         f"{scale.dtype} {list(scale.shape)} and {zero.dtype} {list(zero.shape)}")
    low = scale.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return low | (zero.contiguous().view(torch.int16).to(torch.int32) << 16)


DP4A_GROUPS = (32, 64, 128, 256)  # group sizes `_int4_dp4a_kernel` takes (whole words a thread)


def _dp4a_applies(x_rows: int, k: int, group: int, scale_zero: Optional[torch.Tensor]) -> bool:
    """Whether one row of int4 decode takes `_int4_dp4a_kernel` (with the packed scales)."""
    return (scale_zero is not None and x_rows == 1 and group in DP4A_GROUPS and k % group == 0
            and k // 8 >= 4)


def prepared_x_numel(k: int, group: int) -> int:
    """int32 elements of one row of x prepared for `_int4_dp4a_kernel` (`prepared_views`)."""
    return 4 * (k // 8) + 3 * (k // group)


def prepared_views(buffer: torch.Tensor, k: int, group: int) -> tuple:
    """(planes [4, 1, K / 8] int32, sums, scales and, for an RMSNorm, sums of squares [1, K / G]
    float32) in one int32 buffer of `prepared_x_numel` elements: one row of x prepared for
    `_int4_dp4a_kernel`."""
    words, n_groups = k // 8, k // group
    planes = buffer[:4 * words].view(4, 1, words)
    floats = buffer[4 * words:].view(torch.float32).view(3, 1, n_groups)
    return planes, floats[0], floats[1], floats[2]


def _int4_dp4a_gemv(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor, group: int,
                    bias: Optional[torch.Tensor], fusion: Fusion = NO_FUSION,
                    config: Optional[dict] = None,
                    prepared: Optional[torch.Tensor] = None,
                    feed: Optional["InputLink"] = None) -> torch.Tensor:
    """One row x [1, K] -> [1, N] ([1, N / 2] with swiglu) for an int4 weight: `_int4_x_kernel`
    (with the fusion's RMSNorm) then `_int4_dp4a_kernel` (bias, SwiGLU, residual).

    config: None to autotune; else BLOCK_N, BLOCK_W, STAGES, num_warps of one launch.
    prepared: x already prepared (`prepared_views`' layout, by the kernel that computed x, with
        the fusion's RMSNorm if it has one): no preparation kernel.
    feed: the `InputLink` of the Linear the output goes to: the kernel also prepares the output
        for it (`_feed_prepare`, with the RMSNorm the link names) when the link's width is the
        output's.
    """
    m, k = x.shape
    n = qweight.shape[0]
    if m != 1:
        raise ValueError(f"the int4 integer GEMV takes one row of x, got {m}")
    if qweight.stride(0) % 4 or qweight.storage_offset() % 4:
        raise ValueError("the int4 GEMV reads weight rows as 32-bit words: qweight's rows must "
                         "start at multiples of 4 bytes")
    words, n_groups = k // 8, k // group
    norm = fusion.norm_weight is not None
    pdl = pdl_launch(x.device)
    if prepared is None:
        planes, sums, scales, squares = prepared_views(
            torch.empty(prepared_x_numel(k, group), dtype=torch.int32, device=x.device), k, group)
        block_g = max(1, _PREP_COLUMNS // group)
        _int4_x_kernel[(m, triton.cdiv(n_groups, block_g))](
            x, fusion.norm_weight if norm else x, planes, sums, scales, squares, k, x.stride(0),
            GROUP=group, BLOCK_G=block_g, NORM=norm, num_warps=4, **pdl)
    else:
        if prepared.numel() != prepared_x_numel(k, group):
            raise ValueError("a prepared x must have prepared_x_numel(K, group) elements")
        planes, sums, scales, squares = prepared_views(prepared, k, group)
    n_out = _out_features(n, fusion.swiglu)
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    feeds = feed is not None and feed.k == n_out and out.element_size() == 2
    feed_programs = triton.cdiv(n_out, _PREP_COLUMNS) if feeds else 0
    feed_norm = feed.norm_weight if feeds else None
    if feeds:
        fed = prepared_views(feed.buffer(x.device), feed.k, feed.group)
        tags = feed.tags(x.device)
    else:
        fed, tags = (planes, sums, scales, squares), sums  # not read
    fed += (out if feed_norm is None else feed_norm,)
    args = (planes, sums, scales, squares, qweight.view(torch.int32), scale_zero,
            out if bias is None else bias, out if fusion.residual is None else fusion.residual,
            out, *fed, tags, n, words, qweight.stride(0) // 4, scale_zero.stride(0),
            fusion.eps)
    common = dict(GROUP=group, NORM=norm, HAS_BIAS=bias is not None, SWIGLU=fusion.swiglu,
                  HAS_RESIDUAL=fusion.residual is not None, FAST=x.is_cuda,
                  GROUPS_P2=triton.next_power_of_2(n_groups),
                  FEED_GROUP=feed.group if feeds else 0, FEED_NORM=feed_norm is not None,
                  **pdl)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) + feed_programs,)  # noqa: E731
    _run(_tuned_dp4a, _int4_dp4a_kernel, grid, args, common, config,
         lambda meta: {"EVEN_K": words % meta["BLOCK_W"] == 0})
    if feeds:
        feed.offer(out, feed_norm)
    return out


class InputLink:
    """An int4 Linear whose input the kernel computing it also prepares (decode attention for
    o_proj; another int4 Linear's integer GEMV for the next one): for one row of x, that kernel
    writes the planes, sums and scales of `_int4_x_kernel` into the link's buffer with its
    output, and the Linear's integer GEMV skips its preparation kernel.

    The GEMV takes the buffer only when its x is the tensor the producer last wrote (same
    storage), prepared with the GEMV's own RMSNorm weight or, without one, with none, checked on
    the host whenever the ops run eagerly, which includes torch.compile's warm-up and CUDA-graph
    capture; otherwise it prepares x itself. Each handoff is offered to the next call only. The
    GEMV names its norm weight (`norm_weight`) at each call, for the producer's next one. The two
    ops stay ordered by the data itself: the GEMV's input is the producer's output, which nothing
    may change in place between them (an all-reduce, say): link only Linears that follow each
    other directly.
    """

    def __init__(self, k: int, group: int):
        self.k, self.group = k, group
        self.ready: Optional[tuple] = None  # what the buffer holds (`_prepared_key`)
        self.norm_weight: Optional[torch.Tensor] = None  # the consumer's RMSNorm weight
        self.taken = 0  # handoffs taken (tests)
        self.id = len(_LINKS) + 1
        _LINKS[self.id] = self

    def buffer(self, device: torch.device) -> torch.Tensor:
        return persistent_zeros(f"int4 input link {self.id}", device,
                                prepared_x_numel(self.k, self.group))

    def tags(self, device: torch.device) -> torch.Tensor:
        """The int32 words [K] an int4 GEMV producer hands its outputs over in
        (`_feed_prepare`): zero between launches."""
        return persistent_zeros(f"int4 input link {self.id} outputs", device, self.k)

    @staticmethod
    def _prepared_key(x: torch.Tensor, norm_weight: Optional[torch.Tensor]) -> tuple:
        norm = None if norm_weight is None else (norm_weight.data_ptr(), norm_weight.device)
        return x.data_ptr(), x.device, norm

    def offer(self, out: torch.Tensor, norm_weight: Optional[torch.Tensor] = None) -> None:
        """The producer has prepared `out` in the buffer, with the RMSNorm weight given."""
        self.ready = self._prepared_key(out, norm_weight)

    def take(self, x: torch.Tensor, group: int,
             norm_weight: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The buffer if it holds x [1, K] prepared in groups of `group` with the RMSNorm weight
        given (or none), else None. Either way the offer is spent."""
        ready, self.ready = self.ready, None
        self.norm_weight = norm_weight
        if ready != self._prepared_key(x, norm_weight) or (self.k, self.group) != (x.shape[1],
                                                                                   group):
            return None
        self.taken += 1
        return self.buffer(x.device)


_LINKS: dict = {}


def link_int4(k: int, group: int) -> int:
    """A new `InputLink` for an int4 Linear of input width k and group size `group`; its id,
    which the producer's kernel (`decode_attention(feed=)`) and the Linear (`int4_linear(fed=)`)
    are given."""
    return InputLink(k, group).id


def input_link(link_id: int) -> Optional[InputLink]:
    return _LINKS.get(link_id)


_NORM_MAX_K = 16384  # one program holds a row of x in registers


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_ref` of x [M, K] (K <= 16384) by `_rms_norm_kernel`, one program a row (CUDA, or
    CPU tensors under the interpreter). The output dtype is the reference's: x's and the weight's
    promoted. An empty weight: no weight (see `Fusion`)."""
    if x.dim() != 2 or weight.shape not in ((x.shape[1],), (0,)) or x.shape[1] > _NORM_MAX_K:
        raise ValueError(f"rms_norm_triton: expected x [M, K <= {_NORM_MAX_K}] and weight [K] "
                         f"(or [0]), got "
                         f"{list(x.shape)} and {list(weight.shape)}")
    x = x.contiguous()
    weight = weight.contiguous()
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if m == 0:
        return out
    block_k = triton.next_power_of_2(k)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rms_norm_kernel[(m,)](x, weight, out, k, x.stride(0), out.stride(0), float(eps),
                               BLOCK_K=block_k, num_warps=max(4, min(16, block_k // 512)),
                               HAS_WEIGHT=weight.numel() > 0, **pdl_launch(x.device))
    return out


def _triton_linear(scheme: int, x: torch.Tensor, qweight: torch.Tensor,
                   scale: Optional[torch.Tensor], zero: Optional[torch.Tensor], group: int,
                   bias: Optional[torch.Tensor], fusion: Fusion = NO_FUSION,
                   scale_zero: Optional[torch.Tensor] = None, fed: int = 0,
                   feed: int = 0) -> torch.Tensor:
    """x [M, K] -> [M, N]: GEMV kernels for few rows, (dequantize +) cuBLAS beyond GEMV_MAX_M.

    The fusion runs inside the GEMV kernels, and as PyTorch ops around cuBLAS. int4 with
    `scale_zero` (`pack_scale_zero`) takes the integer GEMV for one row, with x prepared by its
    producer where the `InputLink` fed (0: none) holds it, and its output prepared for the
    consumer of the `InputLink` feed (0: none).
    """
    # Row views (a tensor-parallel shard along N) are read in place; anything else would need a
    # copy of the weight on every call, so it is refused instead.
    for name, t in (("qweight", qweight), ("scale", scale), ("zero", zero)):
        if t is not None and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along its last dimension (got strides "
                             f"{t.stride()}); make it contiguous once, when the weights are loaded")
    if zero is not None and zero.stride() != scale.stride():
        raise ValueError(f"zero (strides {zero.stride()}) and scale (strides {scale.stride()}) "
                         "must share one layout; make both contiguous when the weights are loaded")
    x = x.contiguous()
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, qweight.shape[0]))
    # Triton launches on the current device; CPU tensors mean the interpreter.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        dp4a = scheme == INT4 and _dp4a_applies(m, x.shape[1], group, scale_zero)
        if dp4a or _gemv_applies(scheme, m, x.dtype):  # the kernels read the fusion's tensors
            fusion = fusion._replace(
                norm_weight=None if fusion.norm_weight is None else fusion.norm_weight.contiguous(),
                residual=None if fusion.residual is None else fusion.residual.contiguous())
            if dp4a:
                link = input_link(fed)
                prepared = None if link is None else link.take(x, group, fusion.norm_weight)
                return _int4_dp4a_gemv(x, qweight, scale_zero.contiguous(), group, bias, fusion,
                                       prepared=prepared, feed=input_link(feed))
            return _gemv(scheme, x, qweight, scale, zero, group, bias, fusion=fusion)
        if scheme == DENSE:
            return fused_linear_ref(lambda t: F.linear(t, qweight, bias), x, fusion)
        if scheme == FP8 and x.dtype != torch.float32:
            return fused_linear_ref(lambda t: _gemm(t.contiguous(), qweight, scale, bias), x,
                                    fusion)
        w = dequantize_triton(scheme, qweight, scale, zero, group, x.dtype)
        return fused_linear_ref(lambda t: F.linear(t, w, None if bias is None else bias.to(x.dtype)),
                                x, fusion)


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and the public dispatchers
# ----------------------------------------------------------------------------------------------

def _fake_output(x: torch.Tensor, weight: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """The ops' output shape: [M, N], or [M, N / 2] with swiglu."""
    return x.new_empty((x.shape[0], _out_features(weight.shape[0], swiglu)))


_FUSION_SCHEMA = ("Tensor? norm_weight=None, float eps=0.0, bool swiglu=False, "
                  "Tensor? residual=None")


# custom op -> the Python function behind it, which eager calls take directly: going through the
# op's dispatch cost ~26 us more host time a call (90-92 against 64-65 us for an fp8 prefill
# product on the H100 machine), and eager prefill makes 128 such calls. Code that torch.compile
# traces takes the op itself (the compiler cannot trace the Triton launch code).
_EAGER_IMPLS = {}


def _custom_op(name: str, schema: str, impl):
    op = torch.library.custom_op(f"tachylm::{name}", mutates_args=(), schema=schema)(impl)
    _EAGER_IMPLS[op] = impl
    return op


def _rowwise_op(name: str, scheme: int):
    """The custom op of a row-wise scheme (int8, fp8): one scale per output row."""
    def impl(x, qweight, scale, bias, norm_weight=None, eps=0.0, swiglu=False, residual=None):
        return _triton_linear(scheme, x, qweight, scale, None, 0, bias,
                              Fusion(norm_weight, eps, swiglu, residual))

    op = _custom_op(name, f"(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, "
                          f"{_FUSION_SCHEMA}) -> Tensor", impl)

    @op.register_fake
    def _(x, qweight, scale, bias, norm_weight=None, eps=0.0, swiglu=False, residual=None):
        return _fake_output(x, qweight, swiglu)
    return op


_int8_linear_op = _rowwise_op("int8_linear", INT8)
_fp8_linear_op = _rowwise_op("fp8_linear", FP8)


def _int4_linear_impl(x, qweight, scale, zero, group_size, bias, norm_weight=None, eps=0.0,
                      swiglu=False, residual=None, scale_zero=None, fed=0, feed=0):
    return _triton_linear(INT4, x, qweight, scale, zero, group_size, bias,
                          Fusion(norm_weight, eps, swiglu, residual), scale_zero, fed, feed)


_int4_linear_op = _custom_op("int4_linear", f"(Tensor x, Tensor qweight, Tensor scale, "
                                            f"Tensor zero, int group_size, Tensor? bias, "
                                            f"{_FUSION_SCHEMA}, Tensor? scale_zero=None, "
                                            f"int fed=0, int feed=0) -> Tensor",
                             _int4_linear_impl)


@_int4_linear_op.register_fake
def _(x, qweight, scale, zero, group_size, bias, norm_weight=None, eps=0.0, swiglu=False,
      residual=None, scale_zero=None, fed=0, feed=0):
    return _fake_output(x, qweight, swiglu)


def _dense_linear_impl(x, weight, bias, norm_weight=None, eps=0.0, swiglu=False,
                       residual=None):
    return _triton_linear(DENSE, x, weight, None, None, 0, bias,
                          Fusion(norm_weight, eps, swiglu, residual))


_dense_linear_op = _custom_op("dense_linear", f"(Tensor x, Tensor weight, Tensor? bias, "
                                              f"{_FUSION_SCHEMA}) -> Tensor", _dense_linear_impl)


@_dense_linear_op.register_fake
def _(x, weight, bias, norm_weight=None, eps=0.0, swiglu=False, residual=None):
    return _fake_output(x, weight, swiglu)


_rms_norm_op = _custom_op("rms_norm", "(Tensor x, Tensor weight, float eps) -> Tensor",
                          rms_norm_triton)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def _use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.is_cuda


def _linear_input(x: torch.Tensor, fusion: Fusion) -> torch.Tensor:
    """`linear_input_ref` (the RMSNorm of x, if any), by `_rms_norm_kernel` on CUDA. As its own
    kernel under PDL it overlaps the GEMVs on each side of it, which a compiled PyTorch norm
    (an Inductor kernel, launched plainly) does not."""
    if fusion.norm_weight is None or not _use_triton(x) or x.shape[-1] > _NORM_MAX_K:
        return linear_input_ref(x, fusion)
    call = _rms_norm_op if torch.compiler.is_compiling() else _EAGER_IMPLS[_rms_norm_op]
    rows = call(x.reshape(-1, x.shape[-1]), fusion.norm_weight, fusion.eps)
    return rows.reshape(x.shape)


def fused_linear(linear, x: torch.Tensor, fusion: Fusion) -> torch.Tensor:
    """`fused_linear_ref` with its RMSNorm and SwiGLU as one kernel each on CUDA: the fusion of
    the many-row (prefill) path, around cuBLAS. Elsewhere, under torch.compile (which fuses the
    PyTorch ops itself) and where autograd records: `fused_linear_ref`."""
    tensors = (x, fusion.norm_weight, fusion.residual)
    if (not _use_triton(x) or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in tensors))):
        return fused_linear_ref(linear, x, fusion)
    return _around(linear, x, fusion, _linear_input, swiglu)


def _call_op(scheme: int, op, x: torch.Tensor, n: int, operands: tuple,
             fusion: Fusion, extra: tuple = (), norm_inside: bool = False) -> torch.Tensor:
    """op(x as [M, K], *operands, *fusion, *extra) reshaped to [..., n] ([..., n / 2] with
    swiglu).

    Where a GEMV kernel will run, the fusion goes into the op (the kernel does it); elsewhere it
    runs as PyTorch ops around the op, where torch.compile can fuse them with their neighbours.
    norm_inside: the op's kernels take the RMSNorm whatever their kind (int4's integer GEMV).
    """
    m = math.prod(x.shape[:-1])
    if _is_fused(fusion) and not (norm_inside or _gemv_applies(scheme, m, x.dtype)):
        return fused_linear(
            lambda t: _call_op(scheme, op, t, n, operands, NO_FUSION, extra), x, fusion)
    if _kernel_kind(scheme, m) == "dot" and fusion.norm_weight is not None and not norm_inside:
        # The tensor-core kernel takes SwiGLU and the residual but not the RMSNorm: computing it
        # between its x loads and the MMA cost int4 decode 7% on an H100 when it was first tried,
        # and 3% with the current kernels (339.9 against 350.1-351.5 tokens/s, BENCHMARKS.md).
        # Our own norm kernel, launched under PDL like the GEMVs, beat the compiled PyTorch norm
        # by 5% (int4 decode-8b 369.9 against 352.6 tokens/s on an H100).
        x = _linear_input(x, fusion)
        fusion = fusion._replace(norm_weight=None)
    n_out = _out_features(n, fusion.swiglu)
    residual = None if fusion.residual is None else fusion.residual.reshape(-1, n_out)
    call = op if torch.compiler.is_compiling() else _EAGER_IMPLS[op]
    out = call(x.reshape(-1, x.shape[-1]), *operands, fusion.norm_weight, fusion.eps,
               fusion.swiglu, residual, *extra)
    return out.reshape(*x.shape[:-1], n_out)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, norm: Optional[tuple] = None,
                swiglu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = residual + epilogue((qweight * scale[:, None]) @ prologue(x) + bias) (see `Fusion`).

    On CUDA (with Triton): the GEMV kernels for up to GEMV_MAX_M rows, dequantize + cuBLAS beyond.
    Elsewhere: `int8_linear_ref` (with `fused_linear_ref` for the fusion).

    Args:
        x: [..., K] float32 / bfloat16 / float16.
        qweight: int8 [N, K].
        scale: float32 / bfloat16 / float16 [N].
        bias: optional [N].
        norm: optional (weight [K], eps): RMSNorm x first.
        swiglu: the weight's rows are [gate; up] halves: return SiLU(gate) * up ([..., N / 2]).
        residual: optional, of the result's shape and x's dtype, added to the result.
    Returns:
        [..., N] ([..., N / 2] with swiglu) in x's dtype.
    """
    fusion = make_fusion(norm, swiglu, residual)
    _check_rowwise("int8_linear", torch.int8, x, qweight, scale, bias, fusion)
    if not _use_triton(x):
        return fused_linear_ref(lambda t: int8_linear_ref(t, qweight, scale, bias), x, fusion)
    return _call_op(INT8, _int8_linear_op, x, qweight.shape[0], (qweight, scale, bias), fusion)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None, *, norm: Optional[tuple] = None,
               swiglu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`int8_linear` for qweight float8_e4m3fn [N, K]: w = float(qweight) * scale[:, None].

    Dispatch, arguments and result as `int8_linear`.
    """
    fusion = make_fusion(norm, swiglu, residual)
    _check_rowwise("fp8_linear", torch.float8_e4m3fn, x, qweight, scale, bias, fusion)
    if not _use_triton(x):
        return fused_linear_ref(lambda t: fp8_linear_ref(t, qweight, scale, bias), x, fusion)
    return _call_op(FP8, _fp8_linear_op, x, qweight.shape[0], (qweight, scale, bias), fusion)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int, bias: Optional[torch.Tensor] = None, *,
                norm: Optional[tuple] = None, swiglu: bool = False,
                residual: Optional[torch.Tensor] = None,
                scale_zero: Optional[torch.Tensor] = None, fed: int = 0,
                feed: int = 0) -> torch.Tensor:
    """`int8_linear` for group-wise int4: w[n, k] = (q[n, k] - zero[n, k/G]) * scale[n, k/G].

    Dispatch and fusion as `int8_linear`; the other arguments and result as `int4_linear_ref`.
    scale_zero: `pack_scale_zero(scale, zero)`, which lets one row of x (decode) take the
    integer GEMV (`_int4_dp4a_kernel`; groups of DP4A_GROUPS) on CUDA.
    fed: the id of the `InputLink` (`link_int4`) whose producer may have prepared x (0: none);
    feed: the id of the `InputLink` of the int4 Linear this one's output goes to, which the
    integer GEMV then prepares as well (0: none). Neither ever changes the result.
    """
    fusion = make_fusion(norm, swiglu, residual)
    _check_int4(x, qweight, scale, zero, group_size, bias, fusion)
    if fusion.norm_weight is not None and fusion.norm_weight.numel() == 0:
        # int4's kernels read a norm weight: a weightless norm (`Fusion`) reads ones
        fusion = fusion._replace(norm_weight=fusion.norm_weight.new_ones(x.shape[-1]))
    if scale_zero is not None and (scale_zero.shape != scale.shape
                                   or scale_zero.dtype != torch.int32):
        raise ValueError(f"scale_zero must be pack_scale_zero(scale, zero): int32 "
                         f"{list(scale.shape)}, got {scale_zero.dtype} {list(scale_zero.shape)}")
    if not _use_triton(x):
        return fused_linear_ref(
            lambda t: int4_linear_ref(t, qweight, scale, zero, group_size, bias), x, fusion)
    m = math.prod(x.shape[:-1])
    norm_inside = _dp4a_applies(m, x.shape[-1], group_size, scale_zero)
    return _call_op(INT4, _int4_linear_op, x, qweight.shape[0],
                    (qweight, scale, zero, group_size, bias), fusion,
                    (scale_zero, fed, feed) if scale_zero is not None else (), norm_inside)


def _dense_gemv_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        fusion: Fusion = NO_FUSION) -> bool:
    """Whether `dense_linear` may take the Triton GEMV: exactly F.linear's function (with the
    fusion's PyTorch ops around it), read faster.

    Anything else (CPU, mixed dtypes or devices, bad or empty shapes, a strided K axis, many rows
    of x, autograd) goes to F.linear, which computes it or raises its own error.
    """
    if not (_use_triton(x) and weight.dim() == 2 and x.dim() >= 1 and weight.numel() > 0
            and x.shape[-1] == weight.shape[-1] and x.dtype == weight.dtype
            and x.dtype in ACTIVATION_DTYPES and weight.device == x.device
            and (weight.shape[1] <= 1 or weight.stride(1) == 1)):
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device
                             or tuple(bias.shape) != (weight.shape[0],)):
        return False
    tensors = (x, weight, bias, fusion.norm_weight, fusion.residual)
    try:
        _check_fusion("dense_linear", x, weight.shape[1], weight.shape[0], fusion)
    except ValueError:
        return False
    # The custom op has no backward: anything that records autograd takes F.linear.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return _gemv_applies(DENSE, math.prod(x.shape[:-1]), x.dtype)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 norm: Optional[tuple] = None, swiglu: bool = False,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = residual + epilogue(prologue(x) @ weight.T + bias): `F.linear`'s contract, with the
    fusion.

    On CUDA (with Triton), for up to DENSE_GEMV_MAX_M rows of x (float32: one row) with x, weight
    and bias of one dtype and no autograd recording: the Triton GEMV kernels, which read the weight
    faster than cuBLAS's GEMV and do the fusion in place. Everything else: `dense_linear_ref`
    (`F.linear`, cuBLAS on CUDA, with the fusion as PyTorch ops; on CUDA its RMSNorm and SwiGLU
    as one kernel each, `fused_linear`).

    Args:
        x: [..., K] float32 / bfloat16 / float16.
        weight: [N, K] in x's dtype (rows may be a view: only the K axis must be contiguous).
        bias: optional [N] in x's dtype.
        norm, swiglu, residual: as `int8_linear`.
    Returns:
        [..., N] ([..., N / 2] with swiglu) in x's dtype.
    """
    fusion = make_fusion(norm, swiglu, residual)
    if not _dense_gemv_applies(x, weight, bias, fusion):  # bad fusions raise in the reference
        if _use_triton(x) and _is_fused(fusion) and weight.dim() == 2:  # prefill-sized x
            _check_fusion("dense_linear", x, weight.shape[1], weight.shape[0], fusion)
            return fused_linear(lambda t: F.linear(t, weight, bias), x, fusion)
        return dense_linear_ref(x, weight, bias, norm=norm, swiglu=swiglu, residual=residual)
    return _call_op(DENSE, _dense_linear_op, x, weight.shape[0], (weight, bias), fusion)


# ----------------------------------------------------------------------------------------------
# A decode MLP in one launch (dense weights)
# ----------------------------------------------------------------------------------------------

def _mlp_buffers(device: torch.device, hidden: int, n_out: int,
                 config: Optional[dict] = None) -> tuple:
    """(tagged words [slots * hidden] int32, counts [slots] int64) of `_mlp_m1_kernel` for one
    shape: a pair per autotuned config (`_tuned_mlp`'s SLOT), or one for an explicit
    `config`, kept for the process's life (`persistent_zeros`) and shared by every launch of
    that shape on the device, which the stream's order keeps apart (one stream at a time)."""
    slots = len(_MLP_DENSE_CONFIGS) if config is None else 1
    key = f"mlp {hidden}x{n_out} {sorted(config.items()) if config else 'tuned'}"
    return (persistent_zeros(f"{key} tags", device, slots * hidden),
            persistent_zeros(f"{key} counts", device, slots, torch.int64))


def _mlp_gemv(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
              norm_weight: torch.Tensor, eps: float, residual: torch.Tensor,
              config: Optional[dict] = None) -> torch.Tensor:
    """One row x [1, K] -> [1, N2] through `_mlp_m1_kernel` (arguments as `dense_mlp`).

    config: None to autotune; else BLOCK_N1, BLOCK_K1, BLOCK_N2, BLOCK_K2, STAGES, num_warps of
    one launch (tests, benchmarks), with buffers of its own.
    """
    n1, k = gate_up.shape
    n2, hidden = down.shape
    out = torch.empty((1, n2), dtype=x.dtype, device=x.device)
    tags, counts = _mlp_buffers(x.device, hidden, n2, config)
    args = (x, norm_weight, gate_up, down, residual, out, tags, counts, n1, k, n2,
            gate_up.stride(0), down.stride(0), eps)
    common = dict(FAST=x.is_cuda, PROLOGUE=_norm_prologue(norm_weight), **pdl_launch(x.device))

    def grid(meta):
        return (triton.cdiv(n1, meta["BLOCK_N1"]) + triton.cdiv(n2, meta["BLOCK_N2"]),)
    _run(_tuned_mlp, _mlp_m1_kernel, grid, args, common, config,
         lambda meta: {"SLOT": 0, "EVEN_K1": k % meta["BLOCK_K1"] == 0,
                       "EVEN_K2": hidden % meta["BLOCK_K2"] == 0})
    return out


def _dense_mlp_impl(x, gate_up, down, norm_weight, eps, residual):
    # The card is asked here, when the op runs (or is captured), not where torch.compile traces.
    norm_weight, residual = norm_weight.contiguous(), residual.contiguous()
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if _mlp_launch_on(x.device):
            return _mlp_gemv(x, gate_up, down, norm_weight, eps, residual)
        hidden = _triton_linear(DENSE, x, gate_up, None, None, 0, None,
                                Fusion(norm_weight, eps, True, None))
        return _triton_linear(DENSE, hidden, down, None, None, 0, None,
                              Fusion(None, 0.0, False, residual))


_dense_mlp_op = _custom_op("dense_mlp", "(Tensor x, Tensor gate_up, Tensor down, "
                                        "Tensor norm_weight, float eps, Tensor residual) -> Tensor",
                           _dense_mlp_impl)


@_dense_mlp_op.register_fake
def _(x, gate_up, down, norm_weight, eps, residual):
    return x.new_empty((x.shape[0], down.shape[0]))


# None: the one-launch MLP where it was measured faster than the two GEMVs, on an H100
# (decode-8b bf16 189.1-189.5 against 187.6-187.9 tokens/s). On an H200 it was slower (248.9
# against 254.2), and other cards were not measured, so they keep the two GEMVs
# (BENCHMARKS.md). True / False: on / off everywhere (`use_mlp_launch`).
_MLP_LAUNCH = {"enabled": None}


def use_mlp_launch(enabled: Optional[bool]) -> None:
    """Take the one-launch decode MLP (`dense_mlp`) everywhere (True), nowhere (False), or on the
    cards where it was measured faster (None, the default: an H100)."""
    _MLP_LAUNCH["enabled"] = None if enabled is None else bool(enabled)


@functools.lru_cache(maxsize=None)
def _mlp_launch_measured_faster(device: torch.device) -> bool:
    return device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)


def _mlp_launch_on(device: torch.device) -> bool:
    enabled = _MLP_LAUNCH["enabled"]
    return _mlp_launch_measured_faster(device) if enabled is None else enabled


def _dense_mlp_applies(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                       norm_weight: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether `dense_mlp` takes its op: one row of 16-bit x on CUDA, dense weights of its
    dtype contiguous along K, shapes that chain, no autograd. The op runs `_mlp_m1_kernel` on
    the cards it is on for (`use_mlp_launch`), else the two GEMVs."""
    if not (_use_triton(x) and x.dtype in (torch.bfloat16, torch.float16)
            and math.prod(x.shape[:-1]) == 1):
        return False
    if not all(w.dim() == 2 and w.dtype == x.dtype and w.device == x.device and w.stride(1) == 1
               and w.numel() > 0 for w in (gate_up, down)):
        return False
    n1, k = gate_up.shape
    if n1 % 2 or k != x.shape[-1] or down.shape[1] != n1 // 2:
        return False
    if (tuple(norm_weight.shape) not in ((k,), (0,)) or norm_weight.device != x.device
            or residual.shape != x.shape[:-1] + (down.shape[0],) or residual.dtype != x.dtype
            or residual.device != x.device):
        return False
    tensors = (x, gate_up, down, norm_weight, residual)
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def dense_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, *, norm: tuple,
              residual: torch.Tensor) -> torch.Tensor:
    """residual + down @ (SiLU(gate) * up), [gate; up] = gate_up @ RMSNorm(x): a decoder layer's
    MLP, equal to `dense_linear(dense_linear(x, gate_up, norm=norm, swiglu=True), down,
    residual=residual)`.

    On CUDA, for one row of bfloat16/float16 x (batch-1 decode), on the cards where it pays
    (`use_mlp_launch`): one kernel (`_mlp_m1_kernel`), whose down_proj programs start reading
    their weights while gate_up's last rows are computed; on other cards the two GEMV kernels
    `dense_linear` would launch. Anything else: the two `dense_linear` calls.

    Args:
        x: [..., K]; gate_up: [2H, K] ([gate; up] rows); down: [N, H], in x's dtype.
        norm: (weight [K], eps) of the RMSNorm before gate_up.
        residual: [..., N] in x's dtype.
    Returns:
        [..., N] in x's dtype.
    """
    norm_weight, eps = norm
    if not _dense_mlp_applies(x, gate_up, down, norm_weight, residual):
        hidden = dense_linear(x, gate_up, norm=norm, swiglu=True)
        return dense_linear(hidden, down, residual=residual)
    call = _dense_mlp_op if torch.compiler.is_compiling() else _EAGER_IMPLS[_dense_mlp_op]
    out = call(x.reshape(1, -1), gate_up, down, norm_weight, float(eps),
               residual.reshape(1, -1))
    return out.reshape(residual.shape)
