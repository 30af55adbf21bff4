"""Decode attention on the GPU: the Triton split-KV kernel against masked SDPA over the whole cache.

Usage: PYTHONPATH=src python3 scripts/bench_attention.py
Shapes: Llama-3.1-8B (32 query heads, 8 kv heads, head size 128), batch 1 and 8; each row is
checked against the float32 reference before it is timed (median of 20 runs, L2 emptied).
"""
import torch

from tachylm.kernels.attention import decode_attention, decode_attention_ref
from tachylm.kernels.quant_matmul import _tuning_bench
from tachylm.model import grouped_attention

H, KVH, D = 32, 8, 128


def timed(fn) -> float:
    """Median microseconds of fn, each run from an emptied L2 (the GEMV autotuner's timer)."""
    return _tuning_bench(fn, [0.5])[0] * 1000


print(f"{'batch':>5} {'slots':>6} {'filled':>6} {'triton us':>9} {'GB/s':>6} {'sdpa us':>8} {'err':>8}")
for batch, slots, filled in [(1, 256, 205), (1, 2048, 1030), (1, 16384, 200), (1, 16384, 16000),
                             (8, 256, 205), (8, 4096, 4000)]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(batch, KVH, slots, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(batch, KVH, slots, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    pos = torch.full((batch,), filled - 1, device="cuda")
    pos[0] = filled // 2  # ragged rows
    out = decode_attention(q, k, v, pos)
    ref = decode_attention_ref(q.float(), k.float(), v.float(), pos)
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-2, err
    t_tri = timed(lambda: decode_attention(q, k, v, pos))
    mask = (torch.arange(slots, device="cuda")[None, :] <= pos[:, None])[:, None, None, :]
    t_sdpa = timed(lambda: grouped_attention(q[:, :, None], k, v, mask))
    read = 2 * batch * KVH * filled * D * 2
    print(f"{batch:5d} {slots:6d} {filled:6d} {t_tri:9.1f} {read / t_tri / 1e3:6.0f} {t_sdpa:8.1f} {err:8.1e}")
