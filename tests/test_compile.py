"""Compiled steps: equal to eager, and no recompilation across prompt lengths and budgets."""

import pytest
import torch

from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.config import ModelConfig
from tachylm.generate import Generation
from tachylm.sampling import SamplingParams
from tachylm.steps import Steps

CONFIG = ModelConfig(family="llama", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, ffn_dim=64, max_seq_len=256)


@pytest.fixture(scope="module")
def model():
    return build_random_model(CONFIG, dtype=torch.float32, seed=0, std=0.3)


def _steps(model, **kwargs):
    cache = KVCache(CONFIG.n_layers, 1, 128, CONFIG.n_kv_heads, CONFIG.head_dim)
    return Steps(model, cache, **kwargs)


def test_compiled_equals_eager_with_inductor(model):
    torch._dynamo.reset()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    params = SamplingParams.greedy_params()
    eager = list(Generation(_steps(model), prompt, 12, params))
    compiled_steps = _steps(model, compile_decode=True, compile_prefill=True)
    compiled = list(Generation(compiled_steps, prompt, 12, params))
    assert compiled == eager
    # Logits too, not only the argmax.
    eager_steps = _steps(model)
    a = eager_steps.prefill(torch.tensor([prompt]), 0)
    b = compiled_steps.prefill(torch.tensor([prompt]), 0)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_no_recompilation_after_warm_up(model):
    torch._dynamo.reset()
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(len(example_inputs))
        return graph_module.forward

    steps = _steps(model, compile_decode=True, compile_prefill=True, backend=counting_backend)
    sampled = SamplingParams(temperature=0.8, top_k=20, seed=0)
    # Warm-up: two prompt lengths, so prefill settles on a dynamic length.
    for length in (5, 21):
        list(Generation(steps, list(range(1, length + 1)), 4, sampled))
    warm = len(compiles)
    for length, new_tokens in [(3, 7), (17, 2), (40, 11), (33, 5), (64, 9), (1, 3), (90, 20)]:
        list(Generation(steps, [7] * length, new_tokens, sampled))
    assert len(compiles) == warm, f"recompiled {len(compiles) - warm} times after warm-up"


def test_custom_ops_are_registered_with_inductor_up_front():
    # Inductor (torch <= 2.11) stringifies an unregistered op's arguments at its first call in a
    # graph, exponentially in the graph's depth; Steps registers every tachylm op before compiling.
    from torch._inductor.lowering import lowerings

    from tachylm.kernels import custom_ops
    from tachylm.steps import register_inductor_fallbacks

    register_inductor_fallbacks()
    assert all(op in lowerings for op in custom_ops())
    assert register_inductor_fallbacks() == []  # once is enough
