"""Decode attention: the reference against float64, the Triton kernel (interpreted) against the
reference, and on a GPU the kernel under torch.compile with CUDA graphs."""

import importlib.util
import json
import sys
import zlib

import pytest
import torch

from tachylm.kernels.attention import (choose_splits, choose_tile, decode_attention,
                                       decode_attention_ref, launch_shape)
from triton_interpreter import outcome, patch_interpreter, run_child

HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rotate(q, cos, sin):
    """float64 rotary embedding of q [B, H, D] (pairs i, i + D/2) by cos/sin [B, D/2]."""
    q1, q2 = q.double().chunk(2, dim=-1)
    c, s = cos.double()[:, None], sin.double()[:, None]
    return torch.cat((q1 * c - q2 * s, q2 * c + q1 * s), dim=-1)


def oracle(q, k, v, input_pos, cos=None, sin=None):
    """float64 softmax attention, row by row and head by head (q rotated first if cos is given)."""
    if cos is not None:
        q = rotate(q, cos, sin)
    batch, n_heads, _ = q.shape
    group = n_heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(batch):
        n = int(input_pos[b]) + 1
        for h in range(n_heads):
            keys, values = k[b, h // group, :n].double(), v[b, h // group, :n].double()
            scores = keys @ q[b, h].double() / q.shape[-1] ** 0.5
            out[b, h] = torch.softmax(scores, 0) @ values
    return out


def inputs(name, batch, n_heads, n_kv_heads, slots, head_dim, dtype, positions):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(batch, n_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, n_kv_heads, slots, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, n_kv_heads, slots, head_dim, generator=gen).to(dtype)
    return q, k, v, torch.tensor(positions)


def rotary(name, batch, head_dim):
    """cos/sin [B, D/2] float32 of random angles."""
    angles = torch.rand(batch, head_dim // 2, generator=torch.Generator().manual_seed(
        zlib.crc32(name.encode()) + 1)) * 6.3
    return angles.cos(), angles.sin()


def rotary_tables(name, slots, head_dim):
    """cos/sin tables [slots, D/2] float32 of random angles (rows read at each position)."""
    return rotary(name + "-table", slots, head_dim)


def rel_err(out, ref):
    return float((out.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_reference_matches_float64(n_heads, n_kv_heads):
    q, k, v, pos = inputs(f"ref{n_heads}", 3, n_heads, n_kv_heads, 40, 16, torch.float32, [0, 17, 39])
    assert rel_err(decode_attention_ref(q, k, v, pos), oracle(q, k, v, pos)) < 1e-5


def test_reference_rotates_q_like_the_model():
    q, k, v, pos = inputs("rope", 2, 8, 2, 30, 32, torch.float32, [4, 29])
    cos, sin = rotary("rope", 2, 32)
    assert rel_err(decode_attention_ref(q, k, v, pos, cos, sin),
                   oracle(q, k, v, pos, cos, sin)) < 1e-5


def test_stale_slots_past_the_position_are_ignored():
    q, k, v, pos = inputs("stale", 2, 4, 2, 32, 16, torch.float32, [5, 20])
    out = decode_attention(q, k, v, pos)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 6:] = 1e4  # garbage after row 0's position
    v2[1, :, 21:] = -3e3
    assert torch.equal(decode_attention(q, k2, v2, pos), out)


def test_reference_writes_this_steps_key_and_value():
    q, k, v, pos = inputs("refwrite", 2, 8, 2, 40, 32, torch.float32, [17, 3])
    cos, sin = rotary("refwrite", 2, 32)
    new_k, new_v, stored_k, stored_v = new_entries("refwrite", k, cos, sin)
    want_k, want_v = k.clone(), v.clone()
    rows = torch.arange(2)
    want_k[rows, :, pos], want_v[rows, :, pos] = stored_k, stored_v
    want = oracle(q, want_k, want_v, pos, cos, sin)
    out = decode_attention(q, k, v, pos, cos, sin, new_k, new_v)
    assert rel_err(out, want) < 1e-5
    assert rel_err(k, want_k.double()) < 1e-6 and torch.equal(v, want_v)
    # attending over a prefix of the cache (eager steps) changes nothing
    k[:, :, 20:], v[:, :, 20:] = 7.0, -7.0
    out = decode_attention(q, k, v, pos, cos, sin, new_k, new_v, kv_limit=20)
    assert rel_err(out, want) < 1e-5


def test_reference_reads_rotary_tables_at_each_position():
    """rope_table=True: cos/sin are whole tables and each row takes its position's row, as the
    model's decode passes them (the same result as the gathered rows)."""
    q, k, v, pos = inputs("reftable", 2, 8, 2, 40, 32, torch.float32, [17, 3])
    cos_t, sin_t = rotary_tables("reftable", 40, 32)
    new_k, new_v, _, _ = new_entries("reftable", k, cos_t[pos], sin_t[pos])
    k2, v2 = k.clone(), v.clone()
    out = decode_attention(q, k, v, pos, cos_t, sin_t, new_k, new_v, rope_table=True)
    want = decode_attention(q, k2, v2, pos, cos_t[pos], sin_t[pos], new_k, new_v)
    assert torch.equal(out, want) and torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ValueError, match=r"the cos table must be float32 \[P, 16\] with P >= "
                                         "the cache's 40 slots"):
        decode_attention(q, k, v, pos, cos_t[:39], sin_t[:39], rope_table=True)
    with pytest.raises(ValueError, match="rope_table=True needs the cos and sin tables"):
        decode_attention(q, k, v, pos, rope_table=True)


def test_bad_shapes_raise_clear_errors():
    q, k, v, pos = inputs("bad", 2, 6, 4, 8, 16, torch.float32, [1, 2])
    with pytest.raises(ValueError, match="multiple of KVH"):
        decode_attention(q, k, v, pos)
    q, k, v, pos = inputs("bad2", 2, 4, 2, 8, 16, torch.float32, [1, 2])
    with pytest.raises(ValueError, match="input_pos must be an integer tensor"):
        decode_attention(q, k, v, pos.float())
    cos, sin = rotary("bad2", 2, 16)
    with pytest.raises(ValueError, match="both cos and sin"):
        decode_attention(q, k, v, pos, cos, None)
    with pytest.raises(ValueError, match="cos must be float32"):
        decode_attention(q, k, v, pos, cos.double(), sin)
    new = torch.zeros(2, 2, 16)
    with pytest.raises(ValueError, match="both new_k and new_v"):
        decode_attention(q, k, v, pos, new_k=new)
    with pytest.raises(ValueError, match=r"new_v must be \[B, KVH, D\] = \[2, 2, 16\]"):
        decode_attention(q, k, v, pos, new_k=new, new_v=new[:, :1])


def test_kernel_refuses_inputs_it_cannot_take():
    from tachylm.kernels.attention import decode_attention_triton

    q, k, v, pos = inputs("refuse", 1, 4, 2, 8, 16, torch.float32, [3])
    with pytest.raises(ValueError, match="head size 16 must be a power of two >= 32"):
        decode_attention_triton(q, k, v, pos)
    q, k, v, pos = inputs("refuse2", 1, 4, 2, 8, 32, torch.float32, [3])
    with pytest.raises(ValueError, match="q, k, v must share one of"):
        decode_attention_triton(q, k.half(), v.half(), pos)
    with pytest.raises(ValueError, match="k must be contiguous along D"):
        decode_attention_triton(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, pos)


def test_splits_cover_the_gpu_but_not_past_the_cache():
    # small tiles: past two programs a SM
    assert choose_splits(1, 8, 131072, 132) == 64  # 8 kv heads: 64 slices fill 2 x 132 SMs
    assert choose_splits(8, 8, 131072, 132) == 8
    assert choose_splits(1, 8, 512, 132) == 8  # 512 slots are 8 tiles of 64
    assert choose_splits(64, 8, 4096, 132) == 1
    assert choose_splits(1, 8, 512, 132, block_s=128) == 4  # 512 slots are 4 tiles of 128
    # the own-SM tile: one program a SM, one wave
    assert choose_splits(1, 8, 16384, 132, 128, one_per_sm=True) == 16  # 128 programs
    assert choose_splits(1, 32, 4096, 132, 128, one_per_sm=True) == 4
    assert choose_splits(16, 8, 4096, 132, 128, one_per_sm=True) == 1
    assert choose_splits(1, 8, 384, 132, 128, one_per_sm=True) == 2  # 3 tiles


