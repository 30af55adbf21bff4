"""The CUDA path (skipped without a GPU; run on the GPU machine and recorded in BENCHMARKS.md)."""

import pytest
import torch

from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.config import ModelConfig
from tachylm.generate import Generation
from tachylm.sampling import SamplingParams
from tachylm.steps import Steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = ModelConfig(family="llama", vocab_size=1000, dim=256, n_layers=4, n_heads=8, n_kv_heads=2,
                     head_dim=32, ffn_dim=512, max_seq_len=512, qkv_bias=True, qk_norm=True)
GREEDY = SamplingParams.greedy_params()


def _steps(model, device, **kwargs):
    cache = KVCache(CONFIG.n_layers, 1, 256, CONFIG.n_kv_heads, CONFIG.head_dim, device=device,
                    dtype=next(model.parameters()).dtype)
    return Steps(model, cache, **kwargs)


def test_cuda_logits_match_cpu_in_float32():
    cpu = build_random_model(CONFIG, device="cpu", dtype=torch.float32, seed=0, std=0.1)
    gpu = build_random_model(CONFIG, device="cuda", dtype=torch.float32, seed=0, std=0.1)
    gpu.load_state_dict(cpu.state_dict())
    tokens = torch.randint(0, 1000, (2, 50))
    with torch.no_grad():
        a = cpu(tokens)
        b = gpu(tokens.cuda()).cpu()
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()


def test_cuda_graph_decode_equals_eager_and_never_recompiles():
    torch._dynamo.reset()
    model = build_random_model(CONFIG, device="cuda", dtype=torch.bfloat16, seed=0, std=0.1)
    prompt = list(range(1, 30))
    eager = list(Generation(_steps(model, "cuda"), prompt, 40, GREEDY))
    steps = _steps(model, "cuda", compile_decode=True, compile_prefill=True)
    compiled = list(Generation(steps, prompt, 40, GREEDY))
    # bf16 reductions differ slightly between kernels: demand agreement on a long prefix.
    agree = next((i for i, (a, b) in enumerate(zip(eager, compiled)) if a != b), len(eager))
    assert agree >= 20, (eager, compiled)
    from torch._dynamo.utils import counters
    before = dict(counters["stats"])
    sampled = SamplingParams(temperature=0.8, top_k=50, seed=1)
    for length, new in [(3, 5), (17, 9), (64, 3), (100, 30)]:
        list(Generation(steps, [5] * length, new, sampled))
    list(Generation(steps, [5] * 7, 5, sampled))  # warm (sampled plan compiled above)
    after_warm = dict(counters["stats"])
    for length, new in [(11, 4), (45, 12), (90, 8)]:
        list(Generation(steps, [9] * length, new, sampled))
    assert dict(counters["stats"]).get("unique_graphs") == after_warm.get("unique_graphs"), (before, after_warm)
