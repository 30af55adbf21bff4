"""Checkpoint readers: a path in, a config plus canonically named tensors out.

Readers never import the model. Every reader returns a `Checkpoint` whose tensor names are the
canonical names below (the model's own state-dict names), already translated from the file's
naming and layout, with every tensor accounted for and every shape checked.

Canonical names (L = layer index):
    embed.weight                         [vocab, dim]
    layers.L.attn_norm.weight            [dim]
    layers.L.attn.q_proj.weight          [n_heads * head_dim, dim]    (+ .bias if qkv_bias)
    layers.L.attn.k_proj.weight          [n_kv_heads * head_dim, dim] (+ .bias if qkv_bias)
    layers.L.attn.v_proj.weight          [n_kv_heads * head_dim, dim] (+ .bias if qkv_bias)
    layers.L.attn.o_proj.weight          [dim, n_heads * head_dim]
    layers.L.attn.q_norm.weight          [head_dim]                   (if qk_norm)
    layers.L.attn.k_norm.weight          [head_dim]                   (if qk_norm)
    layers.L.mlp_norm.weight             [dim]
    layers.L.mlp.gate_proj.weight        [ffn_dim, dim]
    layers.L.mlp.up_proj.weight          [ffn_dim, dim]
    layers.L.mlp.down_proj.weight        [dim, ffn_dim]
    norm.weight                          [dim]
    lm_head.weight                       [vocab, dim]                 (absent if tie_embeddings)

q/k rows are in Hugging Face rotary order (the two halves of each head rotate together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tachylm.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or does not match its config."""


@dataclass
class Checkpoint:
    """What a reader returns.

    Attributes:
        config: the architecture, read from the checkpoint.
        tensors: canonical name -> tensor (CPU; dtype as stored, or float32 for dequantized GGUF).
        path: where it came from (file or folder), for messages.
        chat_template: the checkpoint's own jinja2 chat template, or None.
        metadata: reader-specific extras (e.g. the GGUF key/value fields for the tokenizer).
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    path: str
    chat_template: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name the model needs for `config`, with its shape."""
    c = config
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (c.dim,)
        shapes[p + "attn.q_proj.weight"] = (q_out, c.dim)
        shapes[p + "attn.k_proj.weight"] = (kv_out, c.dim)
        shapes[p + "attn.v_proj.weight"] = (kv_out, c.dim)
        shapes[p + "attn.o_proj.weight"] = (c.dim, q_out)
        if c.qkv_bias:
            shapes[p + "attn.q_proj.bias"] = (q_out,)
            shapes[p + "attn.k_proj.bias"] = (kv_out,)
            shapes[p + "attn.v_proj.bias"] = (kv_out,)
        if c.qk_norm:
            shapes[p + "attn.q_norm.weight"] = (c.head_dim,)
            shapes[p + "attn.k_norm.weight"] = (c.head_dim,)
        shapes[p + "mlp_norm.weight"] = (c.dim,)
        shapes[p + "mlp.gate_proj.weight"] = (c.ffn_dim, c.dim)
        shapes[p + "mlp.up_proj.weight"] = (c.ffn_dim, c.dim)
        shapes[p + "mlp.down_proj.weight"] = (c.dim, c.ffn_dim)
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, path: str) -> None:
    """Strict accounting: every expected tensor present with the right shape, nothing extra.

    Raises:
        CheckpointError: naming the file and the offending tensor(s).
    """
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} in all); the file is incomplete or does not match its config")
    if extra:
        raise CheckpointError(
            f"{path}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
            f"({len(extra)} in all) that this architecture does not use")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)} from the config")
