"""Where does a compiled decode step spend its time? Kernel totals vs wall time (GPU only).

Usage: PYTHONPATH=src python3 scripts/profile_decode.py [shape] [--no-tuning]
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tachylm.bench import SHAPES
from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.generate import Generation
from tachylm.sampling import SamplingParams
from tachylm.steps import Steps

shape = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "llama-3.1-8b"
config = SHAPES[shape]
model = build_random_model(config, device="cuda", dtype=torch.bfloat16, max_seq_len=256)
cache = KVCache(config.n_layers, 1, 256, config.n_kv_heads, config.head_dim, device="cuda",
                dtype=torch.bfloat16)
steps = Steps(model, cache, compile_decode=True)
params = SamplingParams(temperature=0.8, top_k=200)
start = time.time()
list(Generation(steps, [1, 2, 3, 4, 5], 3, params))
print(f"compile {time.time() - start:.1f} s", flush=True)
gen = Generation(steps, [1, 2, 3, 4, 5], 200, params)
list(gen)
print(f"decode {gen.stats.decode_tokens_per_s:.1f} tokens/s", flush=True)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    gen = Generation(steps, [1, 2, 3, 4, 5], 51, params)
    list(gen)
    torch.cuda.synchronize()
events = prof.key_averages()
total = sum(e.device_time_total for e in events)
print(f"kernel time per token {total / 50 / 1000:.3f} ms; wall per token "
      f"{1000 / gen.stats.decode_tokens_per_s:.3f} ms")
for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
    print(f"{e.device_time_total / 50:9.1f} us/token  {e.count // 50:4d}x  {e.key[:110]}")
