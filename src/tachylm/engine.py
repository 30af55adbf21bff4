"""The one Python API every front end (CLI, server, bench) uses.

`Engine.load(ref)` resolves a model reference (alias, local path, hub repo id), reads the
checkpoint, builds the model on the chosen device and dtype, and loads its tokenizer and chat
template. `Engine.generate()` returns a `TextStream` (text chunks plus stats) for one prompt;
`Engine.chat()` returns a `ChatSession` that keeps the conversation in the KV cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from tachylm.build import build_model, build_quantized_model, parse_dtype
from tachylm.cache import KVCache
from tachylm.chat import ChatTemplate
from tachylm.checkpoints import Checkpoint
from tachylm.checkpoints.gguf import read_gguf
from tachylm.checkpoints.hf import read_hf
from tachylm.checkpoints.resolve import DEFAULT_MODEL, list_aliases, pull, resolve_model
from tachylm.generate import Generation, GenerationStats
from tachylm.kernels.linear import use_fast_linears
from tachylm.model import Transformer
from tachylm.quant import apply_quant_option
from tachylm.quant.io import is_quantized_folder, read_quantized_config
from tachylm.sampling import SamplingParams
from tachylm.steps import Steps
from tachylm.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

__all__ = ["DEFAULT_MODEL", "ChatSession", "ContextFullError", "Engine", "SamplingParams", "TextStream",
           "list_aliases", "load_checkpoint", "pick_device", "pull"]

DEFAULT_CPU_CONTEXT = 4096


class ContextFullError(RuntimeError):
    """The conversation no longer fits in the KV cache."""


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible to PyTorch; "
                         "use --device cpu (or check the driver and the torch build)")
    return device


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read a checkpoint from a local .gguf file or Hugging Face folder."""
    if is_quantized_folder(path):
        raise ValueError(f"{path} is a quantized folder; load it with Engine.load "
                         "(tachylm.build.build_quantized_model)")
    if os.path.isdir(path):
        return read_hf(path)
    if path.endswith(".gguf"):
        return read_gguf(path, dtype=dtype)
    raise ValueError(f"{path}: not a checkpoint; give a .gguf file or a folder with config.json and "
                     "safetensors weights")


@dataclass
class TextStream:
    """Text chunks of one generation; `stats` is complete once iteration ends.

    Attributes:
        token_ids: every generated id so far (including a final stop token).
    """

    generation: Generation
    decoder: StreamDecoder
    stop_ids: frozenset
    on_done: Callable[["TextStream", str], None] | None = None

    def __post_init__(self) -> None:
        self.token_ids: list[int] = []

    @property
    def stats(self) -> GenerationStats:
        return self.generation.stats

    def __iter__(self) -> Iterator[str]:
        chunks = []
        for token in self.generation:
            self.token_ids.append(token)
            if token in self.stop_ids:
                break
            chunk = self.decoder.feed(token)
            if chunk:
                chunks.append(chunk)
                yield chunk
        tail = self.decoder.flush()
        if tail:
            chunks.append(tail)
            yield tail
        if self.on_done is not None:
            self.on_done(self, "".join(chunks))

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(self)


