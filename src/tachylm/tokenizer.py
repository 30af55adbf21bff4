"""Tokenizers: one `Tokenizer` protocol over Hugging Face ``tokenizer.json`` folders and GGUF vocabularies.

Every front end sees the same small surface: `encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`,
`stop_ids`, `add_bos`, `id_to_token` and `chat_template`. Underneath sits a `tokenizers.Tokenizer`,
either loaded from ``tokenizer.json`` or rebuilt from the GGUF vocabulary:

* GGUF ``tokenizer.ggml.model == "gpt2"``: byte-level BPE, pre-tokenizer chosen by
  ``tokenizer.ggml.pre`` (see `GPT2_PRE_TOKENIZERS`).
* GGUF ``tokenizer.ggml.model == "llama"``: SentencePiece BPE with byte fallback; merges are derived
  from the piece scores, spaces become ``▁``.

`StreamDecoder` turns a stream of token ids into text chunks for streaming output without ever
emitting half a UTF-8 character.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# Token names that end a turn in the chat formats we know; added to `stop_ids` when the
# vocabulary has them as special (added / control) tokens.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
    "<end_of_turn>", "<|end|>", "</s>",
)

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 differs from Llama 3 only in splitting numbers into single digits.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _regex_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _gpt2_bytes() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's own regex is GPT-2's.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm() -> pre_tokenizers.PreTokenizer:
    # SmolLM2's own tokenizer.json isolates every digit before the GPT-2 split.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


# `tokenizer.ggml.pre` -> (normalizer or None, pre-tokenizer factory, ignore_merges).
# Llama 3 looks whole words up in the vocabulary before merging (its tokenizer.json sets
# ignore_merges); Qwen2 NFC-normalizes its input.
GPT2_PRE_TOKENIZERS: dict[str, tuple[Any, Any, bool]] = {
    "default": (None, _gpt2_bytes, False),
    "gpt2": (None, _gpt2_bytes, False),
    "smollm": (None, _smollm, False),
    "llama-bpe": (None, lambda: _regex_then_bytes(_LLAMA3_REGEX), True),
    "llama3": (None, lambda: _regex_then_bytes(_LLAMA3_REGEX), True),
    "llama-v3": (None, lambda: _regex_then_bytes(_LLAMA3_REGEX), True),
    "qwen2": (normalizers.NFC, lambda: _regex_then_bytes(_QWEN2_REGEX), False),
}
SUPPORTED_GGUF_MODELS = ("gpt2", "llama")


class Tokenizer:
    """The tokenizer every front end uses.

    Build it with `from_hf_dir`, `from_gguf_metadata` or `load_tokenizer`; the constructor takes an
    already configured `tokenizers.Tokenizer`.

    Args:
        backend: the `tokenizers.Tokenizer` doing the work; special tokens must be registered as
            added tokens so that text such as ``"<|im_start|>"`` maps to its id.
        bos_id: beginning-of-sequence id, or None.
        eos_id: end-of-sequence id, or None.
        add_bos: whether `encode(..., add_special=True)` prepends `bos_id`.
        stop_ids: ids that end generation (eos and end-of-turn tokens).
        chat_template: the checkpoint's own Jinja chat template, or None.
        source: the file or folder it came from, for messages.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, stop_ids: Iterable[int], chat_template: str | None = None,
                 source: str = "tokenizer") -> None:
        if add_bos and bos_id is None:
            raise ValueError(f"{source}: add_bos is set but the tokenizer has no BOS token; "
                             "set add_bos_token to false or define bos_token")
        self._backend = backend
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._add_bos = add_bos
        self._stop_ids = frozenset(stop_ids)
        self.chat_template = chat_template
        self.source = source

    # -- protocol ---------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Turn text into token ids.

        Special tokens written in the text (``"<|im_start|>"``) become their ids, which chat
        templates rely on.

        Args:
            text: the text.
            add_special: prepend BOS when the tokenizer asks for it (`add_bos`). Leave False for
                rendered chat templates that already write the BOS token themselves.

        Returns:
            The token ids.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special and self._add_bos:
            ids = [self._bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Turn token ids back into text.

        Args:
            ids: token ids.
            skip_special: drop special tokens (BOS, ``<|im_end|>``, ...) from the text.

        Returns:
            The text; bytes that do not form complete UTF-8 characters show as U+FFFD.
        """
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of one id (``"Ġthe"``, ``"▁the"``, ``"<|im_end|>"``).

        Raises:
            ValueError: if the id is outside the vocabulary.
        """
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"{self.source}: token id {token_id} is outside the vocabulary "
                             f"(size {self.vocab_size})")
        return token

    def save_hf(self, folder: str | Path) -> None:
        """Write this tokenizer in Hugging Face form, which `from_hf_dir` reads back identically.

        Writes tokenizer.json, tokenizer_config.json (bos/eos, add_bos_token, chat_template) and
        generation_config.json (every stop id) into an existing `folder`.
        """
        folder = Path(folder)
        self._backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {"add_bos_token": self.add_bos}
        if self.bos_id is not None:
            config["bos_token"] = self.id_to_token(self.bos_id)
        if self.eos_id is not None:
            config["eos_token"] = self.id_to_token(self.eos_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        for name, data in (("tokenizer_config.json", config),
                           ("generation_config.json", {"eos_token_id": sorted(self.stop_ids)})):
            (folder / name).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n",
                                       encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        """Number of ids in the vocabulary, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None."""
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: eos plus the end-of-turn tokens the vocabulary has."""
        return self._stop_ids

    @property
    def add_bos(self) -> bool:
        """Whether a prompt should start with BOS (`encode(..., add_special=True)` adds it)."""
        return self._add_bos

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder.

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (bos/eos tokens,
        ``add_bos_token``, ``chat_template``), ``chat_template.jinja`` and ``generation_config.json``
        (extra eos ids) when present.

        Args:
            path: the folder.

        Returns:
            The tokenizer.

        Raises:
            ValueError: if ``tokenizer.json`` is missing or a configured special token is not in it.
        """
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{folder}: no tokenizer.json; tachylm needs the fast-tokenizer file "
                             "(save it with transformers' tokenizer.save_pretrained)")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        def special_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            if token is None:
                return None
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{folder / 'tokenizer_config.json'}: {key} {token!r} is not in "
                                 "tokenizer.json; fix the config or the vocabulary")
            return token_id

        bos_id = special_id("bos_token")
        eos_id = special_id("eos_token")
        generation_eos = generation.get("eos_token_id")
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        if eos_id is None and generation_eos:
            eos_id = generation_eos[0]

        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            # No explicit flag: the tokenizer.json post-processor is the file's own answer.
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id

        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        stop_ids = _stop_ids(eos_id, specials, generation_eos)
        return cls(backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, stop_ids=stop_ids,
                   chat_template=_hf_chat_template(folder, config), source=str(folder))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "file.gguf") -> Tokenizer:
        """Rebuild the tokenizer stored in GGUF metadata.

        Args:
            meta: all GGUF key/values as plain Python values (``tokenizer.ggml.*`` keys).
            source: the file name, for messages.

        Returns:
            The tokenizer.

        Raises:
            ValueError: for a missing key, an unsupported ``tokenizer.ggml.model`` or
                ``tokenizer.ggml.pre``, or malformed vocabulary data.
        """
        def require(key: str) -> Any:
            if key not in meta:
                raise ValueError(f"{source}: GGUF metadata has no {key!r}; the file carries no usable "
                                 "tokenizer (re-convert it with llama.cpp's convert_hf_to_gguf.py)")
            return meta[key]

        kind = require("tokenizer.ggml.model")
        tokens = list(require("tokenizer.ggml.tokens"))
        types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                             f"{len(tokens)} tokens; the file is corrupted")

        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, list(require("tokenizer.ggml.merges")),
                                      meta.get("tokenizer.ggml.pre", "default"), source)
            default_add_bos = False
        elif kind == "llama":
            scores = list(require("tokenizer.ggml.scores"))
            backend = _sentencepiece_bpe(tokens, scores, types, meta, source)
            default_add_bos = True
        else:
            raise ValueError(f"{source}: unsupported tokenizer.ggml.model {kind!r}. Supported: "
                             f"{', '.join(SUPPORTED_GGUF_MODELS)}")

        special_types = (_CONTROL, _UNKNOWN)
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t in special_types])
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                            for i, t in enumerate(types) if t == _USER_DEFINED])

        def token_id(key: str) -> int | None:
            value = meta.get(key)
            if value is not None and not 0 <= value < len(tokens):
                raise ValueError(f"{source}: {key} = {value} is outside the vocabulary of "
                                 f"{len(tokens)} tokens; the file is corrupted")
            return value

        bos_id = token_id("tokenizer.ggml.bos_token_id")
        eos_id = token_id("tokenizer.ggml.eos_token_id")
        if "tokenizer.ggml.add_bos_token" in meta:
            add_bos = bool(meta["tokenizer.ggml.add_bos_token"])  # Tokenizer() checks bos_id exists
        else:  # older files: llama.cpp's defaults, BOS for SentencePiece vocabularies only
            add_bos = default_add_bos and bos_id is not None
        extra_stops = [i for i in (token_id("tokenizer.ggml.eot_token_id"),
                                   token_id("tokenizer.ggml.eom_token_id")) if i is not None]
        specials = {tokens[i]: i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)}
        return cls(backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                   stop_ids=_stop_ids(eos_id, specials, extra_stops),
                   chat_template=meta.get("tokenizer.chat_template"), source=source)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint.

    Args:
        path: a Hugging Face folder (with ``tokenizer.json``) or a ``.gguf`` file.

    Returns:
        The tokenizer.

    Raises:
        ValueError: if the path is neither.
    """
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    if path.is_file() and path.suffix == ".gguf":
        from tachylm.checkpoints.gguf import read_gguf_metadata

        return Tokenizer.from_gguf_metadata(read_gguf_metadata(path), source=str(path))
    raise ValueError(f"{path}: not a tokenizer source; pass a Hugging Face checkpoint folder "
                     "containing tokenizer.json or a .gguf file")


class StreamDecoder:
    """Incremental detokenizer for streaming: feed ids one by one, get back only new complete text.

    Keeps a small window: the ids of the last emitted chunk plus the ids not yet emitted. Each step
    emits ``decode(window) - decode(emitted part of the window)``, so SentencePiece's "strip the
    leading space" rule and multi-token UTF-8 characters come out right while each step decodes
    only a handful of ids. The window always starts on a character boundary (where an earlier chunk
    ended), because byte-fallback decoding turns a whole run of bytes into U+FFFD when the run
    starts mid-character. Text whose decoding ends in U+FFFD (an incomplete UTF-8 sequence) is held
    back until the character completes.

    Args:
        tokenizer: the tokenizer.
        context_ids: ids that precede the stream (the prompt tail); they are never emitted but give
            the first generated token its leading space right (``"▁Paris"`` -> ``" Paris"``).
    """

    _CONTEXT = 4  # prompt ids kept as context
    _MAX_PENDING = 8  # a UTF-8 character is at most 4 bytes; beyond this the U+FFFD is real

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        context = list(context_ids)[-self._CONTEXT:]
        while context and tokenizer.decode(context).startswith("\ufffd"):
            context.pop(0)  # cut mid-character: move the start to the next boundary
        self._ids = context
        self._read = len(context)  # ids before this index are emitted (or context)

    def feed(self, token_id: int) -> str:
        """Add one id.

        Args:
            token_id: the next generated id.

        Returns:
            The newly completed text, possibly empty.
        """
        self._ids.append(token_id)
        return self._emit(force=len(self._ids) - self._read > self._MAX_PENDING)

    def flush(self) -> str:
        """End of stream: return whatever is held back (an incomplete character shows as U+FFFD).

        Returns:
            The remaining text, possibly empty.
        """
        return self._emit(force=True)

    def _emit(self, force: bool) -> str:
        done = self._tokenizer.decode(self._ids[:self._read])
        text = self._tokenizer.decode(self._ids)
        if not force and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""
        del self._ids[:self._read]  # the chunk just emitted becomes the next step's context
        self._read = len(self._ids)
        return text[len(done):]


# -- helpers ----------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err}); fix or remove the file") from err


def _hf_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        if "default" not in named:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template lists {sorted(named)} "
                             "but no 'default'; pass --chat-template FILE")
        template = named["default"]
    return template


def _stop_ids(eos_id: int | None, specials: Mapping[str, int], extra: Iterable[int]) -> set[int]:
    stops = {specials[name] for name in END_OF_TURN_TOKENS if name in specials}
    stops.update(extra)
    if eos_id is not None:
        stops.add(eos_id)
    return stops


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str, source: str) -> tokenizers.Tokenizer:
    if pre not in GPT2_PRE_TOKENIZERS:
        raise ValueError(f"{source}: unsupported tokenizer.ggml.pre {pre!r} for a gpt2 (byte-level BPE) "
                         f"vocabulary. Supported: {', '.join(sorted(GPT2_PRE_TOKENIZERS))}")
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{source}: malformed tokenizer.ggml.merges entry {merge!r} "
                             "(expected two tokens separated by one space)")
        pairs.append((parts[0], parts[1]))
    normalizer, pre_tokenizer, ignore_merges = GPT2_PRE_TOKENIZERS[pre]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    if normalizer is not None:
        backend.normalizer = normalizer()
    backend.pre_tokenizer = pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int],
                       meta: Mapping[str, Any], source: str) -> tokenizers.Tokenizer:
    if len(scores) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for "
                         f"{len(tokens)} tokens; the file is corrupted")
    vocab = {token: i for i, token in enumerate(tokens)}
    # SentencePiece BPE repeatedly joins the adjacent pair whose joined piece scores highest.
    # As BPE merges: every split of a normal piece into two normal pieces, ranked by the
    # joined piece's score (ties by id).
    normal = {token for token, t in zip(tokens, types) if t == _NORMAL}
    ranked = []
    for piece_id, (piece, piece_type) in enumerate(zip(tokens, types)):
        if piece_type != _NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[piece_id], piece_id, cut, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]

    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    has_bytes = all(f"<0x{b:02X}>" in vocab for b in range(256))
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True,
                                              byte_fallback=has_bytes))
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer rather than the Metaspace pre-tokenizer: Metaspace skips the prefix when the
    # text already starts with a space, SentencePiece does not (" hi" -> "▁▁hi"). Normalizers run
    # on each text run between special tokens, so the text after "<s>" or "[INST]" gets its
    # prefix too, as in llama.cpp.
    spaces = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        spaces.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(spaces)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend
