"""Decode attention on the GPU: the Triton split-KV kernel against masked SDPA over the whole cache.

Usage: PYTHONPATH=src python3 scripts/bench_attention.py
Shapes: Llama-3.1-8B (32 query heads, 8 kv heads, head size 128), batch 1 and 8; each row is
checked against the float32 reference before it is timed (median of 20 runs, L2 emptied).
Columns: the kernel as the model calls it (rotary, and this step's key and value written into the
cache), the same with the earlier slicing (one program up to 256 slots, slices of 256 past it),
the kernel without rotary or write, and masked SDPA.
"""
import torch

from tachylm.kernels.attention import (decode_attention, decode_attention_ref,
                                       decode_attention_triton)
from tachylm.kernels.quant_matmul import _tuning_bench
from tachylm.model import grouped_attention

H, KVH, D = 32, 8, 128


def timed(fn) -> float:
    """Median microseconds of fn, each run from an emptied L2 (the GEMV autotuner's timer)."""
    return _tuning_bench(fn, [0.5])[0] * 1000


print(f"{'batch':>5} {'slots':>6} {'filled':>6} {'model us':>8} {'s256':>8} {'plain us':>8} "
      f"{'GB/s':>6} {'sdpa us':>8} {'err':>8}")
for batch, slots, filled in [(1, 256, 205), (1, 2048, 1030), (1, 16384, 200), (1, 16384, 16000),
                             (8, 256, 205), (8, 4096, 4000)]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(batch, KVH, slots, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(batch, KVH, slots, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    new_k = torch.randn(batch, KVH, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    new_v = torch.randn(batch, KVH, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    angles = torch.rand(batch, D // 2, device="cuda", generator=gen) * 6.3
    cos, sin = angles.cos(), angles.sin()
    pos = torch.full((batch,), filled - 1, device="cuda")
    pos[0] = filled // 2  # ragged rows
    k_ref, v_ref = k.float(), v.float()
    ref = decode_attention_ref(q.float(), k_ref, v_ref, pos, cos, sin, new_k.float(), new_v.float())
    out = decode_attention(q, k, v, pos, cos, sin, new_k, new_v)
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-2, err
    assert ((k.float() - k_ref).abs().max() / k_ref.abs().max()).item() < 1e-2
    old = {"one_program": 256, "min_slice": 256}
    out_old = decode_attention_triton(q, k, v, pos, cos, sin, new_k, new_v, **old)
    assert ((out_old.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2
    t_model = timed(lambda: decode_attention(q, k, v, pos, cos, sin, new_k, new_v))
    t_old = timed(lambda: decode_attention_triton(q, k, v, pos, cos, sin, new_k, new_v, **old))
    t_plain = timed(lambda: decode_attention(q, k, v, pos))
    mask = (torch.arange(slots, device="cuda")[None, :] <= pos[:, None])[:, None, None, :]
    t_sdpa = timed(lambda: grouped_attention(q[:, :, None], k, v, mask))
    read = 2 * batch * KVH * filled * D * 2
    print(f"{batch:5d} {slots:6d} {filled:6d} {t_model:8.1f} {t_old:8.1f} {t_plain:8.1f} "
          f"{read / t_model / 1e3:6.0f} {t_sdpa:8.1f} {err:8.1e}")
