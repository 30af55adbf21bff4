"""Compiled steps: equal to eager, and no recompilation across prompt lengths and budgets."""

import pytest
import torch

from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.config import ModelConfig
from tachylm.generate import Generation
from tachylm.sampling import SamplingParams, plan_for, sample, to_tensors
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


@pytest.mark.parametrize("params", [
    SamplingParams.greedy_params(),
    SamplingParams(temperature=0.8, top_k=20, top_p=1.0, repetition_penalty=1.3, seed=5),
])
def test_compiled_decode_reads_static_input_buffers(model, params):
    """Compiled decode copies its inputs into buffers it owns (static addresses, so CUDA graphs
    copy nothing) and still draws eager's tokens; what it returns is the caller's to keep."""
    torch._dynamo.reset()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    eager = list(Generation(_steps(model), prompt, 12, params))
    steps = _steps(model, compile_decode=True, backend="aot_eager")
    assert list(Generation(steps, prompt, 12, params)) == eager
    [buffers] = steps._decode_inputs.values()  # one set, made once and refilled every step
    assert len(buffers) == 7 + (params.repetition_penalty != 1)
    assert all(b._dynamo_static_input_type == "unguarded" and b.is_inference() for b in buffers)

    # Logits equal eager's; a second step overwrites the buffers, not the first step's results.
    greedy = SamplingParams.greedy_params()
    plan, settings = plan_for([greedy], CONFIG.vocab_size), to_tensors([greedy], "cpu")
    results = {}
    for name, s in [("eager", _steps(model)), ("compiled", _steps(model, compile_decode=True,
                                                                   backend="aot_eager"))]:
        s.prefill(torch.tensor([prompt]), 0)
        first = s.decode(torch.tensor([[7]]), torch.tensor([[8]]), settings, plan)
        kept = (first[0].clone(), first[1].clone())
        second = s.decode(first[0][:, None], torch.tensor([[9]]), settings, plan, return_logits=False)
        assert second[1] is None
        assert torch.equal(first[0], kept[0]) and torch.equal(first[1], kept[1])
        results[name] = (first[0], first[1], second[0])
    assert torch.equal(results["eager"][0], results["compiled"][0])
    assert torch.allclose(results["eager"][1], results["compiled"][1], atol=1e-5, rtol=1e-5)
    assert torch.equal(results["eager"][2], results["compiled"][2])


def test_a_step_continuing_the_last_copies_nothing_in_and_others_copy_what_changed(model,
                                                                                   monkeypatch):
    """The compiled step leaves the token it drew and the next position in its buffers: a step
    fed that token (as returned) at that int position copies nothing in. A step at another
    position, with another token, with settings changed in place or with the position as a
    tensor copies what changed, into the same buffers, and every step still draws what eager
    draws."""
    torch._dynamo.reset()
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    greedy = SamplingParams.greedy_params()
    plan = plan_for([greedy], CONFIG.vocab_size)
    copied = []
    real_copy, real_fill = torch._foreach_copy_, torch.Tensor.fill_

    def count_copy(dst, src):
        copied.extend(["copy"] * len(dst))
        return real_copy(dst, src)

    def count_fill(tensor, value):
        copied.append("fill")
        return real_fill(tensor, value)

    runs = {}
    for name in ("eager", "compiled"):
        steps = _steps(model, compile_decode=name == "compiled", backend="aot_eager")
        settings = to_tensors([greedy], "cpu")
        token = steps.prefill(prompt, 0).argmax(-1)
        monkeypatch.setattr(torch, "_foreach_copy_", count_copy)
        monkeypatch.setattr(torch.Tensor, "fill_", count_fill)
        out, counts = [], []
        pos = 7  # the prompt's last position
        # continuing, continuing, the same position again, a new token at the next position,
        # continuing, a setting changed in place, the position as a tensor
        for how in ["first", "next", "next", "again", "other", "next", "changed", "tensor"]:
            copied.clear()
            if how == "again":
                pos -= 1
            if how == "other":
                token = (token + 1) % CONFIG.vocab_size
            if how == "changed":
                settings.temperature.fill_(0.0)  # still greedy, but changed in place
                copied.clear()
            pos += 1
            position = torch.tensor([[pos]]) if how == "tensor" else pos
            token, _ = steps.decode(token[:, None], position, settings, plan, return_logits=False)
            out.append(int(token))
            counts.append(list(copied))
        monkeypatch.undo()
        runs[name] = out, counts
        assert len(steps._decode_inputs) == (name == "compiled")  # one set for ints and tensors
    assert runs["compiled"][0] == runs["eager"][0]
    counts = runs["compiled"][1]
    assert counts[0] == ["fill", "copy", "copy", "copy", "copy", "copy", "copy"]  # all of it
    assert counts[1] == counts[2] == counts[5] == []  # continuing: nothing
    assert counts[3] == ["fill"]  # the position only
    assert counts[4] == ["copy"]  # the token only
    assert counts[6] == ["copy"]  # the changed setting only
    assert counts[7] == ["copy"]  # the position, given as a tensor


