"""GGUF reader: one ``.gguf`` file in, a `Checkpoint` with canonical names and HF layout out.

The file is memory-mapped. The header (key/values and tensor infos) is parsed here with `struct`
and numpy rather than with `gguf.GGUFReader`, whose per-element parsing of the tokenizer arrays
takes about 6 s for a 49k-token vocabulary; this parser reads the same header in well under a
second. Dequantization uses `gguf.quants.dequantize` (numpy), checked against independent block
references in tests/test_gguf_reader.py.

Layout facts this module relies on:
  * GGUF lists tensor dims fastest-first (``ne0`` = row length), so a Hugging Face ``[out, in]``
    weight is stored with dims ``[in, out]``; the torch shape is the reversed dim list.
  * llama.cpp's converter permutes the q/k rows of the ``llama`` architecture (Mistral ships as
    ``llama`` too) from HF's half-split rotary order into interleaved pairs, because llama.cpp
    runs "normal" rotary on adjacent pairs. Qwen2/Qwen3 run "neox" rotary (half-split) in
    llama.cpp and are stored unpermuted. `_ROTARY_INTERLEAVED` records which is which and the
    reader undoes the permutation, so q/k come out in HF order.
  * Llama 3.1 GGUFs carry no rope-scaling keys; they store ``rope_freqs.weight``, one divisor per
    rotary frequency pair (inverse frequency = base frequency / divisor). The reader puts those
    divisors into ``ModelConfig.rope_freq_divisors``, which the model applies.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from tachylm.checkpoints import Checkpoint, CheckpointError, check_tensors, expected_shapes
from tachylm.config import GGUF_ARCHITECTURES, ModelConfig, RopeScaling, unsupported_architecture

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# Does llama.cpp store this architecture's q/k rows in interleaved rotary order?
_ROTARY_INTERLEAVED = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}

# Tensor types we dequantize; each is covered by a test against an independent reference.
SUPPORTED_TENSOR_TYPES = (
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
)

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_ARRAY_DTYPES = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    type_id: int
    offset: int  # absolute byte offset in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch (row-major) shape."""
        return tuple(reversed(self.dims))


@dataclass
class _GGUFFile:
    path: str
    buffer: mmap.mmap
    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo]