def test_one_slice_where_no_row_can_pass_one_program():
    # a cache of at most _ONE_PROGRAM slots never has a second slice in use
    assert choose_splits(1, 8, 256, 132) == 1
    assert choose_splits(1, 8, 256, 132, block_s=128, one_per_sm=True) == 1
    assert choose_splits(1, 8, 257, 132) == 4  # 257 slots: 5 tiles of 64
    assert choose_splits(1, 8, 256, 132, one_program=0) == 4  # a test's forced slicing


def test_launch_slices_for_the_tile_it_takes():
    # 8B shape, one row: the own-SM tile, one wave of 8 x 16 programs on 132 SMs
    assert launch_shape(1, 8, 16384, 132, 128, 2) == (128, 3, 16)
    assert launch_shape(1, 32, 4096, 132, 128, 2) == (128, 3, 4)  # 7B shape: 32 x 4
    assert launch_shape(1, 8, 256, 132, 128, 2) == (128, 3, 1)  # never past one program
    assert launch_shape(1, 8, 256, 132, 128, 2, one_program=0) == (128, 3, 2)
    # float32 takes the small tile, two programs a SM
    assert launch_shape(1, 8, 16384, 132, 128, 4) == (64, 2, 64)
    assert launch_shape(32, 8, 16384, 132, 128, 2) == (64, 2, 2)  # 256 programs share SMs


def test_large_tiles_only_where_each_program_has_an_sm_and_they_fit():
    assert choose_tile(1, 8, 132, 128, 2) == (128, 3)  # 8 programs on 132 SMs
    assert choose_tile(16, 8, 132, 128, 2) == (128, 3)  # 128 programs: still one a SM
    assert choose_tile(32, 8, 132, 128, 2) == (64, 2)  # 256 programs share SMs: small tiles
    assert choose_tile(1, 8, 132, 128, 4) == (64, 2)  # float32: too much shared memory
    assert choose_tile(1, 8, 132, 256, 2) == (64, 2)  # head size 256: registers spill


# ----------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter (a child process: the switch precedes importing triton)
# ----------------------------------------------------------------------------------------------

# name -> (batch, H, KVH, slots, head_dim, dtype, positions, splits, rotate q, min_slice, write);
# a min_slice runs every length in slices (no one-program rows), None the kernel's defaults.
# "rotate q" is False, True (cos/sin rows per batch row) or "table" (rope_table: the kernel reads
# the tables' row at each position).
CASES = {
    "mha-fp32-split4": (1, 4, 4, 130, 32, "fp32", [129], 4, False, 64, False),
    "gqa-bf16-ragged": (2, 8, 2, 200, 32, "bf16", [0, 136], 4, False, 64, False),
    "gqa-fp16-empty-slices": (3, 6, 3, 64, 32, "fp16", [63, 4, 32], 8, False, 1, False),
    "group12-fp32-split8": (2, 12, 1, 300, 64, "fp32", [298, 6], 8, False, 64, False),
    "one-split": (1, 4, 2, 100, 32, "fp32", [99], 1, False, 64, False),
    "rope-fp32": (2, 8, 2, 150, 64, "fp32", [149, 3], 4, True, 64, False),
    "rope-bf16": (1, 32, 8, 256, 128, "bf16", [204], 4, True, 64, False),
    # the defaults: one program per head up to 256 slots, slices of 64 past it
    "default-slices": (2, 8, 2, 300, 32, "fp32", [255, 256], 4, True, None, False),
    # this step's key and value written by the kernel (and used for their slot)
    "write-rope-fp32-merge": (2, 8, 2, 200, 64, "fp32", [130, 7], 4, True, 64, True),
    "write-rope-bf16-one-program": (2, 8, 2, 200, 64, "bf16", [199, 0], 4, True, None, True),
    "write-fp16-no-rope": (1, 4, 4, 96, 32, "fp16", [70], 2, False, 32, True),
    # the new slot alone in the last slice (nothing of it read from the cache), three of four
    # slices in use
    "write-new-slot-alone": (1, 8, 2, 200, 32, "bf16", [128], 4, True, 64, True),
    "table-write-bf16-merge": (2, 8, 2, 200, 64, "bf16", [130, 7], 4, "table", 64, True),
    "table-fp32-one-program": (3, 8, 2, 96, 32, "fp32", [95, 0, 40], 2, "table", None, False),
    "write-bf16-one-program-one-row": (1, 8, 2, 100, 64, "bf16", [60], 4, True, None, True),
}
# One row, its output also prepared for an int4 GEMV of this group size (o_proj's, linked by
# `quant_matmul.InputLink`): in the one-program path and in the merge.
PREP_CASES = {"one-split": 32, "rope-bf16": 128, "write-new-slot-alone": 32,
              "write-bf16-one-program-one-row": 64, "write-fp16-no-rope": 32}


