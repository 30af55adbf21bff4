"""Decode attention: one new query per row against the filled part of a static KV cache.

A compiled decode step keeps static shapes, so attention through `scaled_dot_product_attention`
reads the whole cache every token (masking the empty slots) and pays a fixed cost per layer even
at short context. `decode_attention` reads only slots [0, position] of each row, where the positions
are a device tensor (no host sync, valid under CUDA graphs):

* `decode_attention_ref`: masked SDPA over the whole cache. The CPU path and the oracle.
* `_decode_attn_kernel` (Triton, CUDA): split-KV ("flash decoding"). Grid (B * KVH, SPLITS):
  each program takes one kv head, all the query heads that share it (grouped-query attention reads
  each kv head once) and one of up to SPLITS equal slices of that row's filled length, computed on
  the device, so the work spreads over the GPU whatever the length (slices of at least
  `_MIN_SLICE` slots; a row of up to `_ONE_PROGRAM` slots is one program per head, which writes
  its output directly). It keeps an online softmax in float32 and stores a normalised partial
  output and its log-sum-exp. The last program of a head to arrive (an atomic on a self-resetting
  counter, as the GEMV kernels' split-K) merges the partials in a fixed order: one launch,
  deterministic results.

The kernel also does the steps around attention that would otherwise be kernels of their own in
every layer: it rotates q (rotary embedding, Hugging Face's half-split order; pass the cos/sin of
each row's position) and, given this step's key and value (`new_k`, `new_v`), rotates the key and
writes both into the cache at the row's position (the program whose slice holds that slot
attends to them from registers, so no program reads the slot while it is written). And, given
an int4 o_proj's input link (`feed`, `quant_matmul.InputLink`), for one row it writes each head's
output a second time in the form o_proj's integer GEMV reads (per group: 16-bit codes, their sum
and scale, as `quant_matmul._int4_x_kernel` makes them), so that GEMV launches no kernel to
prepare its input.

Layouts: q [B, H, D]; k, v [B, KVH, S, D] (the cache's layer views; the D axis contiguous);
input_pos [B] integer, the position of each row's query, 0 <= input_pos[b] < S (it attends
to slots 0..input_pos[b]); out [B, H, D] in q's dtype. H is a multiple of KVH
and the query heads h of kv head j are j * (H / KVH) ... (j + 1) * (H / KVH) - 1, as in
`model.grouped_attention`. The softmax scale is 1 / sqrt(D) (SDPA's default). cos, sin
[B, D / 2] float32 (optional): q is rotated by `apply_rotary` first. With `rope_table`, cos and
sin are the whole rotary tables [P, D / 2] (P >= S) and each row reads the table's row at its
position: the kernel gathers them itself. (Given the gathered [B, D / 2] rows, a compiled step
computes that gather again before every layer's attention: two more kernels a layer.) new_k, new_v
[B, KVH, D] (optional, any of the attention dtypes, D contiguous): stored in k and v's dtype.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from tachylm.kernels.elementwise import apply_rotary
from tachylm.kernels.quant_matmul import (HAS_TRITON, input_link, pdl_launch, prepared_views,
                                          split_counters)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tachylm.kernels.elementwise import _rotate
    from tachylm.kernels.quant_matmul import _store_x_groups, pdl_release, pdl_start

ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_S = 64  # cache slots per tile: [64, D] keys and values per step
_MAX_SPLITS = 64
# Up to _ONE_PROGRAM filled slots a head is one program that writes its output itself (no
# partials, no merge); longer rows take slices of at least _MIN_SLICE slots. On an H100 (8B shape,
# scripts/bench_attention.py): 205 slots 7.9 us in one program against 8.7 us in four slices of
# 64; 1030 slots 9.9 us in slices of 64 against 12.8 us in slices of 256.
_ONE_PROGRAM = 256
_MIN_SLICE = 64
# (slots per tile, pipeline stages). A short row is one program per kv head that walks its slots
# tile by tile, each tile a round trip to DRAM. Tiles of 128 slots with three stages cover 256
# slots in one: on an H100 (8B shape, qkv -> attention -> o chained in a CUDA graph,
# BENCHMARKS.md) attention at 200 slots added 4.8 us a layer against 8.6 us with (64, 2), the same
# at 4000 slots; decode 185.9 against 185.4 tokens/s, batches 8 and 16 +0.2%. Taken where that
# was measured, every program on an SM of its own (batch * kv heads <= SMs), and where it fits:
# 16-bit q, k, v and head size <= 128 (255 registers a thread against 199; float32 would need
# 272 KB of shared memory and head size 256 spills).
_TILE = (_BLOCK_S, 2)
_TILE_OWN_SM = (128, 3)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
           cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
           new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
           rope_table: bool = False) -> None:
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"decode_attention: expected q [B, H, D] and k, v [B, KVH, S, D], got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    batch, n_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or n_heads % k.shape[1]:
        raise ValueError(f"decode_attention: q {list(q.shape)} does not fit k/v {list(k.shape)} "
                         "(batch and head size must match, H a multiple of KVH)")
    if input_pos.shape != (batch,) or input_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: input_pos must be an integer tensor [{batch}], got "
                         f"{input_pos.dtype} {list(input_pos.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("decode_attention: give both cos and sin, or neither")
    if rope_table and cos is None:
        raise ValueError("decode_attention: rope_table=True needs the cos and sin tables")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is None:
            continue
        if rope_table:
            if (t.dim() != 2 or t.shape[0] < k.shape[2] or t.shape[1] != head_dim // 2
                    or t.dtype != torch.float32):
                raise ValueError(f"decode_attention: the {name} table must be float32 [P, "
                                 f"{head_dim // 2}] with P >= the cache's {k.shape[2]} slots, got "
                                 f"{t.dtype} {list(t.shape)}")
        elif tuple(t.shape) != (batch, head_dim // 2) or t.dtype != torch.float32:
            raise ValueError(f"decode_attention: {name} must be float32 [{batch}, {head_dim // 2}], "
                             f"got {t.dtype} {list(t.shape)}")
    if (new_k is None) != (new_v is None):
        raise ValueError("decode_attention: give both new_k and new_v, or neither")
    want = (batch, k.shape[1], head_dim)
    for name, t in (("new_k", new_k), ("new_v", new_v)):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"decode_attention: {name} must be [B, KVH, D] = {list(want)}, got "
                             f"{list(t.shape)}")


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         input_pos: torch.Tensor, cos: torch.Tensor | None = None,
                         sin: torch.Tensor | None = None, new_k: torch.Tensor | None = None,
                         new_v: torch.Tensor | None = None, kv_limit: int | None = None,
                         rope_table: bool = False) -> torch.Tensor:
    """Attention of one query per row over cache slots 0..input_pos[b]; see the module docstring.

    Args:
        q: [B, H, D]; k, v: [B, KVH, S, D]; input_pos: [B] integer, each in 0..S-1.
        cos, sin: optional [B, D / 2] float32: rotate q (and new_k) first.
        rope_table: cos and sin are the rotary tables [P, D / 2], read at each row's position.
        new_k, new_v: optional [B, KVH, D]: this step's key (rotated here like q) and value,
            written into k and v at slot input_pos[b] before attending.
        kv_limit: attend over slots [0, kv_limit) only (every input_pos below it): a shorter read
            of a long cache for eager steps.
    Returns:
        [B, H, D] in q's dtype.
    """
    _check(q, k, v, input_pos, cos, sin, new_k, new_v, rope_table)
    if rope_table:
        cos, sin = cos[input_pos], sin[input_pos]
    if new_k is not None:
        if cos is not None:
            new_k = apply_rotary(new_k, cos[:, None], sin[:, None])
        rows = torch.arange(q.shape[0], device=q.device)
        # advanced indices around a slice: the target is [B, KVH, D], as new_k
        k[rows, :, input_pos] = new_k.to(k.dtype)
        v[rows, :, input_pos] = new_v.to(v.dtype)
    if kv_limit is not None:
        k, v = k[:, :, :kv_limit], v[:, :, :kv_limit]
    if cos is not None:
        q = apply_rotary(q, cos[:, None], sin[:, None])
    batch, n_heads, head_dim = q.shape
    n_kv_heads, slots = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    # Query heads of a kv head folded into the query axis: each kv head is read once.
    qg = q.reshape(batch, n_kv_heads, group, head_dim)
    mask = torch.arange(slots, device=q.device)[None, :] <= input_pos[:, None]  # [B, S]
    out = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype),
                                         attn_mask=mask[:, None, None, :])
    return out.reshape(batch, n_heads, head_dim)


if HAS_TRITON:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # float32 operands would otherwise be rounded to tf32; 16-bit ones multiply exactly.
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _prepare_heads(o, heads, g_ok, b, pw_ptr, ps_ptr, psx_ptr, N_HEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, PREP_GROUP: tl.constexpr):
        """The output rows o [BLOCK_G, HEAD_DIM] of query heads `heads` (g_ok: the real ones),
        as stored (in out's dtype, given), prepared for an int4 GEMV with groups of PREP_GROUP
        (`quant_matmul._int4_x_kernel`'s planes, sums and scales, for row b)."""
        GPH: tl.constexpr = HEAD_DIM // PREP_GROUP  # groups a head
        groups = tl.reshape(o.to(tl.float32), (BLOCK_G * GPH, PREP_GROUP))
        offs = tl.reshape(heads[:, None] * GPH + tl.arange(0, GPH)[None, :], (BLOCK_G * GPH,))
        ok = tl.reshape(tl.broadcast_to(g_ok[:, None], (BLOCK_G, GPH)), (BLOCK_G * GPH,))
        _store_x_groups(groups, offs, ok, b, N_HEADS * GPH, N_HEADS * HEAD_DIM // 8, pw_ptr,
                        ps_ptr, psx_ptr, PREP_GROUP, BLOCK_G * GPH)

    @triton.jit
    def _decode_attn_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, nk_ptr, nv_ptr, out_ptr, ws_ptr, lse_ptr,
        cnt_ptr, pw_ptr, ps_ptr, psx_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_nkb, stride_nkh, stride_nvb, stride_nvh,
        stride_ob, stride_oh, stride_pos, stride_cb, qk_scale,
        N_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
        ONE_PROGRAM: tl.constexpr, MIN_SLICE: tl.constexpr, PRECISION: tl.constexpr,
        ROPE: tl.constexpr, ROPE_TABLE: tl.constexpr, WRITE: tl.constexpr, PDL: tl.constexpr,
        PREP_GROUP: tl.constexpr,
    ):
        pdl_start(PDL)  # programmatic dependent launch: see quant_matmul.pdl_launch
        pid_h = tl.program_id(0)  # b * N_KV_HEADS + kv head
        pid_s = tl.program_id(1)
        b = pid_h // N_KV_HEADS
        kvh = pid_h % N_KV_HEADS
        length = tl.load(pos_ptr + b * stride_pos).to(tl.int32) + 1
        # Slices in use for this length: one up to ONE_PROGRAM slots (that program writes the
        # output directly: no partials, no merge), else at most SPLITS of at least MIN_SLICE
        # slots. Programs past them leave at once.
        active = tl.where(length <= ONE_PROGRAM, 1, tl.minimum(SPLITS, tl.cdiv(length, MIN_SLICE)))
        per_split = tl.cdiv(tl.cdiv(length, active), BLOCK_S) * BLOCK_S
        start = pid_s * per_split
        end = tl.minimum(length, start + per_split)
        if pid_s >= active:
            pdl_release(PDL)
            return

        HALF: tl.constexpr = HEAD_DIM // 2
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_h = tl.arange(0, HALF)
        offs_s = tl.arange(0, BLOCK_S)
        g_ok = offs_g < GROUP
        heads = kvh * GROUP + offs_g  # query heads of this kv head (rows past GROUP are padding)
        # q in two halves (the rotary pairs); scores = q1 . k1 + q2 . k2.
        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        q1 = tl.load(q_rows + offs_h[None, :], mask=g_ok[:, None], other=0.0)
        q2 = tl.load(q_rows + HALF + offs_h[None, :], mask=g_ok[:, None], other=0.0)
        if ROPE:  # as apply_rotary: float32, then back to q's dtype
            # The row's own [D / 2], or the tables' row at its position (length - 1).
            c_row = (length - 1).to(tl.int64) if ROPE_TABLE else b
            cos_h = tl.load(cos_ptr + c_row * stride_cb + offs_h)[None, :]
            sin_h = tl.load(sin_ptr + c_row * stride_cb + offs_h)[None, :]
            q1, q2 = _rotate(q1, q2, cos_h, sin_h, q_ptr.dtype.element_ty)
        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        v_base = v_ptr + b * stride_vb + kvh * stride_vh
        if WRITE:
            # This step's key (rotated like q) and value, in the cache's dtype. The first program
            # of the head stores them at slot length - 1; the program whose slice holds that slot
            # attends to them from registers (never to the slot while it is being written).
            nk_row = nk_ptr + b * stride_nkb + kvh * stride_nkh
            nk1 = tl.load(nk_row + offs_h)[None, :]
            nk2 = tl.load(nk_row + HALF + offs_h)[None, :]
            if ROPE:
                nk1, nk2 = _rotate(nk1, nk2, cos_h, sin_h, k_ptr.dtype.element_ty)
            else:
                nk1, nk2 = nk1.to(k_ptr.dtype.element_ty), nk2.to(k_ptr.dtype.element_ty)
            nv = tl.load(nv_ptr + b * stride_nvb + kvh * stride_nvh + offs_d)[None, :]
            nv = nv.to(v_ptr.dtype.element_ty)
            if pid_s == 0:
                new_row = k_base + (length - 1) * stride_ks
                tl.store(new_row + offs_h[None, :], nk1)
                tl.store(new_row + HALF + offs_h[None, :], nk2)
                tl.store(v_base + (length - 1) * stride_vs + offs_d[None, :], nv)

        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max (log2 units)
        l_i = tl.zeros((BLOCK_G,), tl.float32)  # running sum of exp2
        acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
        cached_end = tl.minimum(end, length - 1) if WRITE else end  # slots read from the cache
        for s0 in range(start, cached_end, BLOCK_S):
            slots = s0 + offs_s
            s_ok = slots < cached_end
            k_rows = k_base + slots[:, None] * stride_ks
            k1 = tl.load(k_rows + offs_h[None, :], mask=s_ok[:, None], other=0.0)
            k2 = tl.load(k_rows + HALF + offs_h[None, :], mask=s_ok[:, None], other=0.0)
            vt = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :], mask=s_ok[:, None],
                         other=0.0)
            scores = (_dot(q1, tl.trans(k1), PRECISION)
                      + _dot(q2, tl.trans(k2), PRECISION)) * qk_scale  # [G, S]
            scores = tl.where(s_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PRECISION)
            m_i = m_new
        if WRITE:
            if (start <= length - 1) & (length - 1 < end):  # the new slot is in this slice
                score = tl.sum(q1.to(tl.float32) * nk1.to(tl.float32), axis=1)
                score = (score + tl.sum(q2.to(tl.float32) * nk2.to(tl.float32), axis=1)) * qk_scale
                m_new = tl.maximum(m_i, score)
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(score - m_new)
                l_i = l_i * alpha + p
                acc = acc * alpha[:, None] + p[:, None] * nv.to(tl.float32)
                m_i = m_new

        pdl_release(PDL)
        # Partial of this slice: normalised output and log2-sum-exp2 (-inf for an empty slice).
        has = l_i > 0
        part = acc / tl.where(has, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        if active == 1:
            stored = part.to(out_ptr.dtype.element_ty)
            tl.store(out_ptrs, stored, mask=g_ok[:, None])
            if PREP_GROUP > 0:
                _prepare_heads(stored, heads, g_ok, b, pw_ptr, ps_ptr, psx_ptr, N_KV_HEADS * GROUP,
                               HEAD_DIM, BLOCK_G, PREP_GROUP)
            return
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        rows = pid_h * GROUP + offs_g  # = b * H + head
        ws_rows = (rows * SPLITS + pid_s)
        tl.store(ws_ptr + ws_rows[:, None] * HEAD_DIM + offs_d[None, :], part, mask=g_ok[:, None])
        tl.store(lse_ptr + ws_rows, lse, mask=g_ok)
        # Publish after every thread's stores (release); the last arrival's acquire orders its
        # reads of the other slices after theirs.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_h, 1, sem="acq_rel", scope="gpu")
        if arrived == active - 1:
            # Unrolled over every possible slice (the loads issue together; a loop to `active`
            # would wait on each), those past `active` masked off.
            lse_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
            for s in tl.static_range(SPLITS):
                lse_max = tl.maximum(lse_max, tl.load(lse_ptr + rows * SPLITS + s,
                                                      mask=g_ok & (s < active), other=float("-inf"),
                                                      cache_modifier=".cg"))
            lse_max = tl.where(g_ok, lse_max, 0.0)
            total = tl.zeros((BLOCK_G,), tl.float32)
            merged = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
            for s in tl.static_range(SPLITS):  # fixed order: deterministic
                use = g_ok & (s < active)
                w = tl.exp2(tl.load(lse_ptr + rows * SPLITS + s, mask=use, other=float("-inf"),
                                    cache_modifier=".cg") - lse_max)
                part_s = tl.load(ws_ptr + (rows * SPLITS + s)[:, None] * HEAD_DIM + offs_d[None, :],
                                 mask=use[:, None], other=0.0, cache_modifier=".cg")
                merged += w[:, None] * part_s
                total += w
            merged = merged / tl.where(g_ok, total, 1.0)[:, None]
            stored = merged.to(out_ptr.dtype.element_ty)
            tl.store(out_ptrs, stored, mask=g_ok[:, None])
            if PREP_GROUP > 0:
                _prepare_heads(stored, heads, g_ok, b, pw_ptr, ps_ptr, psx_ptr,
                               N_KV_HEADS * GROUP, HEAD_DIM, BLOCK_G, PREP_GROUP)
            tl.atomic_xchg(cnt_ptr + pid_h, 0, sem="relaxed", scope="gpu")


def _kernel_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos: torch.Tensor | None, sin: torch.Tensor | None,
                    new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None
                    ) -> str | None:
    """Why the kernel cannot take these (already shape-checked) inputs, or None if it can."""
    if not (q.dtype == k.dtype == v.dtype and q.dtype in ATTENTION_DTYPES):
        return f"q, k, v must share one of {ATTENTION_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
    if new_k is not None and not {new_k.dtype, new_v.dtype} <= set(ATTENTION_DTYPES):
        return f"new_k and new_v must be one of {ATTENTION_DTYPES}, got {new_k.dtype}, {new_v.dtype}"
    head_dim = q.shape[-1]
    if head_dim < 32 or head_dim & (head_dim - 1):
        return f"head size {head_dim} must be a power of two >= 32"
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("new_k", new_k),
                    ("new_v", new_v)):
        if t is not None and t.stride(-1) != 1:
            return f"{name} must be contiguous along D"
    if cos is not None and cos.stride() != sin.stride():
        return "cos and sin must share one layout"
    return None