class _Cursor:
    """Bounds-checked little-endian reads from the mapped header."""

    def __init__(self, buffer: mmap.mmap, path: str) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, n_bytes: int) -> int:
        start, end = self.pos, self.pos + n_bytes
        if end > len(self.buffer):
            raise CheckpointError(
                f"{self.path}: truncated GGUF header (needs byte {end}, file has {len(self.buffer)}); "
                "the download or copy is incomplete, fetch the file again")
        self.pos = end
        return start

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from("<" + fmt, self.buffer, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n_bytes = self.scalar("Q")
        start = self.take(n_bytes)
        return self.buffer[start:start + n_bytes].decode("utf-8")


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All GGUF key/value fields as plain Python values.

    Strings are decoded, arrays become lists (``tokenizer.ggml.tokens`` etc. included), float32
    scalars are rounded to their shortest decimal (1e-5, not 9.99999974e-06).

    Args:
        path: a ``.gguf`` file.
    Returns:
        key -> value, in file order.
    Raises:
        CheckpointError: missing, not GGUF, unsupported version, truncated or corrupt header.
    """
    return _open(str(path)).metadata


def read_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read a GGUF checkpoint: config from metadata, tensors dequantized and renamed.

    Args:
        path: a single ``.gguf`` file (split files must be merged first).
        dtype: floating dtype of the returned tensors (dequantization runs in float32).
    Returns:
        A `Checkpoint` with canonical tensor names, q/k in HF rotary order, ``metadata`` holding
        every GGUF key/value, and ``chat_template`` from ``tokenizer.chat_template``.
    Raises:
        ValueError: unsupported architecture (lists the supported ones).
        CheckpointError: any other problem with the file, naming it and the tensor or key.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"read_gguf: dtype must be a floating dtype, got {dtype}")
    gguf_file = _open(str(path))
    config = _config_from_metadata(gguf_file)
    plan = _plan_tensors(gguf_file, config)

    interleaved = _ROTARY_INTERLEAVED[_architecture(gguf_file)]
    tensors: dict[str, torch.Tensor] = {}
    for canonical, info in plan.items():
        tensor = _load_tensor(gguf_file, info).to(dtype)
        if interleaved:
            if canonical.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
                tensor = _unpermute_rotary(tensor, config.n_heads)
            elif canonical.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
                tensor = _unpermute_rotary(tensor, config.n_kv_heads)
        tensors[canonical] = tensor
    check_tensors(tensors, config, gguf_file.path)

    metadata = dict(gguf_file.metadata)
    if _ROPE_FREQS in gguf_file.tensors:
        info = gguf_file.tensors[_ROPE_FREQS]
        if info.shape != (config.head_dim // 2,):
            raise CheckpointError(
                f"{gguf_file.path}: {_ROPE_FREQS} has shape {list(info.shape)}, expected "
                f"[{config.head_dim // 2}] (one divisor per rotary frequency); the file is corrupt")
        divisors = _load_tensor(gguf_file, info).float()
        config = config.replace(rope_freq_divisors=tuple(divisors.tolist()))
    return Checkpoint(config=config, tensors=tensors, path=gguf_file.path,
                      chat_template=metadata.get("tokenizer.chat_template"), metadata=metadata)


def _open(path: str) -> _GGUFFile:
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path}: no such file; pass the path of a single .gguf file"
            + (" (this is a directory)" if os.path.isdir(path) else ""))
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != _MAGIC:
            raise CheckpointError(
                f"{path}: not a GGUF file (starts with {magic!r}, expected {_MAGIC!r}); "
                "pass a .gguf file, or a Hugging Face folder to the HF reader")
        # The map outlives the file object; numpy views into it keep it alive until dropped.
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer, path)
    cursor.take(4)
    version = cursor.scalar("I")
    if version not in _SUPPORTED_VERSIONS:
        hint = (" (byte-swapped: a big-endian file)" if version & 0xFFFF == 0 else "")
        raise CheckpointError(
            f"{path}: GGUF version {version}{hint} is not supported (supported: "
            f"{', '.join(map(str, _SUPPORTED_VERSIONS))}); re-convert it with a current llama.cpp")
    n_tensors, n_kv = cursor.scalar("Q"), cursor.scalar("Q")
    try:
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string()
            if key in metadata:
                raise CheckpointError(f"{path}: metadata key {key!r} appears twice; the file is corrupt")
            metadata[key] = _read_value(cursor, cursor.scalar("I"), key)
        infos = {}
        for _ in range(n_tensors):
            name = cursor.string()
            dims = tuple(cursor.scalar("Q") for _ in range(cursor.scalar("I")))
            type_id, offset = cursor.scalar("I"), cursor.scalar("Q")
            if name in infos:
                raise CheckpointError(f"{path}: tensor {name!r} appears twice; the file is corrupt")
            infos[name] = (dims, type_id, offset)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: a key or string in the header is not valid UTF-8 ({e}); "
                              "the file is corrupt") from e
    if int(metadata.get("split.count", 1)) > 1:
        raise CheckpointError(
            f"{path}: this is one part of a split GGUF ({metadata['split.count']} parts); merge them "
            "with `llama-gguf-split --merge` and pass the merged file")
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment must be a power of two, got {alignment!r}")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {name: _TensorInfo(name, dims, type_id, data_start + offset)
               for name, (dims, type_id, offset) in infos.items()}
    return _GGUFFile(path, buffer, metadata, tensors)


def _read_value(cursor: _Cursor, type_id: int, key: str) -> Any:
    if type_id == GGUFValueType.STRING:
        return cursor.string()
    if type_id == GGUFValueType.ARRAY:
        item_type, count = cursor.scalar("I"), cursor.scalar("Q")
        if item_type == GGUFValueType.STRING:
            return [cursor.string() for _ in range(count)]
        if item_type == GGUFValueType.ARRAY:
            return [_read_value(cursor, GGUFValueType.ARRAY, key) for _ in range(count)]
        if item_type not in _ARRAY_DTYPES:
            raise CheckpointError(f"{cursor.path}: key {key!r} has arrays of unknown type {item_type}; "
                                  "the file is corrupt or from a newer GGUF version")
        dtype = np.dtype(_ARRAY_DTYPES[item_type]).newbyteorder("<")
        start = cursor.take(count * dtype.itemsize)
        return np.frombuffer(cursor.buffer, dtype=dtype, count=count, offset=start).tolist()
    if type_id not in _SCALAR_FORMATS:
        raise CheckpointError(f"{cursor.path}: key {key!r} has unknown value type {type_id}; "
                              "the file is corrupt or from a newer GGUF version")
    value = cursor.scalar(_SCALAR_FORMATS[type_id])
    if type_id == GGUFValueType.FLOAT32:
        value = float(str(np.float32(value)))
    return value


def _architecture(gguf_file: _GGUFFile) -> str:
    arch = gguf_file.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{gguf_file.path}: no general.architecture key; not a model GGUF")
    if arch not in GGUF_ARCHITECTURES:
        raise unsupported_architecture(arch, GGUF_ARCHITECTURES, gguf_file.path)
    return arch


def _config_from_metadata(gguf_file: _GGUFFile) -> ModelConfig:
    arch, meta, path = _architecture(gguf_file), gguf_file.metadata, gguf_file.path

    def get(key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        full_key = f"{arch}.{key}"
        value = meta.get(full_key, default)
        if value is None and required:
            raise CheckpointError(f"{path}: missing metadata key {full_key!r} needed for the config; "
                                  "re-convert the model with a current llama.cpp")
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise CheckpointError(f"{path}: metadata key {full_key!r} should be {kind.__name__}, got "
                                  f"{value!r} (per-layer values are not supported)")
        return value

    dim = get("embedding_length", int, required=True)
    n_heads = get("attention.head_count", int, required=True)
    n_kv_heads = get("attention.head_count_kv", int, default=n_heads)
    head_dim = get("attention.key_length", int, default=dim // n_heads)
    value_dim = get("attention.value_length", int, default=head_dim)
    rotary_dim = get("rope.dimension_count", int, default=head_dim)
    if value_dim != head_dim or rotary_dim != head_dim:
        raise CheckpointError(
            f"{path}: key_length={head_dim}, value_length={value_dim}, rope.dimension_count="
            f"{rotary_dim}; only equal head sizes with full-head rotary are supported")
    context = get("context_length", int, required=True)
    window = get("attention.sliding_window", int)
    # Sliding-window attention only differs past the window: cap the context rather than
    # silently computing full attention beyond it (same rule as ModelConfig.from_hf).
    max_seq_len = min(context, window) if window else context

    names = gguf_file.tensors
    vocab_size = get("vocab_size", int)
    if vocab_size is None and "token_embd.weight" in names:
        vocab_size = names["token_embd.weight"].shape[0]
    if vocab_size is None and "tokenizer.ggml.tokens" in meta:
        vocab_size = len(meta["tokenizer.ggml.tokens"])
    if vocab_size is None:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size ({arch}.vocab_size, "
                              "token_embd.weight and tokenizer.ggml.tokens are all absent)")
    fields = dict(
        family=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab_size,
        dim=dim,
        n_layers=get("block_count", int, required=True),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=get("feed_forward_length", int, required=True),
        norm_eps=get("attention.layer_norm_rms_epsilon", float, required=True),
        rope_theta=get("rope.freq_base", float, default=10000.0),
        rope_scaling=_rope_scaling(gguf_file, arch),
        max_seq_len=max_seq_len,
        tie_embeddings="output.weight" not in names,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
        qk_norm=arch == "qwen3",
    )
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: inconsistent metadata: {e}") from e


def _rope_scaling(gguf_file: _GGUFFile, arch: str) -> RopeScaling | None:
    meta, prefix = gguf_file.metadata, f"{arch}.rope.scaling."
    kind = meta.get(prefix + "type", "none")
    if kind == "none":
        return None
    if kind != "llama3":
        raise CheckpointError(f"{gguf_file.path}: rope scaling type {kind!r} is not supported "
                              "(only 'llama3', or a rope_freqs.weight tensor)")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")
    missing = [prefix + f for f in fields if prefix + f not in meta]
    if missing:
        raise CheckpointError(f"{gguf_file.path}: llama3 rope scaling needs keys {missing}")
    return RopeScaling(
        factor=float(meta[prefix + "factor"]),
        low_freq_factor=float(meta[prefix + "low_freq_factor"]),
        high_freq_factor=float(meta[prefix + "high_freq_factor"]),
        original_max_position_embeddings=int(meta[prefix + "original_context_length"]),
    )


def _canonical_name(gguf_name: str, path: str) -> str:
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise CheckpointError(
            f"{path}: unknown tensor {gguf_name!r}; this reader maps only the Llama-family tensors "
            f"({', '.join(sorted(_TOP_LEVEL_NAMES))}, blk.N.{{{', '.join(_LAYER_NAMES)}}})")
    layer, part, kind = match.groups()
    return f"layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _plan_tensors(gguf_file: _GGUFFile, config: ModelConfig) -> dict[str, _TensorInfo]:
    """Map names and check types, extents and shapes before any data is touched."""
    path, expected = gguf_file.path, expected_shapes(config)
    plan: dict[str, _TensorInfo] = {}
    for name, info in gguf_file.tensors.items():
        _check_storage(gguf_file, info)
        if name == _ROPE_FREQS:
            continue
        canonical = _canonical_name(name, path)
        if canonical in expected and info.shape != expected[canonical]:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({canonical}) has shape {list(info.shape)}, expected "
                f"{list(expected[canonical])} from the file's metadata; the file is inconsistent")
        plan[canonical] = info
    placeholders = {name: torch.empty(info.shape, device="meta") for name, info in plan.items()}
    check_tensors(placeholders, config, path)
    return plan


def _check_storage(gguf_file: _GGUFFile, info: _TensorInfo) -> None:
    path = gguf_file.path
    try:
        qtype = GGMLQuantizationType(info.type_id)
    except ValueError:
        qtype = None
    if qtype not in SUPPORTED_TENSOR_TYPES:
        type_name = qtype.name if qtype is not None else f"unknown type id {info.type_id}"
        raise CheckpointError(
            f"{path}: tensor {info.name!r} is stored as {type_name}, which this reader cannot "
            f"dequantize. Supported: {', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)}; "
            "use a GGUF with one of these types")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if not info.dims or info.dims[0] % block_size:
        raise CheckpointError(f"{path}: tensor {info.name!r} has dims {list(info.dims)}, whose rows "
                              f"are not a multiple of the {qtype.name} block size {block_size}")
    n_bytes = math.prod(info.dims) // block_size * type_size
    if info.offset + n_bytes > len(gguf_file.buffer):
        raise CheckpointError(
            f"{path}: truncated file: tensor {info.name!r} needs bytes {info.offset}..{info.offset + n_bytes} "
            f"but the file has {len(gguf_file.buffer)}; fetch the file again")


def _load_tensor(gguf_file: _GGUFFile, info: _TensorInfo) -> torch.Tensor:
    """Dequantize one tensor to float32 in torch (row-major) shape."""
    qtype = GGMLQuantizationType(info.type_id)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = info.dims[0] // block_size * type_size
    n_rows = math.prod(info.dims[1:])
    raw = np.frombuffer(gguf_file.buffer, dtype=np.uint8, count=n_rows * row_bytes, offset=info.offset)
    values = dequantize(raw.reshape(n_rows, row_bytes), qtype)  # [n_rows, dims[0]] float32
    if not values.flags.writeable:  # F32 comes back as a view of the read-only map
        values = values.copy()
    return torch.from_numpy(values).reshape(info.shape)


def _unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: interleaved rotary pairs back to HF half-split.

    Within each head llama.cpp stores rows as (x0, y0, x1, y1, ...) where HF has
    (x0, x1, ..., y0, y1, ...): GGUF row 2i is HF row i and row 2i+1 is HF row i + head_dim/2.

    Args:
        weight: [n_heads * head_dim, dim] weight or [n_heads * head_dim] bias, GGUF row order.
        n_heads: heads in this projection (n_kv_heads for k).
    Returns:
        The same tensor with rows in HF order.
    """
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return (weight.reshape(n_heads, head_dim // 2, 2, *rest)
            .transpose(1, 2)
            .reshape(weight.shape))
