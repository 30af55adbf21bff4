"""Sampling: filters by mask, greedy rows, penalties, seeds, parameter validation, the plan's
ranking switch and top-k selection on 16-bit logits."""

import dataclasses

import pytest
import torch

import tachylm.sampling as sampling
from tachylm.sampling import SamplingParams, plan_for, sample, to_tensors


def _draw(logits, params, n=4000, seen=None):
    plan = plan_for([params], logits.shape[-1])
    settings = to_tensors([params], "cpu")
    batch = logits.expand(n, -1)
    settings = type(settings)(*(t.expand(n) for t in settings))
    seen = None if seen is None else seen.expand(n, -1)
    return sample(batch, settings, plan, seen)


LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))


def test_greedy_is_argmax():
    tokens = _draw(LOGITS, SamplingParams.greedy_params(), n=10)
    assert tokens.tolist() == [0] * 10


def test_temperature_one_follows_the_distribution():
    torch.manual_seed(0)
    tokens = _draw(LOGITS, SamplingParams(temperature=1.0, top_p=1.0), n=20000)
    freq = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    assert torch.allclose(freq, LOGITS.exp()[0], atol=0.015)


def test_top_k_keeps_only_k_tokens():
    torch.manual_seed(0)
    tokens = _draw(LOGITS, SamplingParams(temperature=1.0, top_k=2, top_p=1.0))
    assert set(tokens.tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    torch.manual_seed(0)
    # 0.4 + 0.3 = 0.7 < 0.75, so the third token (0.2) is needed too; the rest are dropped.
    tokens = _draw(LOGITS, SamplingParams(temperature=1.0, top_p=0.75))
    assert set(tokens.tolist()) == {0, 1, 2}


def test_min_p_drops_unlikely_tokens():
    torch.manual_seed(0)
    # min_p 0.45 of the top probability 0.4 = 0.18: tokens 0, 1, 2 (0.2) stay.
    tokens = _draw(LOGITS, SamplingParams(temperature=1.0, top_p=1.0, min_p=0.45))
    assert set(tokens.tolist()) == {0, 1, 2}


def test_low_temperature_sharpens():
    torch.manual_seed(0)
    tokens = _draw(LOGITS, SamplingParams(temperature=0.05, top_p=1.0), n=2000)
    assert (tokens == 0).float().mean() > 0.99


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, True]])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert _draw(logits, params, n=1, seen=seen).tolist() == [1]  # 2.0 / 1.5 < 1.9
    plain = SamplingParams(temperature=0.0)
    assert _draw(logits, plain, n=1, seen=seen).tolist() == [0]


def test_mixed_rows_greedy_and_sampled():
    params = [SamplingParams.greedy_params(), SamplingParams(temperature=1.0, top_k=1)]
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    out = sample(logits, to_tensors(params, "cpu"), plan_for(params, 3))
    assert out.tolist() == [1, 0]


