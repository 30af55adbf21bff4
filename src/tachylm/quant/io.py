"""Quantized checkpoints on disk: a folder that loads without the original model.

Layout of a quantized folder:

    model.safetensors       every tensor under the model's own state-dict names (fused q/k/v and
                            gate/up; quantized modules as `<module>.qweight`, `.scale`, `.zero`,
                            `.bias`); a tied, unquantized head is not stored twice. No pickles.
    quantization.json       format and version, mode, group size, include_head, the dtype of the
                            floating-point tensors, the ModelConfig, one spec per quantized
                            module (what `prepare_for_quantized_load` needs) and, from version 3,
                            "folded_norms": the RMSNorms whose weight is folded into the Linear
                            after them (stored as empty tensors; see `tachylm.quant`)
    tokenizer.json, tokenizer_config.json, generation_config.json (+ chat_template.jinja ...)
                            copied from a Hugging Face source, or written from a GGUF vocabulary

This module reads and writes the files; `tachylm.build.build_quantized_model` orders the load.

The stored layouts are device-independent (see schemes.py): a folder written on a CPU loads on a
GPU and back; any kernel-specific repacking belongs to load time, never to the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tachylm.checkpoints import CheckpointError
from tachylm.config import ModelConfig, RopeScaling
from tachylm.model import RMSNorm, Transformer
from tachylm.quant import HEAD, fold_norm, folded_norms, module_specs, quantized_modules
from tachylm.tokenizer import load_tokenizer

FORMAT = "tachylm-quantized"
# 2: int4 scales and zero points in bfloat16 (1: float32, still read). 3: "folded_norms" (a
# folder without folded norms is still written as version 2, which older readers take).
FORMAT_VERSION = 3
UNFOLDED_VERSION = 2  # what a folder without folded norms is written as
READ_VERSIONS = (1, 2, 3)
QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                      "special_tokens_map.json", "chat_template.jinja")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED_KEYS = ("format", "format_version", "mode", "group_size", "include_head", "dtype", "config",
                  "modules")


def is_quantized_folder(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a folder written by `save_quantized` (it holds quantization.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, QUANT_FILE))


def check_output_folder(folder: str | os.PathLike[str]) -> None:
    """Refuse a place `save_quantized` must not write to (ValueError): a file, or a folder that
    holds files and is not a quantized checkpoint (a source checkpoint's own model.safetensors
    would be overwritten). A new or empty folder, or an earlier quantized output, is fine."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file; the output is a folder: give a new or empty folder")
    if os.path.isdir(folder) and os.listdir(folder) and not is_quantized_folder(folder):
        raise ValueError(f"{folder} already holds files and is not a quantized checkpoint; write to a "
                         "new or empty folder (nothing in it was changed)")


