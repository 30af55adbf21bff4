"""Logit parity with Hugging Face transformers on tiny random models of each family (fp32)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tachylm.build import build_model  # noqa: E402
from tachylm.cache import KVCache  # noqa: E402
from tachylm.checkpoints.hf import read_hf  # noqa: E402

COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5)

FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, rope_theta=10000.0)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0)),
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, max_position_embeddings=1024,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "llama3.2-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
}


def _hf_model(family: str, tmp_path):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so that mistakes show
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    hf = _hf_model(family, tmp_path)
    ours = build_model(read_hf(str(tmp_path)), dtype=torch.float32)
    tokens = torch.randint(0, 211, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale, family


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_incremental_decode_equals_full_forward(family, tmp_path):
    _hf_model(family, tmp_path)
    model = build_model(read_hf(str(tmp_path)), dtype=torch.float32)
    c = model.config
    tokens = torch.randint(0, 211, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(c.n_layers, 2, 64, c.n_kv_heads, c.head_dim)
        prefill = model(tokens[:, :12], torch.arange(12).expand(2, 12), cache)
        steps = [prefill]
        for t in range(12, 20):
            steps.append(model(tokens[:, t:t + 1], torch.full((2, 1), t), cache))
    incremental = torch.cat(steps, dim=1)
    assert torch.allclose(incremental, full, atol=1e-5, rtol=1e-4)


def test_ragged_rows_use_their_own_positions(tmp_path):
    """Rows at different positions in one batch give the same logits as each row alone."""
    _hf_model("llama3", tmp_path)
    model = build_model(read_hf(str(tmp_path)), dtype=torch.float32)
    c = model.config
    tokens = torch.randint(0, 211, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = KVCache(c.n_layers, 2, 32, c.n_kv_heads, c.head_dim)
        model(tokens[:, :8], torch.arange(8).expand(2, 8), cache)
        # row 0 continues at position 8, row 1 is rolled back and continues at position 5
        step = model(torch.stack([tokens[0, 8:9], tokens[1, 5:6]]), torch.tensor([[8], [5]]), cache)
        alone0 = model(tokens[:1, :9])[:, -1]
        alone1 = model(tokens[1:, :6])[:, -1]
    assert torch.allclose(step[0, 0], alone0[0], atol=1e-5)
    assert torch.allclose(step[1, 0], alone1[0], atol=1e-5)


def test_gguf_rope_divisors_equal_llama3_scaling():
    """Llama 3.1 GGUFs store their scaling as per-frequency divisors; both forms agree."""
    import math

    from tachylm.config import ModelConfig, RopeScaling, rope_frequencies

    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    base = ModelConfig(family="llama", vocab_size=10, dim=512, n_layers=1, n_heads=4, n_kv_heads=4,
                       head_dim=128, ffn_dim=8, rope_theta=500000.0)
    scaled = rope_frequencies(base.replace(rope_scaling=scaling))
    plain = rope_frequencies(base)
    # The divisors as llama.cpp's converter writes them: 1, factor, or a smooth blend.
    divisors = []
    for f in plain:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            divisors.append(1.0)
        elif wavelen > 8192 / 1.0:
            divisors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            divisors.append(1 / ((1 - smooth) / 8.0 + smooth))
    from_divisors = rope_frequencies(base.replace(rope_freq_divisors=tuple(divisors)))
    assert max(abs(a - b) / a for a, b in zip(scaled, from_divisors)) < 1e-12
    assert any(abs(a - b) / a > 0.1 for a, b in zip(scaled, plain))


def test_fused_weights_split_back_to_the_checkpoint(tmp_path):
    from tachylm.build import canonical_tensors

    _hf_model("qwen2", tmp_path)
    original = {k: v.clone() for k, v in read_hf(str(tmp_path)).tensors.items()}
    model = build_model(read_hf(str(tmp_path)), dtype=torch.float32)
    back = canonical_tensors(model)
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