def test_seed_reproduces():
    params = SamplingParams(temperature=1.0, top_p=1.0)
    torch.manual_seed(7)
    a = _draw(LOGITS, params, n=50)
    torch.manual_seed(7)
    b = _draw(LOGITS, params, n=50)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"),
    (dict(top_k=-3), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=1.0), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_bad_parameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=4, top_p=1.0),
    SamplingParams(temperature=0.7, top_k=6, top_p=0.6),
    SamplingParams(temperature=1.0, top_k=5, top_p=1.0, min_p=0.3),
])
def test_pairwise_ranks_keep_the_same_tokens_as_sorting(params, monkeypatch):
    """The unsorted top-k ranked pairwise (few candidates) filters like the sorted one."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 50, generator=gen)
    logits[0, 10] = logits[0, 11] = logits.max() + 0.5  # a tie at the top
    kept = []
    for limit in (512, 0):  # pairwise, then sorted
        monkeypatch.setattr(sampling, "PAIRWISE_RANKS", limit)
        torch.manual_seed(0)
        kept.append(set(_draw(logits, params, n=6000).tolist()))
    assert kept[0] == kept[1]
    assert len(kept[0]) <= params.top_k


def test_mixed_greedy_rows_take_the_top_candidate():
    params = [SamplingParams.greedy_params(), SamplingParams(temperature=1.0, top_k=2, top_p=1.0)]
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 1.0, -2.0]])
    plan = plan_for(params, 4)
    assert plan.candidates == 2
    out = sample(logits, to_tensors(params, "cpu"), plan)
    assert out[0].item() == 1 and out[1].item() in (0, 2)


def test_plan_ranks_only_when_a_row_filters_within_the_candidates():
    vocab = 1000
    bench = SamplingParams(temperature=0.8, top_k=200, top_p=1.0)
    assert plan_for([bench], vocab) == sampling.SamplingPlan(candidates=200, penalize=False, rank=False)
    assert plan_for([bench, SamplingParams.greedy_params()], vocab).rank is False
    assert plan_for([SamplingParams(temperature=0.8, top_k=2000, top_p=1.0)], vocab).rank is False
    assert plan_for([bench, SamplingParams(temperature=0.8, top_k=100, top_p=1.0)], vocab).rank
    assert plan_for([SamplingParams(temperature=0.8, top_k=200, top_p=0.9)], vocab).rank
    assert plan_for([SamplingParams(temperature=0.8, top_k=200, top_p=1.0, min_p=0.1)], vocab).rank
    assert plan_for([SamplingParams(temperature=0.8, top_p=0.9)], vocab).rank
    assert plan_for([SamplingParams.greedy_params()], vocab).candidates == 0


def test_all_greedy_plan_is_an_argmax_that_draws_nothing():
    vocab = 1000
    greedy = SamplingParams.greedy_params()
    assert plan_for([greedy, greedy], vocab).sampled is False
    assert plan_for([greedy, SamplingParams(temperature=0.5)], vocab).sampled is True
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(3))
    params = [greedy, SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    seen = torch.zeros(2, vocab, dtype=torch.bool)
    top = logits.argmax(-1)
    seen[1, top[1]] = True  # the penalty moves row 1 off its top token
    penalized = logits.clone()
    penalized[1, top[1]] = torch.where(logits[1, top[1]] > 0, logits[1, top[1]] / 2,
                                       logits[1, top[1]] * 2)
    state = torch.random.get_rng_state()
    out = sample(logits, to_tensors(params, "cpu"), plan_for(params, vocab), seen)
    assert torch.equal(torch.random.get_rng_state(), state)  # no random draw
    assert torch.equal(out, penalized.argmax(-1))


def test_unranked_plan_draws_the_same_tokens_as_ranking():
    params = SamplingParams(temperature=0.8, top_k=6, top_p=1.0)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    plan = plan_for([params], 50)
    assert not plan.rank
    settings = to_tensors([params], "cpu")
    settings = type(settings)(*(t.expand(500) for t in settings))
    tokens = []
    for rank in (False, True):
        torch.manual_seed(0)
        tokens.append(sample(logits.expand(500, -1), settings, dataclasses.replace(plan, rank=rank)))
    assert torch.equal(tokens[0], tokens[1])




@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_k=20, top_p=1.0),  # unranked
    SamplingParams(temperature=0.7, top_k=30, top_p=0.9),  # ranked pairwise
    SamplingParams(temperature=0.7, top_k=600, top_p=0.9),  # sorted
])
def test_sixteen_bit_logits_select_the_same_candidates(dtype, params):
    """Logits in the model's 16-bit dtype pick the candidates on the 16-bit values: the same
    tokens as the float32 copy of the same values, draw for draw (16-bit values tie often; the
    CPU's topk breaks ties alike for both dtypes)."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 3000, generator=gen) * 4).to(dtype)
    settings = to_tensors([params] * 4, "cpu")
    plan = plan_for([params], 3000)
    draws = []
    for x in (logits, logits.float()):
        torch.manual_seed(11)
        draws.append(torch.stack([sample(x, settings, plan) for _ in range(50)]))
    assert torch.equal(draws[0], draws[1])
