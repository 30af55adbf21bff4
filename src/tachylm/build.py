"""The one place that orders model construction.

meta init -> (quantized-module swap) -> assign-load the checkpoint tensors on the target device
-> tie the head -> rotary tables. The model is never materialised twice: modules are created
without storage on the meta device and the loaded tensors become the parameters directly
(`assign=True`). Float checkpoints come from the readers (`build_model`), quantized folders from
`tachylm.quant.io` (`build_quantized_model`).
"""

from __future__ import annotations

import os

import torch

from tachylm.checkpoints import Checkpoint, CheckpointError
from tachylm.config import ModelConfig
from tachylm.model import Transformer
from tachylm.quant import HEAD, prepare_for_quantized_load
from tachylm.quant.io import (QUANT_FILE, fold_listed_norms, read_quantization_json,
                              read_quantized_weights)
from tachylm.quant.schemes import check_fp8_device

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """Map a user-facing dtype name to torch (ValueError lists the choices).

    "auto" (needs `device`) is bfloat16 on CUDA and float32 elsewhere.
    """
    if name == "auto" and device is not None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# Fused model parameters and the canonical tensors stacked (along dim 0) to make them.
FUSED = {"attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fuse_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical checkpoint tensors -> the model's state dict (q/k/v and gate/up stacked).

    Consumes `tensors` (parts are removed as they are stacked, so peak memory stays low). The
    checkpoint was already checked, so every part of a fused matrix is present.
    """
    out = {}
    for name in list(tensors):
        if name not in tensors:  # already stacked with its siblings
            continue
        base, _, suffix = name.rpartition(".")
        for fused, parts in FUSED.items():
            part = next((p for p in parts if base.endswith("." + p)), None)
            if part is not None:
                owner = base[: -len(part)]
                out[f"{owner}{fused}.{suffix}"] = torch.cat(
                    [tensors.pop(f"{owner}{p}.{suffix}") for p in parts])
                break
        else:
            out[name] = tensors.pop(name)
    return out


def canonical_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under canonical checkpoint names (fused matrices split back; views)."""
    config = model.config
    sizes = {"attn.qkv_proj": [config.n_heads * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2,
             "mlp.gate_up_proj": [config.ffn_dim] * 2}
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        base, _, suffix = name.rpartition(".")
        fused = next((f for f in FUSED if base.endswith("." + f)), None)
        if fused is None:
            out[name] = tensor
            continue
        owner = base[: -len(fused)]
        for part, piece in zip(FUSED[fused], tensor.split(sizes[fused])):
            out[f"{owner}{part}.{suffix}"] = piece
    return out


def build_model(checkpoint: Checkpoint, *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, max_seq_len: int | None = None) -> Transformer:
    """Create the model for `checkpoint` on `device` with weights in `dtype`.

    Args:
        checkpoint: what a reader returned (canonical tensors, already checked).
        device, dtype: placement of the weights.
        max_seq_len: longest sequence the rotary tables must cover (default: the config's).
    Returns:
        The model in eval mode. The checkpoint's tensors are consumed (moved, not copied, where
        device and dtype already match).
    """
    config = checkpoint.config
    with torch.device("meta"):
        model = Transformer(config)
    state = {name: tensor.to(device=device, dtype=dtype)
             for name, tensor in fuse_tensors(checkpoint.tensors).items()}
    return _assign(model, state, config.tie_embeddings, device, max_seq_len)


def build_quantized_model(folder: str | os.PathLike[str], *, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32, max_seq_len: int | None = None
                          ) -> Transformer:
    """Load a folder written by `tachylm.quant.io.save_quantized` (`tachylm quantize`).

    meta init -> quantized-module swap (from quantization.json) -> every tensor checked against
    the expected name, shape and dtype -> assign-load on `device` -> tie the head if it was stored
    tied -> rotary tables.

    Args:
        folder: the quantized folder.
        device: where the model goes.
        dtype: dtype of the floating-point tensors (quantized tensors and scales keep theirs).
        max_seq_len: positions the rotary tables cover (default: the config's).
    Returns:
        The model in eval mode.
    Raises:
        CheckpointError: missing, truncated or corrupted files; missing, unexpected or mismatching
            tensors (naming the file and the tensor).
        RuntimeError: fp8 weights on a GPU that cannot run them.
    """
    meta = read_quantization_json(folder)
    config, specs = meta["config"], meta["modules"]
    device = torch.device(device)
    if any(spec.get("scheme") == "fp8" for spec in specs.values()):
        check_fp8_device(device)
    with torch.device("meta"):
        model = Transformer(config)
    try:
        prepare_for_quantized_load(model, specs)
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(os.fspath(folder), QUANT_FILE)}: {e}") from e
    fold_listed_norms(model, meta["folded_norms"], folder)
    tied = config.tie_embeddings and HEAD not in specs
    state = read_quantized_weights(folder, model, tied, device, dtype, meta["format_version"])
    return _assign(model, state, tied, device, max_seq_len)


def _assign(model: Transformer, state: dict[str, torch.Tensor], tied: bool, device: torch.device | str,
            max_seq_len: int | None) -> Transformer:
    """Assign-load `state` into the meta-device `model`, tie the head to the embedding (`tied`:
    the state has no head of its own), build the rotary tables; eval mode, no grad."""
    if tied:
        state[f"{HEAD}.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.embed.weight
    model.setup_rope(max_seq_len or model.config.max_seq_len, device)
    return model.eval().requires_grad_(False)


def build_random_model(config: ModelConfig, *, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       max_seq_len: int | None = None, std: float = 0.02) -> Transformer:
    """A model with random weights (normal, std 0.02; norms 1.0), generated on `device`.

    Used by benchmarks at real shapes: throughput does not depend on the values.
    """
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, std, generator=generator)
    model.setup_rope(max_seq_len or config.max_seq_len, device)
    return model.eval().requires_grad_(False)
