"""Tiny synthetic GGUF files for reader tests, written with `gguf.GGUFWriter`.

`hf_weights` makes random weights under canonical names in Hugging Face layout; `write_gguf`
renames them the way llama.cpp's converter does, applies its q/k rotary permutation for the
``llama`` architecture, stores each tensor in the requested type and writes the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tachylm.checkpoints import expected_shapes
from tachylm.config import ModelConfig

Q = gguf.GGMLQuantizationType


def tiny_config(family: str = "llama", **changes: Any) -> ModelConfig:
    """dim 64, 2 layers, 4 heads / 2 kv heads, ffn 128, vocab 100."""
    config = ModelConfig(
        family=family, vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256, tie_embeddings=False,
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
    return config.replace(**changes)


def hf_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every canonical tensor of `config`, in HF layout."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in expected_shapes(config).items()}


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: per head, HF rows (x..., y...) -> interleaved (x0, y0, ...)."""
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


_GGUF_PARTS = {
    "attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GGUF_TOP = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def gguf_name(canonical: str) -> str:
    """Canonical name -> llama.cpp tensor name."""
    if canonical in _GGUF_TOP:
        return _GGUF_TOP[canonical]
    _, layer, rest = canonical.split(".", 2)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_PARTS[part]}.{kind}"


def to_gguf_tensors(weights: dict[str, np.ndarray], config: ModelConfig,
                    permute: bool) -> dict[str, np.ndarray]:
    """Rename to GGUF names and, if `permute`, apply llama.cpp's q/k permutation."""
    out = {}
    for name, w in weights.items():
        if permute and ".attn.q_proj." in name:
            w = llama_cpp_permute(w, config.n_heads)
        elif permute and ".attn.k_proj." in name:
            w = llama_cpp_permute(w, config.n_kv_heads)
        out[gguf_name(name)] = w
    return out


def config_metadata(config: ModelConfig, arch: str) -> dict[str, Any]:
    """The architecture keys llama.cpp writes, as {key: value} (types chosen in `write_gguf`)."""
    return {
        f"{arch}.block_count": config.n_layers,
        f"{arch}.context_length": config.max_seq_len,
        f"{arch}.embedding_length": config.dim,
        f"{arch}.feed_forward_length": config.ffn_dim,
        f"{arch}.attention.head_count": config.n_heads,
        f"{arch}.attention.head_count_kv": config.n_kv_heads,
        f"{arch}.attention.key_length": config.head_dim,
        f"{arch}.rope.dimension_count": config.head_dim,
        f"{arch}.rope.freq_base": config.rope_theta,
        f"{arch}.attention.layer_norm_rms_epsilon": config.norm_eps,
        f"{arch}.vocab_size": config.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"tok{i}" for i in range(config.vocab_size)],
        "tokenizer.ggml.token_type": [1] * config.vocab_size,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }


def store(array: np.ndarray, qtype: Q) -> np.ndarray:
    """Encode a float32 array in `qtype` (F32 and F16 as numpy floats, others as bytes)."""
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], metadata: dict[str, Any],
               types: dict[str, Q] | None = None) -> Path:
    """Write a GGUF file.

    Args:
        path: output file.
        arch: general.architecture.
        tensors: GGUF name -> float32 array (encoded with `types`, default F32), a uint8
            array of already-encoded bytes whose type is given in `types`, or another numpy
            dtype stored as its GGML type (int8 -> I8).
        metadata: key -> value; ints are written as uint32, floats as float32, lists by their
            element type (str, int -> int32).
        types: GGUF name -> storage type.
    Returns:
        `path`.
    """
    types = types or {}
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in tensors.items():
        qtype = types.get(name, Q.F32)
        if array.dtype == np.uint8:
            writer.add_tensor(name, array, raw_dtype=qtype)
        elif array.dtype != np.float32:  # e.g. int8, stored as I8
            writer.add_tensor(name, array)
        elif qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, store(array, qtype))
        else:
            writer.add_tensor(name, store(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model(path: Path, config: ModelConfig, arch: str | None = None, seed: int = 0,
                types: dict[str, Q] | None = None, metadata: dict[str, Any] | None = None,
                ) -> tuple[Path, dict[str, np.ndarray]]:
    """Random model for `config` as llama.cpp would convert it; returns (path, HF weights)."""
    arch = arch or config.family
    weights = hf_weights(config, seed)
    tensors = to_gguf_tensors(weights, config, permute=arch in ("llama", "mistral"))
    write_gguf(path, arch, tensors, {**config_metadata(config, arch), **(metadata or {})}, types)
    return path, weights
