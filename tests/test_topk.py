"""Top-k sampling kernels: the reference's candidate set and draw on the CPU, the Triton kernels
(interpreted) against the reference given the same noise, and on a GPU under CUDA graphs."""

import json
import sys

import pytest
import torch

from tachylm.kernels.quant_matmul import HAS_TRITON
from tachylm.kernels.topk import (candidates_ref, gumbel_ref, keys_ref, topk_sample,
                                  topk_sample_applies, topk_sample_ref)
from tachylm.sampling import SamplingParams, seed_draws
from triton_interpreter import outcome, patch_interpreter, run_child


def test_keys_order_like_the_floats():
    values = torch.tensor([-float("inf"), -3.5, -1.0, -0.0, 0.0, 1e-3, 2.0, 65504.0, float("inf")])
    for dtype in (torch.bfloat16, torch.float16):
        keys = keys_ref(values.to(dtype))
        assert torch.all(keys[1:] > keys[:-1]), dtype  # -0 just below +0
        assert int(keys.min()) >= 0 and int(keys.max()) <= 0xFFFF


def test_candidates_are_the_logits_at_or_above_the_kth_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0, 2.0]], dtype=torch.bfloat16)
    want = [[False, True, True, True, True, False, True]]  # 3.0 and every 2.0, as transformers
    assert candidates_ref(logits, 3).tolist() == want
    assert candidates_ref(logits, 5).tolist() == want
    assert candidates_ref(logits, 7).all()
    assert candidates_ref(logits, 1).tolist() == [[i == 1 for i in range(7)]]


def test_reference_draw_keeps_to_the_candidates_and_greedy_rows_take_the_first_maximum():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 500, generator=gen) * 2).round().to(torch.bfloat16)  # many ties
    temperature = torch.tensor([1.0, 0.0, 0.7, 0.0, 2.0, 1e-6])
    for seed in range(5):
        tokens = topk_sample_ref(logits, temperature, 20, gumbel_ref(seed, 6, 500))
        allowed = candidates_ref(logits, 20)
        assert allowed.gather(-1, tokens[:, None]).all()
        first_max = logits.float().argmax(dim=-1)
        assert tokens[1] == first_max[1] and tokens[3] == first_max[3]


def test_reference_draw_follows_the_softmax_over_the_candidates():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -9.0, 3.0]], dtype=torch.bfloat16).expand(4000, -1)
    temperature = torch.full((4000,), 0.5)
    tokens = topk_sample_ref(logits, temperature, 4, gumbel_ref(1, 4000, 6))
    counts = torch.bincount(tokens, minlength=6).double() / 4000
    probs = torch.zeros(6, dtype=torch.float64)
    keep = [5, 0, 1, 2]
    probs[keep] = torch.softmax(logits[0, keep].double() / 0.5, dim=-1)
    assert counts[3] == 0 and counts[4] == 0
    assert (counts - probs).abs().max() < 0.03


def test_kernels_refuse_bad_input():
    logits = torch.zeros(2, 100, dtype=torch.bfloat16)
    temperature = torch.ones(2)
    with pytest.raises(ValueError, match="k must be in 1..100"):
        topk_sample(logits, temperature, 0)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        topk_sample(logits.float(), temperature, 5)
    with pytest.raises(ValueError, match="temperature must be"):
        topk_sample(logits, torch.ones(3), 5)
    assert not topk_sample_applies(logits)  # on the CPU sample() keeps the PyTorch path


@pytest.mark.parametrize("params, dtype, fused", [
    (SamplingParams(temperature=0.8, top_k=20, top_p=1.0), torch.bfloat16, True),
    (SamplingParams(temperature=0.8, top_k=20, top_p=1.0), torch.float16, True),
    (SamplingParams(temperature=0.8, top_k=20, top_p=1.0), torch.float32, False),
    (SamplingParams(temperature=0.8, top_k=20, top_p=0.9), torch.bfloat16, False),  # ranks
    (SamplingParams(temperature=0.8, top_k=0, top_p=1.0), torch.bfloat16, False),  # no top-k
    (SamplingParams(temperature=0.8, top_k=20, top_p=1.0, repetition_penalty=1.2), torch.bfloat16,
     False),
    (SamplingParams.greedy_params(), torch.bfloat16, False),  # an argmax
])
def test_sample_takes_the_kernels_for_top_k_alone_on_16_bit_logits(params, dtype, fused,
                                                                  monkeypatch):
    import tachylm.sampling as sampling

    calls = []

    def kernels(logits, temperature, k, feed=None):
        calls.append(k)
        return logits.float().argmax(dim=-1)

    monkeypatch.setattr(sampling, "topk_sample_applies", lambda logits: True)  # as on CUDA
    monkeypatch.setattr(sampling, "topk_sample", kernels)
    logits = torch.randn(2, 50).to(dtype)
    plan = sampling.plan_for([params] * 2, 50)
    seen = torch.zeros(2, 50, dtype=torch.bool)
    tokens = sampling.sample(logits, sampling.to_tensors([params] * 2, "cpu"), plan, seen)
    assert tokens.shape == (2,)
    assert calls == ([20] if fused else [])


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=20, top_p=1.0),
                                    SamplingParams(temperature=0.8, top_k=20, top_p=0.9),
                                    SamplingParams.greedy_params()])