def new_entries(name, k, cos, sin):
    """This step's key and value [B, KVH, D] (float32, as the model's projections may give them)
    and the cache the kernel should leave: k and v with slot input_pos holding them (the key
    rotated in float64, both rounded to the cache's dtype)."""
    batch, kv_heads, _, head_dim = k.shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 2)
    new_k = torch.randn(batch, kv_heads, head_dim, generator=gen)
    new_v = torch.randn(batch, kv_heads, head_dim, generator=gen)
    stored_k = new_k if cos is None else rotate(new_k, cos, sin)
    return new_k, new_v, stored_k.to(k.dtype), new_v.to(k.dtype)


def _interpreter_child():
    patch_interpreter()
    from tachylm.kernels import quant_matmul as qm
    from tachylm.kernels.attention import decode_attention_triton
    # o_proj's GEMV autotunes: timing means nothing here, so each config runs once
    qm._tuning_bench = lambda fn, quantiles: (fn(), [1.0] * len(quantiles))[1]

    def run(name, batch, heads, kv_heads, slots, head_dim, dtype, pos, splits, rope, min_slice,
            write):
        q, k, v, input_pos = inputs(name, batch, heads, kv_heads, slots, head_dim, DTYPES[dtype], pos)
        cos, sin = rotary(name, batch, head_dim) if rope else (None, None)
        table = rope == "table"
        if table:  # the kernel gets the tables; the oracle and the expected cache their rows
            cos_t, sin_t = rotary_tables(name, slots, head_dim)
            cos, sin = cos_t[input_pos], sin_t[input_pos]
        new_k = new_v = None
        if write:
            new_k, new_v, stored_k, stored_v = new_entries(name, k, cos, sin)
            rows = torch.arange(batch)
            want_k, want_v = k.clone(), v.clone()
            want_k[rows, :, input_pos], want_v[rows, :, input_pos] = stored_k, stored_v
            k[rows, :, input_pos] = v[rows, :, input_pos] = torch.tensor(1e4, dtype=k.dtype)
        link = qm.input_link(qm.link_int4(heads * head_dim, PREP_CASES[name])) \
            if name in PREP_CASES else None
        out = decode_attention_triton(q, k, v, input_pos, cos_t if table else cos,
                                      sin_t if table else sin, new_k, new_v,
                                      splits=splits, min_slice=min_slice,
                                      one_program=None if min_slice is None else 0,
                                      rope_table=table, feed=link.id if link else 0)
        result = {}
        if link is not None:  # o_proj's integer GEMV, given the prepared x and preparing it
            gen = torch.Generator().manual_seed(3)
            group, width = PREP_CASES[name], heads * head_dim
            qweight = torch.randint(0, 256, (24, width // 2), generator=gen, dtype=torch.uint8)
            scale = (torch.rand(24, width // group, generator=gen) * 0.05).to(torch.bfloat16)
            zero = (torch.rand(24, width // group, generator=gen) * 15).to(torch.bfloat16)
            packed = qm.pack_scale_zero(scale, zero)
            x = out.reshape(1, width)
            linked = qm._triton_linear(qm.INT4, x, qweight, scale, zero, group, None,
                                       scale_zero=packed, fed=link.id)
            result["taken"] = link.taken
            own = qm._triton_linear(qm.INT4, x.clone(), qweight, scale, zero, group, None,
                                    scale_zero=packed, fed=link.id)
            result["same_bits"] = torch.equal(linked, own) and link.taken == 1
        result.update({"rel": rel_err(out, oracle(q, k, v, input_pos, cos, sin)),
                  "dtype": str(out.dtype), "shape": list(out.shape),
                  "counters": int(qm.split_counters(q.device).abs().sum())})
        if write:
            # the new entries may differ from the float64 rotation by one rounding
            result["cache_err"] = max(rel_err(k, want_k.double()), rel_err(v, want_v.double()))
        return result

    # a case that raises is reported to its parent test
    print(json.dumps({name: outcome(run, name, *case) for name, case in CASES.items()}))


@pytest.fixture(scope="module")
def interpreted():
    return run_child(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel_interpreted(interpreted, name):
    result = interpreted[name]
    assert "error" not in result, result.get("error")
    batch, heads, _, _, head_dim, dtype = CASES[name][:6]
    assert result["shape"] == [batch, heads, head_dim]
    assert result["dtype"] == str(DTYPES[dtype])
    assert result["rel"] < {"fp32": 1e-5, "bf16": 2e-2, "fp16": 3e-3}[dtype]
    assert result["counters"] == 0  # every launch leaves its arrival counters at zero
    if CASES[name][-1]:  # the kernel wrote this step's key and value into the cache
        assert result["cache_err"] < {"fp32": 1e-6, "bf16": 1e-2, "fp16": 1e-3}[dtype]
    if name in PREP_CASES:
        # o_proj took the prepared output once, and computed the bits it computes from its own
        # preparation (a copy of x, which it must not take it for)
        assert result["taken"] == 1 and result["same_bits"], result


def _nvidia_backend():
    if not HAS_TRITON:
        return False
    import triton.backends
    return "nvidia" in triton.backends.backends


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton with its NVIDIA backend")
@pytest.mark.parametrize("prep_group", [0, 32, 128])
def test_kernel_compiles_for_sm90(prep_group):
    """The kernel lowers for an H100 (the interpreter checks values, not what the compiler
    takes), at the 8B's shape, writing the cache, with and without preparing its output for an
    int4 GEMV (`quant_matmul.InputLink`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from tachylm.kernels.attention import _decode_attn_kernel as fn
    types = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "nk_ptr", "nv_ptr", "out_ptr")}
    types.update(pos_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", ws_ptr="*fp32",
                 lse_ptr="*fp32", cnt_ptr="*i32", pw_ptr="*i32", ps_ptr="*fp32",
                 psx_ptr="*fp32", qk_scale="fp32")
    meta = dict(N_KV_HEADS=8, GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_S=128, SPLITS=16,
                ONE_PROGRAM=256, MIN_SLICE=64, PRECISION=False, ROPE=True, ROPE_TABLE=True,
                WRITE=True, PDL=True, PREP_GROUP=prep_group)
    signature = {name: types.get(name, "i32") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in meta})
    kernel = triton.compile(triton.compiler.ASTSource(fn, signature, meta),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, num_stages=3))
    assert "st.global" in kernel.asm["ptx"]


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                          reason="needs a CUDA GPU and triton")


@cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_cuda_kernel_matches_reference(dtype):
    q, k, v, pos = inputs("cuda" + dtype, 3, 32, 8, 4096, 128, DTYPES[dtype], [0, 700, 4095])
    cos, sin = rotary("cuda" + dtype, 3, 128)
    q, k, v, pos, cos, sin = (t.cuda() for t in (q, k, v, pos, cos, sin))
    tolerance = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 3e-3}[dtype]
    out = decode_attention(q, k, v, pos)
    assert rel_err(out.cpu(), oracle(q.cpu(), k.cpu(), v.cpu(), pos.cpu())) < tolerance
    out = decode_attention(q, k, v, pos, cos, sin)
    want = oracle(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), cos.cpu(), sin.cpu())
    assert rel_err(out.cpu(), want) < tolerance


@cuda
@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cuda_kernel_writes_the_cache(dtype, table):
    """With new_k/new_v the kernel stores them (the key rotated) and attends with them, never with
    what the slot held before; short rows take one program per head, long ones merge slices.
    With `table` it reads the rotary tables at each row's position itself."""
    q, k, v, pos = inputs("cw" + dtype, 3, 32, 8, 4096, 128, DTYPES[dtype], [3, 700, 4095])
    cos_t, sin_t = rotary_tables("cw" + dtype, 4096, 128)
    cos, sin = cos_t[pos], sin_t[pos]
    new_k, new_v, stored_k, stored_v = new_entries("cw" + dtype, k, cos, sin)
    rows = torch.arange(3)
    want_k, want_v = k.clone(), v.clone()
    want_k[rows, :, pos], want_v[rows, :, pos] = stored_k, stored_v
    want = oracle(q, want_k, want_v, pos, cos, sin)
    k[rows, :, pos] = v[rows, :, pos] = torch.tensor(1e4, dtype=k.dtype)  # stale garbage
    if table:
        cos, sin = cos_t, sin_t
    q, k, v, pos, cos, sin, new_k, new_v = (t.cuda() for t in (q, k, v, pos, cos, sin, new_k,
                                                                 new_v))
    out = decode_attention(q, k, v, pos, cos, sin, new_k, new_v, rope_table=table)
    tolerance = {"fp32": 1e-5, "bf16": 2e-2}[dtype]
    assert rel_err(out.cpu(), want) < tolerance
    cache_tolerance = {"fp32": 1e-6, "bf16": 1e-2}[dtype]
    assert rel_err(k.cpu(), want_k.double()) < cache_tolerance
    assert rel_err(v.cpu(), want_v.double()) < cache_tolerance


@cuda
def test_compiled_cache_write_is_in_place():
    """Inductor runs the writing op on the cache buffers themselves: no copy of the cache."""
    from torch._inductor.utils import run_and_get_code

    q, k, v, pos = inputs("inplace", 1, 32, 8, 4096, 128, torch.bfloat16, [9])
    cos, sin = rotary("inplace", 1, 128)
    new_k, new_v, stored_k, _ = new_entries("inplace", k, cos, sin)
    q, k, v, pos, cos, sin, new_k, new_v = (t.cuda() for t in (q, k, v, pos, cos, sin, new_k,
                                                                 new_v))
    step = torch.compile(decode_attention, fullgraph=True)
    _, code = run_and_get_code(step, q, k, v, pos, cos, sin, new_k, new_v)
    assert "decode_attention_write" in "".join(code)
    assert "empty_strided_cuda((1, 8, 4096, 128)" not in "".join(code)  # no copy of the cache
    assert rel_err(k[:, :, 9].cpu(), stored_k.double()) < 1e-2


@cuda
def test_cuda_graph_follows_the_positions():
    """Under torch.compile with CUDA graphs the positions are read on the device at each replay."""
    q, k, v, _ = inputs("graph", 1, 32, 8, 2048, 128, torch.bfloat16, [0])
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    step = torch.compile(decode_attention, fullgraph=True, mode="reduce-overhead")
    for position in (5, 5, 5, 100, 2047, 64):
        pos = torch.tensor([position], device="cuda")
        out = step(q, k, v, pos).clone()
        ref = decode_attention_ref(q.float(), k.float(), v.float(), pos)
        assert rel_err(out.cpu(), ref.double().cpu()) < 2e-2, position


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpreter_child()
