"""Model architecture configuration.

`ModelConfig` is a frozen description of the network's shape, built from what the checkpoint
itself says (Hugging Face ``config.json`` or GGUF metadata). It never holds device, dtype,
quantization or parallelism choices, and architecture is never guessed from a name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

# Hugging Face `architectures[0]` -> our family name. Mistral, SmolLM2 and TinyLlama ship as
# LlamaForCausalLM/MistralForCausalLM; Qwen2 and Qwen2.5 share Qwen2ForCausalLM.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# GGUF `general.architecture` -> family name.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def unsupported_architecture(name: str, supported: Mapping[str, str], source: str) -> ValueError:
    """Build the error for an architecture we do not implement, listing the ones we do."""
    return ValueError(
        f"{source}: unsupported architecture {name!r}. Supported: {', '.join(sorted(supported))}. "
        "Open an issue to ask for another family."
    )


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency-dependent rotary scaling (HF rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder.

    Attributes:
        family: "llama", "mistral", "qwen2" or "qwen3" (informational; behaviour is driven
            by the flags below, never by this name).
        vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim: sizes.
        norm_eps: RMSNorm epsilon.
        rope_theta: rotary base.
        rope_scaling: Llama 3.1 scaling, or None.
        rope_freq_divisors: one divisor per rotary frequency (GGUF's `rope_freqs` tensor, the
            form Llama 3.1 GGUF files carry their scaling in), or None.
        max_seq_len: the longest context the checkpoint supports.
        tie_embeddings: the output head reuses the embedding table.
        qkv_bias: q/k/v projections have a bias (Qwen2).
        qk_norm: per-head RMSNorm on q and k before rotary (Qwen3).
    """

    family: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_divisors: tuple[float, ...] | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_freq_divisors is not None and len(self.rope_freq_divisors) != self.head_dim // 2:
            raise ValueError(f"rope_freq_divisors needs head_dim / 2 = {self.head_dim // 2} values, "
                             f"got {len(self.rope_freq_divisors)}")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (the config itself is immutable)."""
        return dataclasses.replace(self, **changes)

    @property
    def n_params(self) -> int:
        """Number of parameters (embedding and head counted once each, tied head once)."""
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + head + self.dim

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dictionary.

        Args:
            hf: the parsed JSON.
            source: file name used in error messages.
        Raises:
            ValueError: unsupported architecture, missing or inconsistent fields.
        """
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError(f"{source}: no 'architectures' entry; cannot tell which model this is")
        arch = archs[0]
        if arch not in HF_ARCHITECTURES:
            raise unsupported_architecture(arch, HF_ARCHITECTURES, source)
        family = HF_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ValueError(f"{source}: missing required field {key!r} for {arch}")
            return hf[key]

        n_heads = int(need("num_attention_heads"))
        dim = int(need("hidden_size"))
        head_dim = hf.get("head_dim") or dim // n_heads
        n_kv_heads = hf.get("num_key_value_heads") or n_heads
        scaling = _rope_scaling_from_hf(hf, source)
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers 5 moved it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        if family == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(hf.get("attention_bias", False))
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        if family == "mistral" and hf.get("sliding_window") and hf["sliding_window"] < int(
                hf.get("max_position_embeddings", 0)):
            # Sliding-window attention changes results only past the window; we refuse rather
            # than silently computing full attention there.
            max_seq = int(hf["sliding_window"])
        else:
            max_seq = int(hf.get("max_position_embeddings", 4096))
        return cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            dim=dim,
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(n_kv_heads),
            head_dim=int(head_dim),
            ffn_dim=int(need("intermediate_size")),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_seq_len=max_seq,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=family == "qwen3",
        )


def _rope_scaling_from_hf(hf: Mapping[str, Any], source: str) -> RopeScaling | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (only 'llama3')")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def rope_frequencies(config: ModelConfig) -> "list[float]":
    """Inverse rotary frequencies, one per pair of head dimensions, with scaling applied.

    Returns a Python list so this module stays free of torch; model.py turns it into a tensor.
    """
    half = config.head_dim // 2
    freqs = [1.0 / (config.rope_theta ** (2 * i / config.head_dim)) for i in range(half)]
    if config.rope_freq_divisors is not None:
        freqs = [f / d for f, d in zip(freqs, config.rope_freq_divisors)]
    scaling = config.rope_scaling
    if scaling is None:
        return freqs
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / scaling.factor)
        else:
            smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)
            out.append((1 - smooth) * f / scaling.factor + smooth * f)
    return out