class Engine:
    """A loaded model with its tokenizer, ready to generate.

    Use `Engine.load(...)`; the constructor takes already-built parts.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, device: torch.device,
                 max_seq_len: int, compile: bool = False, source: str = "",
                 chat_template: ChatTemplate | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_seq_len = max_seq_len
        self.source = source
        self.chat_template = chat_template
        config = model.config
        if device.type == "cuda":
            use_fast_linears(model)  # Triton GEMV for decode-sized float matmuls
        cache_dtype = next(model.parameters()).dtype
        self.cache = KVCache(config.n_layers, 1, max_seq_len, config.n_kv_heads, config.head_dim,
                             device=device, dtype=cache_dtype)
        # Eager prefill already meets the prefill targets on a GPU (see BENCHMARKS.md), while
        # compiling it for dynamic lengths costs over a minute; only the decode step is compiled.
        self.steps = Steps(model, self.cache, compile_decode=compile)

    @property
    def config(self):
        return self.model.config

    @classmethod
    def load(cls, ref: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto",
             max_seq_len: int | None = None, compile: bool = False, chat_template_file: str | None = None,
             quant: str | None = None, group_size: int = 128, quant_head: bool = False,
             fold_norms: bool = True, cache_dir: str | None = None,
             progress: Callable[[str], None] | None = None) -> "Engine":
        """Resolve, read and build a model.

        Args:
            ref: alias (e.g. "smollm2-135m-instruct"), local path, or hub repo id.
            device: "auto", "cpu", "cuda", "cuda:1", ...
            dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16".
            max_seq_len: KV-cache length (default: the model's, capped at 4096 on CPU).
            compile: compile prefill and decode with torch.compile.
            chat_template_file: a Jinja2 template overriding the checkpoint's own.
            quant: quantize on the fly ("int8", "fp8", "int4"; round-to-nearest), or None.
            group_size, quant_head: int4 group size; quantize the output head too.
            fold_norms: int8 folds each RMSNorm's weight into the Linear after it (faster
                decode); False keeps the weights (`tachylm.quant.quantize_model`).
            cache_dir: where downloaded models are kept.
            progress: called with progress lines (downloads, loading).
        """
        torch_device = pick_device(device)
        torch_dtype = parse_dtype(dtype, torch_device)
        path = resolve_model(ref, cache_dir=cache_dir, progress=progress)
        if progress:
            progress(f"loading {path}")
        quantized = is_quantized_folder(path)
        if quantized and quant is not None:
            raise ValueError(f"{path} is already quantized; drop --quant")
        if quantized:
            config = read_quantized_config(path)
        else:
            checkpoint = load_checkpoint(path, dtype=torch_dtype)
            config = checkpoint.config
        if max_seq_len is None:
            max_seq_len = config.max_seq_len
            if torch_device.type == "cpu":
                max_seq_len = min(max_seq_len, DEFAULT_CPU_CONTEXT)
        if not 1 < max_seq_len <= config.max_seq_len:
            raise ValueError(f"--max-seq-len must be in [2, {config.max_seq_len}] for this model, "
                             f"got {max_seq_len}")
        if quantized:
            model = build_quantized_model(path, device=torch_device, dtype=torch_dtype,
                                          max_seq_len=max_seq_len)
        else:  # with --quant, build in host memory: only quantized layers land on the device
            model = build_model(checkpoint, device="cpu" if quant else torch_device, dtype=torch_dtype,
                                max_seq_len=max_seq_len)
            apply_quant_option(model, quant, group_size, quant_head, progress, device=torch_device,
                               fold_norms=fold_norms)
        if not quantized and path.endswith(".gguf"):
            # The reader already parsed the GGUF header; its vocabulary is in the metadata.
            tokenizer = Tokenizer.from_gguf_metadata(checkpoint.metadata, source=path)
        else:
            tokenizer = load_tokenizer(path)
        template = None
        if chat_template_file is not None or tokenizer.chat_template is not None:
            template = ChatTemplate.for_tokenizer(tokenizer, chat_template_file)
        return cls(model, tokenizer, device=torch_device, max_seq_len=max_seq_len, compile=compile,
                   source=path, chat_template=template)

    def encode_prompt(self, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids for a one-shot prompt: through the chat template when `chat` and the model
        has one, else the raw text (with BOS if the tokenizer adds one)."""
        if chat and self.chat_template is not None:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            return self.tokenizer.encode(self.chat_template.render(messages), add_special=False)
        if system:
            raise ValueError("a system prompt needs a chat template; drop --system or --raw")
        return self.tokenizer.encode(prompt, add_special=True)

    def generate_ids(self, prompt_ids: list[int], *, max_new_tokens: int = 256,
                     params: SamplingParams | None = None, start_pos: int = 0,
                     history: list[int] = ()) -> TextStream:
        """Stream text for already-tokenized input placed at `start_pos` in the cache."""
        params = params or SamplingParams()
        generation = Generation(self.steps, prompt_ids, max_new_tokens, params,
                                stop_ids=self.tokenizer.stop_ids, start_pos=start_pos, history=history)
        decoder = StreamDecoder(self.tokenizer, context_ids=prompt_ids)
        return TextStream(generation, decoder, frozenset(self.tokenizer.stop_ids))

    def generate(self, prompt: str, *, max_new_tokens: int = 256, params: SamplingParams | None = None,
                 chat: bool = True, system: str | None = None) -> TextStream:
        """Stream the reply to one prompt (see `encode_prompt` for `chat` and `system`)."""
        ids = self.encode_prompt(prompt, chat=chat, system=system)
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prompt is {len(ids)} tokens, the context holds {self.max_seq_len}; "
                             "shorten it or raise --max-seq-len")
        return self.generate_ids(ids, max_new_tokens=max_new_tokens, params=params)

    def chat(self, system: str | None = None) -> "ChatSession":
        """Start a multi-turn conversation that keeps its history in the KV cache."""
        if self.chat_template is None:
            raise ValueError(f"{self.source}: the model has no chat template; pass --chat-template FILE")
        return ChatSession(self, system)


class ChatSession:
    """A conversation whose earlier turns stay in the KV cache.

    Each turn renders the whole conversation with the chat template, keeps the longest prefix
    already in the cache, and prefills only the rest.
    """

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cached_ids: list[int] = []  # ids whose keys/values are in cache positions 0..n-1

    def reset(self) -> None:
        system = [m for m in self.messages if m["role"] == "system"]
        self.messages = system
        self.cached_ids = []

    def send(self, text: str, *, max_new_tokens: int = 512,
             params: SamplingParams | None = None) -> TextStream:
        """Add a user turn and stream the assistant's reply.

        Raises:
            ContextFullError: the conversation does not fit in the cache any more.
        """
        engine = self.engine
        messages = self.messages + [{"role": "user", "content": text}]
        ids = engine.tokenizer.encode(engine.chat_template.render(messages), add_special=False)
        if len(ids) >= engine.max_seq_len:
            raise ContextFullError(
                f"the conversation is {len(ids)} tokens and the context holds {engine.max_seq_len}; "
                "type /reset to start over (or restart with a larger --max-seq-len)")
        keep = 0
        limit = min(len(ids) - 1, len(self.cached_ids))
        while keep < limit and ids[keep] == self.cached_ids[keep]:
            keep += 1
        stream = engine.generate_ids(ids[keep:], max_new_tokens=max_new_tokens, params=params,
                                     start_pos=keep, history=ids[:keep])

        def remember(done: TextStream, reply: str) -> None:
            self.cached_ids = (ids + done.token_ids)[:done.stats.end_pos]
            self.messages = messages + [{"role": "assistant", "content": reply}]

        stream.on_done = remember
        return stream
