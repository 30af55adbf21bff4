"""Reader for Hugging Face checkpoint folders: config.json plus safetensors weights.

Handles a single `model.safetensors` and a sharded `model.safetensors.index.json`. Tensor names
are translated to tachylm's canonical names (see checkpoints/__init__.py), and every tensor in
the files is accounted for. Weights are only ever read with safetensors: no pickles.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open

from tachylm.checkpoints import Checkpoint, CheckpointError, check_tensors
from tachylm.config import ModelConfig

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
for _proj in ("q", "k", "v", "o"):
    for _kind in ("weight", "bias"):
        _LAYER_NAMES[f"self_attn.{_proj}_proj.{_kind}"] = f"attn.{_proj}_proj.{_kind}"
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older exports saved alongside the weights; they are recomputed, never loaded.
_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def canonical_name(hf_name: str) -> str | None:
    """Canonical name for a Hugging Face tensor name, or None if it is not one we know."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    match = _LAYER_RE.fullmatch(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def read_hf_config(folder: str) -> ModelConfig:
    """Parse `folder/config.json` into a ModelConfig (errors name the file)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json; a Hugging Face checkpoint folder needs one")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-download the file") from e
    return ModelConfig.from_hf(raw, source=path)


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e}); re-download it") from e
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) {missing} listed in model.safetensors.index.json "
                                  "are missing; the download is incomplete")
        return [os.path.join(folder, name) for name in files]
    if os.path.isfile(single):
        return [single]
    if any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(folder)):
        raise CheckpointError(f"{folder}: only pickle weights (.bin/.pt) found; tachylm reads safetensors "
                              "only (pickles can run code). Convert with safetensors or download the "
                              "safetensors variant")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def read_hf(folder: str) -> Checkpoint:
    """Read a Hugging Face checkpoint folder.

    Args:
        folder: directory with config.json and safetensors weights.
    Returns:
        Checkpoint with canonical tensors in their stored dtype.
    Raises:
        CheckpointError: missing/corrupt files, unknown or missing tensors, wrong shapes.
        ValueError: unsupported architecture.
    """
    config = read_hf_config(folder)
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if _DERIVED.fullmatch(name):
                        continue
                    canon = canonical_name(name)
                    if canon is None:
                        raise CheckpointError(f"{path}: unexpected tensor {name!r}; it is not part of a "
                                              f"{config.family} model")
                    if canon == "lm_head.weight" and config.tie_embeddings:
                        continue  # a tied head saved explicitly is a copy of the embedding
                    if canon in tensors:
                        raise CheckpointError(f"{path}: tensor {name!r} appears in more than one shard")
                    tensors[canon] = f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: corrupted or truncated safetensors file ({e}); "
                                  "re-download it") from e
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from e
    check_tensors(tensors, config, folder)
    return Checkpoint(config=config, tensors=tensors, path=folder,
                      chat_template=_chat_template(folder))


def _chat_template(folder: str) -> str | None:
    path = os.path.join(folder, "tokenizer_config.json")
    template = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # named templates: use the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template