def choose_tile(batch: int, n_kv_heads: int, sms: int, head_dim: int, element_size: int) -> tuple:
    """(slots per tile, pipeline stages) of a launch: `_TILE_OWN_SM` where each row's one
    program per kv head has an SM to itself and the tile fits (16-bit, head size <= 128), else
    `_TILE`."""
    fits = element_size == 2 and head_dim <= 128
    return _TILE_OWN_SM if fits and batch * n_kv_heads <= sms else _TILE


def choose_splits(batch: int, n_kv_heads: int, slots: int, sms: int,
                  block_s: int = _BLOCK_S, one_per_sm: bool = False,
                  one_program: int = _ONE_PROGRAM) -> int:
    """Most slices per kv head, never more than the cache's tiles of block_s slots.

    One where no row can pass `one_program` slots (the kernel would use one slice). Otherwise as
    many as fill the GPU: with a tile whose shared memory leaves room for one program a SM
    (`one_per_sm`, the `_TILE_OWN_SM` tile) one wave, batch * n_kv_heads * splits <= sms; a
    second wave of such programs waits for the first to leave (on an H100, 8B shape, 4000 filled
    slots, in the decode chain: 32 slices 15.6-15.8 us, 16 slices 11.6-12.0 us, BENCHMARKS.md);
    with smaller tiles two programs a SM. The kernel uses fewer at short lengths
    (`_ONE_PROGRAM`, `_MIN_SLICE`)."""
    if slots <= one_program:
        return 1
    # The most programs that may still double: to at most one a SM (one wave), or on past two a SM.
    doubles_up_to = sms // 2 if one_per_sm else 2 * sms - 1
    splits = 1
    tiles = -(-slots // block_s)
    while (batch * n_kv_heads * splits <= doubles_up_to and splits < _MAX_SPLITS
           and splits * 2 <= tiles):
        splits *= 2
    return splits


def launch_shape(batch: int, n_kv_heads: int, slots: int, sms: int, head_dim: int,
                 element_size: int, one_program: int | None = None) -> tuple:
    """(slots per tile, pipeline stages, slices per kv head) of a launch: `choose_tile`, then
    `choose_splits` for that tile (`one_program` overrides `_ONE_PROGRAM`)."""
    block_s, stages = choose_tile(batch, n_kv_heads, sms, head_dim, element_size)
    splits = choose_splits(batch, n_kv_heads, slots, sms, block_s,
                           one_per_sm=(block_s, stages) == _TILE_OWN_SM,
                           one_program=_ONE_PROGRAM if one_program is None else one_program)
    return block_s, stages, splits


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few slices, so tests cover the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            input_pos: torch.Tensor, cos: torch.Tensor | None = None,
                            sin: torch.Tensor | None = None, new_k: torch.Tensor | None = None,
                            new_v: torch.Tensor | None = None, splits: int | None = None,
                            one_program: int | None = None, min_slice: int | None = None,
                            rope_table: bool = False, feed: int = 0) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1); arguments as the ref.

    `splits`, `one_program` and `min_slice` override `choose_splits`, `_ONE_PROGRAM` and
    `_MIN_SLICE` (tests, benchmarks). q, k and v must share one dtype. With new_k/new_v the
    kernel writes them into k and v. feed: the id of an `quant_matmul.InputLink` (o_proj's):
    with one row, the kernel also prepares its output for that int4 GEMV, each head's output
    where it is written (a head of D outputs holds whole groups when the group size divides D).
    """
    _check(q, k, v, input_pos, cos, sin, new_k, new_v, rope_table)
    refusal = _kernel_refusal(q, k, v, cos, sin, new_k, new_v)
    if refusal is not None:
        raise ValueError(f"decode_attention_triton: {refusal}")
    batch, n_heads, head_dim = q.shape
    n_kv_heads, slots = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    block_s, stages, chosen = launch_shape(batch, n_kv_heads, slots, _sm_count(q.device), head_dim,
                                           q.element_size(), one_program)
    splits = chosen if splits is None else splits
    out = torch.empty_like(q)
    ws = torch.empty((batch * n_heads * splits, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch * n_heads * splits,), dtype=torch.float32, device=q.device)
    counters = split_counters(q.device, batch * n_kv_heads)
    qk_scale = 1.0 / math.sqrt(head_dim) * 1.4426950408889634  # natural exp -> exp2
    write = new_k is not None
    new_k, new_v = (new_k, new_v) if write else (q, q)  # placeholders, never read
    link = input_link(feed)
    prep = None
    if link is not None and batch == 1 and head_dim % link.group == 0 \
            and link.k == n_heads * head_dim:
        prep = prepared_views(link.buffer(q.device), link.k, link.group)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _decode_attn_kernel[(batch * n_kv_heads, splits)](
            q, k, v, input_pos, q if cos is None else cos, q if sin is None else sin, new_k, new_v,
            out, ws, lse, counters, *(prep[:3] if prep else (counters, ws, ws)),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), new_k.stride(0), new_k.stride(1),
            new_v.stride(0), new_v.stride(1), out.stride(0), out.stride(1),
            input_pos.stride(0), 0 if cos is None else cos.stride(0), qk_scale,
            N_KV_HEADS=n_kv_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=head_dim, BLOCK_S=block_s, SPLITS=splits,
            ONE_PROGRAM=_ONE_PROGRAM if one_program is None else one_program,
            MIN_SLICE=_MIN_SLICE if min_slice is None else min_slice,
            PRECISION=q.dtype == torch.float32, ROPE=cos is not None, ROPE_TABLE=rope_table,
            WRITE=write, PREP_GROUP=link.group if prep else 0,
            num_warps=4, num_stages=stages, **pdl_launch(q.device))
    if prep:
        link.offer(out)
    return out


@torch.library.custom_op(
    "tachylm::decode_attention", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor input_pos, Tensor? cos, Tensor? sin, "
           "bool rope_table, int feed=0) -> Tensor")
def _decode_attention_op(q, k, v, input_pos, cos, sin, rope_table, feed=0):
    return decode_attention_triton(q, k, v, input_pos, cos, sin, rope_table=rope_table, feed=feed)


@_decode_attention_op.register_fake
def _decode_attention_fake(q, k, v, input_pos, cos, sin, rope_table, feed=0):
    return torch.empty_like(q)


@torch.library.custom_op(
    "tachylm::decode_attention_write", mutates_args=("k", "v"),
    schema="(Tensor q, Tensor(a!) k, Tensor(b!) v, Tensor input_pos, Tensor? cos, Tensor? sin, "
           "Tensor new_k, Tensor new_v, bool rope_table, int feed=0) -> Tensor")
def _decode_attention_write_op(q, k, v, input_pos, cos, sin, new_k, new_v, rope_table, feed=0):
    return decode_attention_triton(q, k, v, input_pos, cos, sin, new_k, new_v,
                                   rope_table=rope_table, feed=feed)


@_decode_attention_write_op.register_fake
def _decode_attention_write_fake(q, k, v, input_pos, cos, sin, new_k, new_v, rope_table, feed=0):
    return torch.empty_like(q)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     input_pos: torch.Tensor, cos: torch.Tensor | None = None,
                     sin: torch.Tensor | None = None, new_k: torch.Tensor | None = None,
                     new_v: torch.Tensor | None = None, kv_limit: int | None = None,
                     rope_table: bool = False, feed: int = 0) -> torch.Tensor:
    """Attention of one query per row over cache slots 0..input_pos[b] (q rotated first by
    cos/sin when given), optionally writing this step's key and value into the cache first.

    The Triton split-KV kernel on CUDA (reads only the filled slots, and with new_k/new_v also
    does the rotary embedding of the key and the cache write); `decode_attention_ref` elsewhere
    or for layouts the kernel does not take. Works under torch.compile and CUDA graphs (custom
    ops; the positions stay on the device).

    Args:
        q: [B, H, D]; k, v: [B, KVH, S, D] (a layer of the KV cache); input_pos: [B] integer.
        cos, sin: optional [B, D / 2] float32, the rotary table at each row's position.
        new_k, new_v: optional [B, KVH, D], written at slot input_pos[b] (new_k rotated like q).
        kv_limit: the reference path attends over slots [0, kv_limit) only (eager steps); the
            kernel reads only the filled slots whatever it is.
        rope_table: cos and sin are the whole rotary tables [P, D / 2] (P >= S), read at each
            row's position (by the kernel itself on CUDA).
        feed: the input link of the Linear the output goes to (`decode_attention_triton`); 0:
            none. A speed hint: the result is the same.
    Returns:
        [B, H, D] in q's dtype.
    """
    if not (HAS_TRITON and q.is_cuda and _kernel_refusal(q, k, v, cos, sin, new_k, new_v) is None):
        return decode_attention_ref(q, k, v, input_pos, cos, sin, new_k, new_v, kv_limit,
                                    rope_table)
    _check(q, k, v, input_pos, cos, sin, new_k, new_v, rope_table)
    if new_k is None:
        return _decode_attention_op(q, k, v, input_pos, cos, sin, rope_table, feed)
    return _decode_attention_write_op(q, k, v, input_pos, cos, sin, new_k, new_v, rope_table,
                                      feed)
