"""Experiment: compile time and speed of decode/prefill with and without coordinate-descent tuning."""
import time

import torch

from tachylm.bench import SHAPES
from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.generate import Generation
from tachylm.sampling import SamplingParams
from tachylm.steps import Steps

c = SHAPES["llama-3.1-8b"]
m = build_random_model(c, device="cuda", dtype=torch.bfloat16, max_seq_len=4352)
cache = KVCache(c.n_layers, 1, 256, c.n_kv_heads, c.head_dim, device="cuda", dtype=torch.bfloat16)
p = SamplingParams(temperature=0.8, top_k=200)
for cdt in (False, True):
    torch._dynamo.reset()
    Steps._options = lambda self, cudagraphs, cdt=cdt: {"triton.cudagraphs": cudagraphs, "coordinate_descent_tuning": cdt}
    s = Steps(m, cache, compile_decode=True)
    t = time.time(); list(Generation(s, [1, 2, 3, 4, 5], 3, p)); print("cdt", cdt, "decode compile", time.time() - t, flush=True)
    for i in range(3):
        g = Generation(s, [1, 2, 3, 4, 5], 200, p); list(g); print("  tok/s", g.stats.decode_tokens_per_s, flush=True)
Steps._options = lambda self, cudagraphs: {"triton.cudagraphs": cudagraphs, "coordinate_descent_tuning": False}
cache2 = KVCache(c.n_layers, 1, 4352, c.n_kv_heads, c.head_dim, device="cuda", dtype=torch.bfloat16)


def timed(steps, L):
    x = torch.ones(1, L, dtype=torch.long, device="cuda")
    steps.prefill(x, 0); torch.cuda.synchronize(); t = time.time()
    for _ in range(3):
        steps.prefill(x, 0)
    torch.cuda.synchronize()
    return (time.time() - t) / 3 * 1000


s2 = Steps(m, cache2, compile_prefill=True)
t = time.time(); s2.prefill(torch.ones(1, 1024, dtype=torch.long, device="cuda"), 0); torch.cuda.synchronize()
print("prefill compile", time.time() - t, flush=True)
for L in (1024, 4096, 1000):
    print("  prefill", L, timed(s2, L), "ms", flush=True)
e = Steps(m, cache2)
for L in (1024, 4096):
    print("  eager prefill", L, timed(e, L), "ms", flush=True)
