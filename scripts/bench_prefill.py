"""Time to the first token on a GPU: eager prefill against the captured prefill graphs.

Usage: PYTHONPATH=src python3 scripts/bench_prefill.py [shape]   (default llama-3.1-8b)
Random bf16 weights; each (start position, prompt length) is a prompt after `start` tokens of
history, the same in both caches (a chat's next turn when start > 0). Time: prefill, the greedy
token, and the token on the host, median of 10 after warm-up; the graph's first call (its capture)
is reported apart. Each row checks the graph's logits against eager prefill on the same cache
state.
"""
import statistics
import sys
import time

import torch

from tachylm.bench import SHAPES
from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.kernels import use_fast_linears
from tachylm.steps import Steps

config = SHAPES[sys.argv[1] if len(sys.argv) > 1 else "llama-3.1-8b"]
model = build_random_model(config, device="cuda", dtype=torch.bfloat16, max_seq_len=2048)
use_fast_linears(model)


def steps(graphs: bool) -> Steps:
    cache = KVCache(config.n_layers, 1, 2048, config.n_kv_heads, config.head_dim, device="cuda",
                    dtype=torch.bfloat16)
    return Steps(model, cache, prefill_graphs=graphs)


def ms(step: Steps, tokens, start) -> float:
    begin = time.perf_counter()
    step.prefill(tokens, start).argmax(-1).cpu()
    return (time.perf_counter() - begin) * 1000


eager, graphs = steps(False), steps(True)
print(f"{'start':>5} {'length':>6} {'eager ms':>9} {'graph ms':>9} {'capture ms':>10} {'diff':>8}")
for start, length in [(0, 5), (0, 100), (300, 20), (1000, 60), (1500, 250)]:
    if start:  # the same history in both caches (eagerly: a graph would pad past it)
        history = torch.randint(0, config.vocab_size, (1, start), device="cuda")
        with torch.inference_mode():
            for step in (eager, graphs):
                step.model(history, torch.arange(start, device="cuda")[None], step.cache,
                           torch.tensor([start - 1], device="cuda"))
    tokens = torch.randint(0, config.vocab_size, (1, length), device="cuda")
    capture = ms(graphs, tokens, start)
    want, got = eager.prefill(tokens, start), graphs.prefill(tokens, start)
    diff = ((want - got).abs().max() / want.abs().max()).item()
    assert diff < 0.06, diff  # the tolerance `tachylm bench --check-tol` uses for this shape
    t_eager = statistics.median(ms(eager, tokens, start) for _ in range(10))
    t_graph = statistics.median(ms(graphs, tokens, start) for _ in range(10))
    print(f"{start:5d} {length:6d} {t_eager:9.1f} {t_graph:9.1f} {capture:10.1f} {diff:8.1e}")
