"""Generation loop: greedy equals argmax of full forwards, stops, budgets, continuation."""

import pytest
import torch

from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.config import ModelConfig
from tachylm.generate import Generation
from tachylm.sampling import SamplingParams
from tachylm.steps import Steps, padded_length

CONFIG = ModelConfig(family="llama", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, ffn_dim=64, max_seq_len=128)
GREEDY = SamplingParams.greedy_params()


@pytest.fixture(scope="module")
def model():
    # A larger std than the default makes logits spread out, so greedy choices are clear-cut.
    return build_random_model(CONFIG, dtype=torch.float32, seed=0, std=0.3)


def _steps(model, max_seq_len=64):
    cache = KVCache(CONFIG.n_layers, 1, max_seq_len, CONFIG.n_kv_heads, CONFIG.head_dim)
    return Steps(model, cache)


def _reference_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("sync_every", [1, 3, 8])
def test_greedy_matches_full_forward(model, sync_every):
    prompt = [5, 17, 3, 42, 8]
    out = list(Generation(_steps(model), prompt, 20, GREEDY, sync_every=sync_every))
    assert out == _reference_greedy(model, prompt, 20)


def test_stop_token_ends_generation(model):
    prompt = [1, 2, 3]
    expected = _reference_greedy(model, prompt, 12)
    stop = expected[6]
    first = expected.index(stop)
    gen = Generation(_steps(model), prompt, 12, GREEDY, stop_ids={stop})
    assert list(gen) == expected[:first + 1]
    assert gen.stats.stop_reason == "stop_token"
    assert gen.stats.new_tokens == first + 1


def test_budget_and_context_full(model):
    gen = Generation(_steps(model), [1, 2, 3], 7, GREEDY)
    assert len(list(gen)) == 7 and gen.stats.stop_reason == "max_new_tokens"
    # 16-slot cache, 10-token prompt: room for 6 tokens only
    gen = Generation(_steps(model, max_seq_len=16), list(range(10)), 50, GREEDY)
    assert len(list(gen)) == 6 and gen.stats.stop_reason == "context_full"
    with pytest.raises(ValueError, match="context is full"):
        list(Generation(_steps(model, max_seq_len=16), list(range(16)), 5, GREEDY))


def test_continuation_from_cache_equals_one_pass(model):
    """A second turn prefilled after the first (history kept in the cache) sees the same context."""
    steps = _steps(model)
    first = Generation(steps, [4, 5, 6], 5, GREEDY)
    out1 = list(first)
    cached = [4, 5, 6] + out1[:-1]
    assert first.stats.end_pos == len(cached)
    follow = [out1[-1], 9, 10]
    out2 = list(Generation(steps, follow, 6, GREEDY, start_pos=len(cached)))
    assert out2 == _reference_greedy(model, cached + follow, 6)


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(temperature=1.0, top_k=20, seed=123)
    a = list(Generation(_steps(model), [1, 2], 15, params))
    b = list(Generation(_steps(model), [1, 2], 15, params))
    assert a == b


def test_prefill_padding_stays_in_bounds():
    assert padded_length(5, 64) == 16
    assert padded_length(16, 64) == 16
    assert padded_length(17, 20) == 20


def test_bad_requests(model):
    with pytest.raises(ValueError, match="empty"):
        Generation(_steps(model), [], 5, GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Generation(_steps(model), [1], 0, GREEDY)


def test_decode_with_a_penalty_needs_seen(model):
    from tachylm.sampling import plan_for, to_tensors

    params = SamplingParams(temperature=1.0, repetition_penalty=1.2)
    plan = plan_for([params], CONFIG.vocab_size)
    with pytest.raises(ValueError, match="seen"):
        _steps(model).decode(torch.tensor([[1]]), torch.tensor([[0]]), to_tensors([params], "cpu"), plan)


def test_fresh_prefill_equals_the_masked_one(model):
    """A prompt at position 0 (`fresh`: causal attention over its own slots) leaves the same
    logits and cache as the position-masked prefill; a kv_limit other than its length is
    refused."""
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    results = []
    for fresh in (True, False):
        cache = KVCache(CONFIG.n_layers, 2, 32, CONFIG.n_kv_heads, CONFIG.head_dim)
        with torch.no_grad():
            logits = model(tokens, cache=cache, kv_limit=11, fresh=fresh)
        results.append([logits, *cache.k, *cache.v])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kv_limit must be 11"):
        model(tokens, cache=cache, kv_limit=12, fresh=True)
