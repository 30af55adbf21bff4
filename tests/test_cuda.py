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
    from torch._dynamo.utils import counters
    counters.clear()
    model = build_random_model(CONFIG, device="cuda", dtype=torch.bfloat16, seed=0, std=0.1)
    prompt = list(range(1, 30))
    eager = list(Generation(_steps(model, "cuda"), prompt, 40, GREEDY))
    steps = _steps(model, "cuda", compile_decode=True, compile_prefill=True)
    compiled = list(Generation(steps, prompt, 40, GREEDY))
    # bf16 reductions differ slightly between kernels: demand agreement on a long prefix.
    agree = next((i for i, (a, b) in enumerate(zip(eager, compiled)) if a != b), len(eager))
    assert agree >= 20, (eager, compiled)
    from torch._dynamo.utils import counters
    # A mutated input that is not at a static address makes Inductor run without CUDA graphs.
    assert counters["inductor"]["cudagraph_skips"] == 0
    before = dict(counters["stats"])
    sampled = SamplingParams(temperature=0.8, top_k=50, seed=1)
    for length, new in [(3, 5), (17, 9), (64, 3), (100, 30)]:
        list(Generation(steps, [5] * length, new, sampled))
    list(Generation(steps, [5] * 7, 5, sampled))  # warm (sampled plan compiled above)
    after_warm = dict(counters["stats"])
    for length, new in [(11, 4), (45, 12), (90, 8)]:
        list(Generation(steps, [9] * length, new, sampled))
    assert dict(counters["stats"]).get("unique_graphs") == after_warm.get("unique_graphs"), (before, after_warm)


def test_prefill_graphs_equal_eager_prefill():
    """Short prompts replay a captured graph per padded length: same logits and cache as eager
    prefill, for a first capture and for later replays of other prompts, from position 0 and
    after earlier turns (whose slots the graph must leave alone)."""
    model = build_random_model(CONFIG, device="cuda", dtype=torch.float32, seed=0, std=0.1)
    eager, graphs = _steps(model, "cuda"), _steps(model, "cuda", prefill_graphs=True)
    gen = torch.Generator().manual_seed(0)

    def same(start, length):
        tokens = torch.randint(0, 1000, (1, length), generator=gen).cuda()
        want, got = eager.prefill(tokens, start), graphs.prefill(tokens, start)
        assert (want - got).abs().max() <= 1e-4 * want.abs().max(), (start, length)
        for a, b in zip(eager.cache.k + eager.cache.v, graphs.cache.k + graphs.cache.v):
            filled = slice(0, start + length)
            assert (a[:, :, filled] - b[:, :, filled]).abs().max() <= 1e-4 * a.abs().max()

    for length in (5, 16, 9, 17, 40, 130):
        same(0, length)
    # a conversation: each turn goes on at the position where the history ends
    for start, length in ((40, 6), (46, 12), (58, 30), (88, 3)):
        same(start, length)
    assert sorted(graphs._captured_prefills) == [(1, 16, False), (1, 16, True), (1, 32, False),
                                              (1, 32, True), (1, 64, True), (1, 256, True)]


def _tiny_checkpoint_folder(folder):
    """A tiny random Llama saved by transformers, with a byte-level BPE tokenizer and a template."""
    import json

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    transformers = pytest.importorskip("transformers")

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}"}))
    config = transformers.LlamaConfig(vocab_size=backend.get_vocab_size(), hidden_size=128,
                                      intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def test_engine_end_to_end_on_cuda_compiled(tmp_path):
    """The path `tachylm generate/chat --device cuda --compile` takes, on a real (tiny) folder."""
    from tachylm.engine import Engine
    from tachylm.kernels.linear import FastLinear

    _tiny_checkpoint_folder(tmp_path)
    eager = Engine.load(str(tmp_path), device="cuda", dtype="bfloat16", max_seq_len=256)
    compiled = Engine.load(str(tmp_path), device="cuda", dtype="bfloat16", max_seq_len=256, compile=True)
    assert isinstance(compiled.model.layers[0].attn.qkv_proj, FastLinear)
    greedy = SamplingParams.greedy_params()
    a = eager.generate("the quick fox", max_new_tokens=24, params=greedy)
    b = compiled.generate("the quick fox", max_new_tokens=24, params=greedy)
    text_a, text_b = a.text(), b.text()
    agree = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                 min(len(a.token_ids), len(b.token_ids)))
    assert agree >= 12, (text_a, text_b)
    assert b.stats.new_tokens >= 1 and b.stats.prefill_s > 0
    session = compiled.chat()
    first = session.send("hello", max_new_tokens=8, params=greedy)
    first.text()
    second = session.send("again", max_new_tokens=8, params=greedy)
    second.text()
    assert second.generation.start_pos > 0  # the first turn stayed in the cache
    quantized = Engine.load(str(tmp_path), device="cuda", dtype="bfloat16", max_seq_len=256,
                            compile=True, quant="int8")
    assert quantized.generate("the lazy dog", max_new_tokens=8, params=greedy).text() is not None


def test_cuda_int4_attention_hands_o_proj_its_input():
    """int4 decode with each Linear's input prepared by the kernel that computes it
    (`kernels.InputLink`: the attention kernel for o_proj, o_proj for gate_up_proj, gate_up_proj
    for down_proj, down_proj for the next qkv_proj and the quantized head), eagerly and under
    CUDA graphs through the engine's steps: every handoff is taken at every step but the first
    of the Linears with an RMSNorm, and the tokens are the same as with every Linear preparing
    its own input."""
    from tachylm.kernels import quant_matmul as qm
    from tachylm.quant import Int4Linear, apply_quant_option

    torch._dynamo.reset()
    model = build_random_model(CONFIG, device="cuda", dtype=torch.bfloat16, seed=0, std=0.1)
    apply_quant_option(model, "int4", 32, include_head=True)
    producers = [m for m in model.modules() if isinstance(m, Int4Linear) and m.feeds]
    assert len(producers) == 3 * len(model.layers)  # o_proj, gate_up_proj and down_proj
    links = [qm.input_link(layer.attn.output_link) for layer in model.layers] \
        + [qm.input_link(m.feeds) for m in producers]
    assert all(links)
    prompt = list(range(1, 30))

    def run(compile_):
        steps = _steps(model, "cuda", compile_decode=compile_, compile_prefill=compile_)
        return list(Generation(steps, prompt, 12, GREEDY))

    before = [link.taken for link in links]
    linked = run(False), run(True)
    taken = [link.taken - b for link, b in zip(links, before)]
    assert min(taken) >= 11, taken  # eager decode steps, and the graphs' warm-up and capture
    for layer in model.layers:
        layer.attn.output_link = 0
    for m in producers:
        m.feeds = 0
    unlinked = run(False), run(True)  # the attributes are guarded: the steps compile again
    assert linked == unlinked
