"""The element-wise steps of a prefill-sized forward pass, each as one Triton kernel.

Eager prefill computes a layer's matrix products with cuBLAS and, before these kernels, the steps
between them with PyTorch ops: the RMSNorm was seven kernels (cast, square, mean, add, rsqrt,
multiply, cast), rotating q and k and writing the cache several more, SiLU(gate) * up two over
the widest activation. Each reads and writes a whole activation: at 1024 tokens of the
Llama-3.1-8B shape they took about 13 of a prefill's 33 ms of GPU time on an H100, against 18 ms
for all the matrix products (BENCHMARKS.md). One kernel each reads and writes it once:

* `swiglu`: SiLU(gate) * up of y = [..., gate | up], in float32, rounded once (as the decode
  GEMVs' epilogue does; `swiglu_ref` rounds SiLU's result first).
* `rotate_into_cache`: rotates q and k (rotary embedding, Hugging Face's half-split order, as
  `apply_rotary`), returns q in attention's layout [B, H, T, D] and writes k and v into the
  cache at their positions. Reference: `rotate_into_cache_ref`.

(The RMSNorm's one kernel is `quant_matmul`'s, which the GEMVs share.) Both take their kernels
on CUDA outside torch.compile (which fuses the PyTorch ops itself) and the references elsewhere;
the CPU tests run the kernels under Triton's interpreter.
"""

import contextlib

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references serve every call
    triton = None

HAS_TRITON = triton is not None


def _use_kernel(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.is_cuda and not torch.compiler.is_compiling()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of each head (Hugging Face's half-split order).

    Args:
        x: [..., head_dim].
        cos, sin: float32, broadcastable to [..., head_dim / 2].
    Returns:
        x's shape and dtype (computed in float32).
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def swiglu_ref(y: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of y = [..., gate | up] (two halves of the last dimension) in PyTorch ops."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _rotate(x1, x2, cos, sin, DTYPE: tl.constexpr):
        """Rotary pairs (x1, x2) by (cos, sin) in float32 (as apply_rotary), rounded to DTYPE."""
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        return (x1f * cos - x2f * sin).to(DTYPE), (x2f * cos + x1f * sin).to(DTYPE)

    @triton.jit
    def _swiglu_kernel(y_ptr, out_ptr, F_, stride_y, stride_o, BLOCK: tl.constexpr):
        """out[m, f] = SiLU(y[m, f]) * y[m, F + f], in float32; grid (M, cdiv(F, BLOCK))."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F_
        gate = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(y_ptr + row * stride_y + F_ + offs, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_cache_ptr,
                       v_cache_ptr, T, H, KVH, S,
                       sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b, sc_t,
                       sp_b, sp_t, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        """Grid (B * T, 2). Program (b * T + t, 0) rotates q's H heads of token t into
        q_out[b, :, t]; program (.., 1) rotates k's KVH heads and copies v's into the caches at
        slot pos[b, t]. Rotation in float32: (x1 cos - x2 sin, x2 cos + x1 sin)."""
        bt = tl.program_id(0)
        b = (bt // T).to(tl.int64)
        t = (bt % T).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        d = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + b * sc_b + t * sc_t + d)[None, :]
        sin = tl.load(sin_ptr + b * sc_b + t * sc_t + d)[None, :]
        D = 2 * HALF
        if tl.program_id(1) == 0:
            mask = (heads < H)[:, None]
            src = q_ptr + b * sq_b + t * sq_t + heads[:, None] * sq_h + d[None, :]
            q1, q2 = _rotate(tl.load(src, mask=mask, other=0.0),
                             tl.load(src + HALF, mask=mask, other=0.0), cos, sin,
                             q_out_ptr.dtype.element_ty)
            # q_out [B, H, T, D], contiguous
            dst = q_out_ptr + ((b * H + heads[:, None]) * T + t) * D + d[None, :]
            tl.store(dst, q1, mask=mask)
            tl.store(dst + HALF, q2, mask=mask)
        else:
            mask = (heads < KVH)[:, None]
            pos = tl.load(pos_ptr + b * sp_b + t * sp_t).to(tl.int64)
            mask = mask & (pos >= 0) & (pos < S)  # (the caller checks; never write outside)
            src = k_ptr + b * sk_b + t * sk_t + heads[:, None] * sk_h + d[None, :]
            # The caches [B, KVH, S, D], contiguous. The key is rounded to k's dtype first (as
            # `apply_rotary` returns it), then to the cache's.
            k1, k2 = _rotate(tl.load(src, mask=mask, other=0.0),
                             tl.load(src + HALF, mask=mask, other=0.0), cos, sin,
                             k_ptr.dtype.element_ty)
            slot = ((b * KVH + heads[:, None]) * S + pos) * D + d[None, :]
            tl.store(k_cache_ptr + slot, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_cache_ptr + slot + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            vsrc = v_ptr + b * sv_b + t * sv_t + heads[:, None] * sv_h + d[None, :]
            v1 = tl.load(vsrc, mask=mask, other=0.0)
            v2 = tl.load(vsrc + HALF, mask=mask, other=0.0)
            tl.store(v_cache_ptr + slot, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + slot + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def swiglu_triton(y: torch.Tensor) -> torch.Tensor:
    """`swiglu` by `_swiglu_kernel` (CUDA, or CPU tensors under the interpreter); y [..., 2F]."""
    if y.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension holds [gate | up] halves, so it must be "
                         f"even; got {y.shape[-1]}")
    rows = y.reshape(-1, y.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    half = rows.shape[1] // 2
    out = torch.empty((rows.shape[0], half), dtype=y.dtype, device=y.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(half))
        with _on(y.device):
            _swiglu_kernel[(rows.shape[0], triton.cdiv(half, block))](
                rows, out, half, rows.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.reshape(*y.shape[:-1], half)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of y = [..., gate | up]: one kernel on CUDA (`swiglu_triton`: computed in
    float32, rounded once to y's dtype), `swiglu_ref` elsewhere and under torch.compile."""
    if not _use_kernel(y) or y.shape[-1] % 2:
        return swiglu_ref(y)
    return swiglu_triton(y)


def rotate_into_cache_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, input_pos: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor) -> torch.Tensor:
    """`rotate_into_cache` in PyTorch ops (arguments and result as there)."""
    cos, sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, D/2] against [B, T, heads, D/2]
    batch_index = torch.arange(q.shape[0], device=q.device)[:, None]
    # Advanced indices around a slice put the indexed dims first: the target is [B, T, KVH, D].
    k_cache[batch_index, :, input_pos] = apply_rotary(k, cos, sin).to(k_cache.dtype)
    v_cache[batch_index, :, input_pos] = v.to(v_cache.dtype)
    return apply_rotary(q, cos, sin).transpose(1, 2).contiguous()


def _kernel_takes(q, k, v, cos, sin, k_cache, v_cache) -> bool:
    head_dim = q.shape[-1]
    return (head_dim >= 2 and head_dim & (head_dim - 1) == 0 and k_cache.shape[0] == q.shape[0]
            and k_cache.is_contiguous() and v_cache.is_contiguous() and cos.stride() == sin.stride()
            and all(t.stride(-1) == 1 for t in (q, k, v, cos, sin)))


def rotate_into_cache_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, input_pos: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor) -> torch.Tensor:
    """`rotate_into_cache` by `_rotate_kernel` (CUDA, or CPU tensors under the interpreter). The
    head size must be a power of two; the caches contiguous, with q's batch."""
    if not _kernel_takes(q, k, v, cos, sin, k_cache, v_cache):
        raise ValueError(f"rotate_into_cache_triton: needs a power-of-two head size (got "
                         f"{q.shape[-1]}), contiguous caches of q's batch, the last axes "
                         f"contiguous and cos, sin of one layout")
    return _launch_rotate(q, k, v, cos, sin, input_pos, k_cache, v_cache)


def _launch_rotate(q, k, v, cos, sin, input_pos, k_cache, v_cache) -> torch.Tensor:
    """`_rotate_kernel` on tensors `_kernel_takes`."""
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    out = torch.empty((batch, n_heads, seq, head_dim), dtype=q.dtype, device=q.device)
    if out.numel():
        with _on(q.device):
            _rotate_kernel[(batch * seq, 2)](
                q, k, v, cos, sin, input_pos, out, k_cache, v_cache, seq, n_heads, n_kv,
                k_cache.shape[2], q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                k.stride(2), v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(1),
                input_pos.stride(0), input_pos.stride(1), HALF=head_dim // 2,
                BLOCK_H=triton.next_power_of_2(max(n_heads, n_kv)), num_warps=4)
    return out


def rotate_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, input_pos: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor) -> torch.Tensor:
    """Rotate q and k, write k and v into the cache at their positions, return q for attention.

    Args:
        q: [B, T, H, D]; k, v: [B, T, KVH, D] (views of the projection's output; D contiguous).
        cos, sin: [B, T, D / 2] float32, the rotary tables at each token's position.
        input_pos: [B, T] integer slots, each in 0..S-1.
        k_cache, v_cache: [B, KVH, S, D] (a layer's buffers), written at input_pos.
    Returns:
        q rotated, [B, H, T, D] contiguous, in q's dtype.
    """
    if _use_kernel(q) and _kernel_takes(q, k, v, cos, sin, k_cache, v_cache):
        return _launch_rotate(q, k, v, cos, sin, input_pos, k_cache, v_cache)
    return rotate_into_cache_ref(q, k, v, cos, sin, input_pos, k_cache, v_cache)