def test_sample_feeds_the_next_step_on_the_torch_path(params):
    import tachylm.sampling as sampling

    logits = torch.randn(2, 50).to(torch.bfloat16)
    plan = sampling.plan_for([params] * 2, 50)
    feed = (torch.zeros(2, 1, dtype=torch.long), torch.tensor([[4], [9]]))
    torch.manual_seed(0)
    tokens = sampling.sample(logits, sampling.to_tensors([params] * 2, "cpu"), plan, feed=feed)
    assert feed[0][:, 0].tolist() == tokens.tolist()
    assert feed[1].tolist() == [[5], [10]]


def test_kernel_feed_must_be_the_rows_long_buffers():
    logits = torch.zeros(2, 100, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"feed's token buffer must be \[2, 1\] int64"):
        topk_sample(logits, torch.ones(2), 5, (torch.zeros(2), torch.zeros(2, 1, dtype=torch.long)))


# ----------------------------------------------------------------------------------------------
# The kernels under the interpreter (a child process: the switch precedes importing triton)
# ----------------------------------------------------------------------------------------------

def case_logits(name: str, batch: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if name.startswith("flat"):  # every logit equal but a few: the k-th place is a long tie
        logits = torch.zeros(batch, vocab)
        logits[:, 7] = 2.0
        logits[:, vocab - 3] = 1.0
        return logits.to(dtype)
    logits = torch.randn(batch, vocab, generator=gen) * 3
    if name.startswith("coarse"):  # few distinct values: ties straddle chunks
        logits = logits.round()
    return logits.to(dtype)


# name -> (batch, vocab, k, dtype); temperatures cycle through TEMPERATURES
CASES = {
    "bf16-five-chunks": (3, 5000, 200, torch.bfloat16),
    "fp16-five-chunks": (3, 5000, 200, torch.float16),
    "coarse-bf16": (4, 9000, 1500, torch.bfloat16),
    "flat-ties-in-every-chunk": (2, 9000, 5000, torch.bfloat16),
    "flat-k-three": (2, 3000, 3, torch.bfloat16),
    "k-one": (3, 3000, 1, torch.bfloat16),
    "k-whole-vocabulary-one-chunk": (3, 700, 700, torch.bfloat16),
    "one-chunk": (2, 700, 50, torch.float16),
    "one-row": (1, 5000, 200, torch.bfloat16),  # a batch of one: the seed's own branch
}
TEMPERATURES = [1.0, 0.0, 0.6, 2.5]
SEEDS = [3, 2**40 + 11]


def _interpreter_child():
    patch_interpreter()
    import triton
    import triton.language as tl

    from tachylm.kernels.topk import histograms, seed_sampling, topk_sample_triton

    @triton.jit
    def noise_kernel(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.rand(tl.load(seed_ptr), offs), mask=offs < n)

    def draws(name, batch, vocab, k, dtype):
        logits = case_logits(name, batch, vocab, dtype)
        temperature = torch.tensor([TEMPERATURES[i % 4] for i in range(batch)])
        result = []
        for seed in SEEDS:
            seed_t = torch.tensor([seed], dtype=torch.int64)
            u = torch.empty(batch * vocab)
            noise_kernel[(-(-u.numel() // 1024),)](seed_t, u, u.numel(), BLOCK=1024)
            noise = -torch.log(-torch.log(u.view(batch, vocab)))
            want = topk_sample_ref(logits, temperature, k, noise)
            feed = (torch.full((batch, 1), -1), torch.arange(batch)[:, None] * 10)
            tokens = topk_sample_triton(logits, temperature, k, seed_t, feed)
            counts = histograms(logits.device, batch)
            result.append({"got": tokens.tolist(), "want": want.tolist(), "dtype": str(tokens.dtype),
                           "seed_after": int(seed_t), "fed": feed[0][:, 0].tolist(),
                           "positions": feed[1][:, 0].tolist(),
                           "counts_left": int(counts.abs().sum())})
        return result

    def device_seed():
        """The device's own seed: each call draws afresh, seed_sampling reproduces."""
        logits = case_logits("bf16-five-chunks", 3, 5000, torch.bfloat16)
        temperature = torch.ones(3)
        runs = []
        for _ in range(2):
            seed_sampling("cpu", 7)
            runs.append([topk_sample_triton(logits, temperature, 200).tolist() for _ in range(3)])
        return runs

    results = {name: outcome(draws, name, *case) for name, case in CASES.items()}
    results["device-seed"] = outcome(device_seed)
    print(json.dumps(results))

@pytest.fixture(scope="module")
def interpreted():
    return run_child(__file__)


def test_kernels_interpreted_draw_differently_under_another_seed(interpreted):
    assert any(interpreted[name][0]["got"] != interpreted[name][1]["got"] for name in CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_interpreted_draw_what_the_reference_draws(interpreted, name):
    """Given the kernels' own noise, the reference picks the same token in every row; the rows
    hold greedy and sampled temperatures, and runs of equal logits at the k-th place. (The
    reference's law is tested above, the kernels' on a GPU below: enough rows for it take
    minutes under the interpreter.)"""
    result = interpreted[name]
    assert "error" not in result, result
    batch, vocab, k, dtype = CASES[name]
    logits = case_logits(name, batch, vocab, dtype)
    allowed = candidates_ref(logits, k)
    for draw in result:
        assert draw["dtype"] == "torch.int64"
        assert draw["got"] == draw["want"]
        tokens = torch.tensor(draw["got"])
        assert allowed.gather(-1, tokens[:, None]).all()
        greedy = [i for i in range(batch) if TEMPERATURES[i % 4] == 0]
        assert all(tokens[i] == logits[i].float().argmax() for i in greedy)


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_interpreted_feed_the_next_step_and_leave_their_state_ready(interpreted, name):
    """Each call writes its tokens into the feed's token buffer and advances its positions,
    leaves the histograms at zero for the next call and advances the seed by one."""
    result = interpreted[name]
    assert "error" not in result, result
    batch = CASES[name][0]
    for seed, draw in zip(SEEDS, result):
        assert draw["fed"] == draw["got"]
        assert draw["positions"] == [10 * i + 1 for i in range(batch)]
        assert draw["counts_left"] == 0
        assert draw["seed_after"] == seed + 1


def test_kernels_interpreted_device_seed_draws_afresh_and_reseeding_reproduces(interpreted):
    runs = interpreted["device-seed"]
    assert "error" not in runs, runs
    first, second = runs
    assert first == second  # seed_sampling(7) again: the same draws
    assert len({tuple(r) for r in first}) > 1  # each call advanced the seed


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                          reason="needs a CUDA GPU and triton")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_draws_stay_in_the_top_k_and_follow_the_softmax(dtype):
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(16, 128256, generator=gen) * 3).round().to(dtype)  # ties at the k-th
    temperature = torch.tensor([0.8, 0.0, 1.0, 3.0] * 4)
    allowed = candidates_ref(logits, 200).cuda()
    logits, temperature = logits.cuda(), temperature.cuda()
    first_max = logits.float().argmax(dim=-1)
    for _ in range(20):
        tokens = topk_sample(logits, temperature, 200)
        assert allowed.gather(-1, tokens[:, None]).all()
        assert torch.equal(tokens[1::4], first_max[1::4])
    row = torch.tensor([[2.0, 1.0, 0.5, 0.0, -9.0, 3.0, 0.25]], dtype=dtype, device="cuda")
    tokens = topk_sample(row.expand(20000, -1), torch.full((20000,), 0.5, device="cuda"), 4)
    counts = torch.bincount(tokens.cpu(), minlength=7).double() / 20000
    keep = [5, 0, 1, 2]
    probs = torch.zeros(7, dtype=torch.float64)
    probs[keep] = torch.softmax(row[0, keep].double().cpu() / 0.5, dim=-1)
    assert (counts - probs).abs().max() < 0.015, (counts, probs)


@cuda
def test_cuda_graph_replays_draw_afresh_and_a_seed_reproduces():
    logits = torch.randn(4, 128256, device="cuda").to(torch.bfloat16)
    temperature = torch.ones(4, device="cuda")
    step = torch.compile(lambda x, t: topk_sample(x, t, 200), fullgraph=True,
                         mode="reduce-overhead")

    def run():
        seed_draws("cuda", 123)  # torch.manual_seed, then the kernels' seed from it
        out = []
        for _ in range(6):
            torch.compiler.cudagraph_mark_step_begin()
            out.append(step(logits, temperature).clone())
        return torch.stack(out)

    first, second = run(), run()
    assert torch.equal(first, second)  # the same seed, the same draws
    assert len({tuple(r.tolist()) for r in first[2:]}) > 1  # replays draw new noise
    allowed = candidates_ref(logits.cpu(), 200).cuda()
    assert allowed.gather(-1, first.T).all()


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpreter_child()