def test_after_a_failed_step_the_next_copies_its_inputs_again(model):
    """A step that raises may have advanced its buffers: the next step copies everything in."""
    torch._dynamo.reset()
    greedy = SamplingParams.greedy_params()
    plan, settings = plan_for([greedy], CONFIG.vocab_size), to_tensors([greedy], "cpu")
    eager = _steps(model)
    steps = _steps(model, compile_decode=True, backend="aot_eager")
    for s in (eager, steps):
        token = s.prefill(torch.tensor([[3, 1, 4]]), 0).argmax(-1)
        token, _ = s.decode(token[:, None], 3, settings, plan)
    compiled = steps._decode_fn(plan)

    def fails(token, input_pos, *args):
        token.fill_(0)
        input_pos.fill_(50)
        raise RuntimeError("out of memory")

    steps._decode_fns[plan] = fails
    with pytest.raises(RuntimeError, match="out of memory"):
        steps.decode(token[:, None], 4, settings, plan)
    steps._decode_fns[plan] = compiled
    got, _ = steps.decode(token[:, None], 4, settings, plan)
    want, _ = eager.decode(token[:, None], 4, settings, plan)
    assert torch.equal(got, want)


def test_custom_ops_are_registered_with_inductor_up_front():
    # Inductor (torch <= 2.11) stringifies an unregistered op's arguments at its first call in a
    # graph, exponentially in the graph's depth; Steps registers every tachylm op before compiling.
    from torch._inductor.lowering import lowerings

    from tachylm.kernels import custom_ops
    from tachylm.steps import register_inductor_fallbacks

    register_inductor_fallbacks()
    assert all(op in lowerings for op in custom_ops())
    assert register_inductor_fallbacks() == []  # once is enough
    # custom_ops() lists every op the package defines (a missing one hung a 32-layer compile);
    # tachylm.kernels imports every kernel module
    defined = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("tachylm::")}
    assert defined == {op.name() for op in custom_ops()}


def test_prefill_graph_lengths():
    from tachylm.steps import prefill_graph_length

    assert prefill_graph_length(5, 0, 4096) == 16
    assert prefill_graph_length(16, 0, 4096) == 16
    assert prefill_graph_length(17, 0, 4096) == 32
    assert prefill_graph_length(256, 0, 4096) == 256
    assert prefill_graph_length(257, 0, 4096) is None  # long prompts: eager, GPU-bound anyway
    assert prefill_graph_length(5, 10, 4096) == 16  # a chat's next turn
    assert prefill_graph_length(100, 0, 120) is None  # the 128-token graph would not fit the cache
    assert prefill_graph_length(5, 4085, 4096) is None  # nor 16 tokens from position 4085


def test_prefill_graphs_need_a_gpu(model):
    cache = KVCache(model.config.n_layers, 1, 64, model.config.n_kv_heads, model.config.head_dim)
    with pytest.raises(ValueError, match="prefill_graphs needs the cache on a CUDA device"):
        Steps(model, cache, prefill_graphs=True)
    assert not Steps(model, cache, compile_decode=True, backend="eager").prefill_graphs


def test_compiled_decode_of_a_bfloat16_model_samples_like_eager():
    """A 16-bit model hands sampling its logits in that dtype (top-k on the 16-bit values):
    compiled decode traces it and draws what eager sampling draws from the same logits with the
    same random state. The second plan recompiles the step, where torch.compile makes the plan's
    changed integers symbolic.

    The draws are compared step by step on the compiled step's own logits: a whole generation
    compared with eager's would also compare bf16 attention over the whole cache (compiled) with
    attention over its filled part (eager), which round differently and part ways after a few draws
    on some torch versions (2.11), whatever the sampling does."""
    torch._dynamo.reset()
    model = build_random_model(CONFIG, dtype=torch.bfloat16, seed=0, std=0.3)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    for params in (SamplingParams(temperature=0.8, top_k=20, top_p=1.0, seed=7),
                   SamplingParams(temperature=0.8, top_k=30, top_p=0.9, seed=7)):
        settings, plan = to_tensors([params], "cpu"), plan_for([params], CONFIG.vocab_size)
        steps = _steps(model, compile_decode=True, backend="eager")
        token = steps.prefill(prompt, 0).argmax(-1)  # [1]
        draws = set()
        for i in range(10):
            position = torch.tensor([[prompt.shape[1] + i]])
            torch.manual_seed(100 + i)
            token, logits = steps.decode(token[:, None], position, settings, plan)
            torch.manual_seed(100 + i)
            assert torch.equal(token, sample(logits.to(torch.bfloat16), settings, plan)), i
            draws.add(int(token))
        assert len(draws) > 1  # sampled, not a constant pick