def _write_replacing(path: str, write) -> None:
    """write(tmp_path), then move it over `path`: an interrupted save leaves no half-written file
    under the real name."""
    tmp = f"{path}.partial"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(meta: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> JSON-able dict (inverse: `config_from_dict`)."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any], source: str) -> ModelConfig:
    """dict from `config_to_dict` -> ModelConfig; CheckpointError names `source` on any problem."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: 'config' must be an object")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise CheckpointError(f"{source}: unknown config field(s) {unknown}; written by a newer tachylm?")
    data = dict(data)
    try:
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if data.get("rope_freq_divisors") is not None:
            data["rope_freq_divisors"] = tuple(data["rope_freq_divisors"])
        return ModelConfig(**data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model config ({e})") from e


def save_quantized(model: Transformer, folder: str | os.PathLike[str], *, mode: str,
                   tokenizer_source: str | os.PathLike[str] | None = None,
                   dtype: torch.dtype | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write a quantized model as a folder `tachylm.build.build_quantized_model` reads.

    Args:
        model: a Transformer after `quantize_model` (any device).
        folder: created if needed; files of the same names are overwritten.
        mode: the quantization mode it was made with (`tachylm.quant.MODES`).
        tokenizer_source: the source checkpoint (.gguf file or Hugging Face folder) whose tokenizer
            and chat template go along; None writes no tokenizer files.
        dtype: dtype for the floating-point tensors (embedding, norms, biases); default as they are.
            Quantized tensors and their scales keep their own dtypes.
        extra: more JSON-able facts to record under "provenance" (source, calibration used).
    Raises:
        ValueError: the model has no quantized modules, or `folder` is refused by
            `check_output_folder` (a file, or a folder of other files).
    """
    specs = module_specs(model)
    if not specs:
        raise ValueError("the model holds no quantized modules; run quantize_model first")
    check_output_folder(folder)
    config = model.config
    exact = _exact_dtype_names(model)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == f"{HEAD}.weight" and config.tie_embeddings:
            continue  # the embedding table itself; re-tied at load
        if dtype is not None and name not in exact:
            tensor = tensor.to(dtype)
        state[name] = tensor.detach().to("cpu").contiguous()
    float_dtypes = {str(t.dtype).removeprefix("torch.") for n, t in state.items() if n not in exact}
    assert len(float_dtypes) == 1, f"mixed floating-point dtypes {float_dtypes}; pass dtype="
    group_sizes = {spec["group_size"] for spec in specs.values() if "group_size" in spec}
    folded = folded_norms(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if folded else UNFOLDED_VERSION,
        "mode": mode,
        "group_size": group_sizes.pop() if len(group_sizes) == 1 else None,
        "include_head": HEAD in specs,
        "dtype": float_dtypes.pop(),
        "config": config_to_dict(config),
        "modules": specs,
        "provenance": extra or {},
    }
    if folded:
        meta["folded_norms"] = folded
    os.makedirs(folder, exist_ok=True)
    # The weights first, the description last: a folder counts as quantized once its
    # quantization.json is there.
    _write_replacing(os.path.join(folder, WEIGHTS_FILE),
                     lambda path: save_file(state, path, metadata={"format": FORMAT}))
    _write_replacing(os.path.join(folder, QUANT_FILE), lambda path: _write_json(meta, path))
    if tokenizer_source is not None:
        write_tokenizer(tokenizer_source, folder)


def write_tokenizer(source: str | os.PathLike[str], folder: str | os.PathLike[str]) -> None:
    """Put the tokenizer (and chat template) of `source` into `folder` in Hugging Face form.

    A Hugging Face folder's files are copied; a GGUF vocabulary is rebuilt by `load_tokenizer` and
    written as tokenizer.json + tokenizer_config.json (bos/eos, add_bos_token, chat_template) +
    generation_config.json (every stop id), which `Tokenizer.from_hf_dir` reads back identically.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        for name in HF_TOKENIZER_FILES:
            path = os.path.join(source, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(folder, name))
        return
    load_tokenizer(source).save_hf(folder)


def _exact_dtype_names(model: Transformer) -> set[str]:
    """State-dict names whose dtype is part of the format (quantized tensors, scales, zeros);
    everything else is floating point in the model's dtype."""
    return {f"{name}.{buffer}" for name, module in quantized_modules(model).items()
            for buffer, _ in module.named_buffers() if buffer != "bias"}


def read_quantization_json(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check `folder/quantization.json` (CheckpointError names the file and the key)."""
    path = os.path.join(folder, QUANT_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: no {QUANT_FILE}; not a quantized tachylm checkpoint") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupted") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing}; the file is incomplete or corrupted")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{path}: format {meta['format']!r} is not {FORMAT!r}")
    if meta["format_version"] not in READ_VERSIONS:
        raise CheckpointError(f"{path}: format version {meta['format_version']!r} is not supported "
                              f"(this tachylm reads versions {', '.join(map(str, READ_VERSIONS))}); "
                              "upgrade tachylm or re-quantize")
    if meta["dtype"] not in FLOAT_DTYPES:
        raise CheckpointError(f"{path}: dtype {meta['dtype']!r} is not one of {', '.join(FLOAT_DTYPES)}")
    modules = meta["modules"]
    if not isinstance(modules, dict) or not modules or not all(
            isinstance(spec, dict) for spec in modules.values()):
        raise CheckpointError(f"{path}: 'modules' must map module names to scheme specs")
    folded = meta.setdefault("folded_norms", [])
    if not isinstance(folded, list) or not all(isinstance(name, str) for name in folded):
        raise CheckpointError(f"{path}: 'folded_norms' must be a list of module names")
    meta["config"] = config_from_dict(meta["config"], path)
    return meta


def fold_listed_norms(model: Transformer, names: list[str], folder: str | os.PathLike[str]) -> None:
    """Leave the RMSNorms `names` (quantization.json's "folded_norms") of the meta-device `model`
    without a weight, so the folder's empty tensors load into them (CheckpointError for a name
    that is not an RMSNorm of the model)."""
    for name in names:
        try:
            norm = model.get_submodule(name)
        except AttributeError:
            norm = None
        if not isinstance(norm, RMSNorm):
            raise CheckpointError(f"{os.path.join(os.fspath(folder), QUANT_FILE)}: folded norm "
                                  f"{name!r} is not an RMSNorm of this model")
        fold_norm(norm)


def read_quantized_config(folder: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig stored in a quantized folder."""
    return read_quantization_json(folder)["config"]


def read_quantized_weights(folder: str | os.PathLike[str], model: Transformer, tied: bool,
                           device: torch.device, dtype: torch.dtype,
                           format_version: int = FORMAT_VERSION) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized folder, checked against `model` (built on the meta device with
    its quantized modules in place, see `prepare_for_quantized_load`).

    Names, shapes and the quantized tensors' dtypes must match exactly; floating-point tensors are
    converted to `dtype`. A tied head (`tied`) is not stored: the caller ties it. In a version 1
    folder the int4 scales and zero points are float32 and are rounded to the module's dtype.

    Raises:
        CheckpointError: missing, truncated or corrupted files; missing, unexpected or mismatching
            tensors (naming the file and the tensor).
    """
    expected = model.state_dict()
    if tied:
        del expected[f"{HEAD}.weight"]
    rounded = set()
    if format_version == 1:
        rounded = {f"{name}.{buffer}" for name, module in quantized_modules(model).items()
                   if module.scheme == "int4" for buffer in ("scale", "zero")}
    return _read_weights(os.path.join(os.fspath(folder), WEIGHTS_FILE), expected,
                         _exact_dtype_names(model), device, dtype, rounded)


def _read_weights(path: str, expected: dict[str, torch.Tensor], exact: set[str], device: torch.device,
                  dtype: torch.dtype, rounded: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Read and check every tensor of `path` against `expected` (meta tensors of the right shape
    and dtype); names in `exact` must match the dtype, the rest must be floating point. Names in
    `rounded` are float32 in the file and converted to the expected dtype."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; the quantized folder is incomplete")
    state = {}
    try:
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            extra = sorted(names - set(expected))
            if missing:
                raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]} ({len(missing)} in all); "
                                      "the file does not match quantization.json")
            if extra:
                raise CheckpointError(f"{path}: unexpected tensor(s) {extra[:5]} ({len(extra)} in all) "
                                      "that quantization.json does not describe")
            for name, want in expected.items():
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(want.shape):
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, "
                                          f"expected {list(want.shape)}")
                if name in rounded and tensor.dtype == torch.float32:
                    state[name] = tensor.to(device=device, dtype=want.dtype)
                elif name in exact:
                    if tensor.dtype != want.dtype:
                        raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, "
                                              f"expected {want.dtype}")
                    state[name] = tensor.to(device)
                else:
                    if not tensor.dtype.is_floating_point or tensor.dtype.itemsize < 2:
                        raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, "
                                              "expected a 16- or 32-bit floating-point type")
                    state[name] = tensor.to(device=device, dtype=dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupted or truncated safetensors file ({e}); "
                              "re-create it with tachylm quantize") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    return state
