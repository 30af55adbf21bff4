"""Hugging Face folder reader: sharded loading and the clear errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tachylm.checkpoints import CheckpointError, expected_shapes
from tachylm.checkpoints.hf import read_hf
from tachylm.config import ModelConfig

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 16,
             "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False}

HF_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight",
               "mlp_norm.weight": "post_attention_layernorm.weight"}


def _hf_name(canonical: str) -> str:
    if canonical in HF_NAMES:
        return HF_NAMES[canonical]
    _, layer, rest = canonical.split(".", 2)
    rest = LAYER_NAMES.get(rest, rest.replace("attn.", "self_attn."))
    return f"model.layers.{layer}.{rest}"


def _write(folder, config=HF_CONFIG, shards=1, mutate=None):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    shapes = expected_shapes(ModelConfig.from_hf(HF_CONFIG))
    tensors = {_hf_name(name): torch.randn(shape) for name, shape in shapes.items()}
    if mutate:
        mutate(tensors)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return tensors
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / file)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def test_sharded_checkpoint_loads_every_tensor(tmp_path):
    tensors = _write(tmp_path / "m", shards=3)
    ckpt = read_hf(str(tmp_path / "m"))
    assert torch.equal(ckpt.tensors["layers.1.mlp.down_proj.weight"],
                       tensors["model.layers.1.mlp.down_proj.weight"])
    assert len(ckpt.tensors) == len(tensors)


def test_missing_folder_pieces(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_hf(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_hf(str(tmp_path / "empty"))
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="safetensors only"):
        read_hf(str(tmp_path / "empty"))


def test_missing_shard(tmp_path):
    _write(tmp_path / "m", shards=2)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_hf(str(tmp_path / "m"))


def test_truncated_file(tmp_path):
    _write(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(corrupted|truncated)"):
        read_hf(str(tmp_path / "m"))


def test_wrong_shape_names_the_tensor(tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.randn(31, 16)
    _write(tmp_path / "m", mutate=shrink)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj\.weight.*\[31, 16\].*\[32, 16\]"):
        read_hf(str(tmp_path / "m"))


def test_missing_and_unknown_tensors(tmp_path):
    _write(tmp_path / "a", mutate=lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing tensor.*norm.weight"):
        read_hf(str(tmp_path / "a"))
    _write(tmp_path / "b", mutate=lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        read_hf(str(tmp_path / "b"))


def test_unknown_architecture_lists_supported(tmp_path):
    _write(tmp_path / "m", config={**HF_CONFIG, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        read_hf(str(tmp_path / "m"))


def test_bad_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_hf(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({**HF_CONFIG, "hidden_size": None}))
    with pytest.raises(ValueError, match="hidden_size"):
        read_hf(str(tmp_path / "m"))
