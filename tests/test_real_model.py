"""The default real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against Hugging Face transformers."""

import pytest
import torch

from tachylm.checkpoints.resolve import DEFAULT_MODEL, resolve_model
from tachylm.engine import Engine
from tachylm.sampling import SamplingParams

pytestmark = pytest.mark.slow
GREEDY = SamplingParams.greedy_params()


@pytest.fixture(scope="module")
def engine():
    return Engine.load(DEFAULT_MODEL, device="cpu", dtype="float32", max_seq_len=1024)


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = resolve_model(DEFAULT_MODEL, allow_download=False)
    folder, name = path.rsplit("/", 1)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()


def test_greedy_output_matches_transformers(engine, hf_model):
    ids = engine.encode_prompt("Write a short story about a robot who learns to paint.")
    stream = engine.generate_ids(ids, max_new_tokens=40, params=GREEDY)
    text = stream.text()
    ours = stream.token_ids
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                   eos_token_id=sorted(engine.tokenizer.stop_ids))[0, len(ids):].tolist()
    assert len(ours) >= 32 and len(theirs) >= 32
    assert ours[:32] == theirs[:32], text
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits
        got = engine.model(torch.tensor([ids]))
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_chat_keeps_history_in_the_cache(engine):
    session = engine.chat()
    first = session.send("Name one primary colour.", max_new_tokens=24, params=GREEDY).text()
    assert first.strip()
    cached_before = list(session.cached_ids)
    stream = session.send("And another one?", max_new_tokens=24, params=GREEDY)
    second = stream.text()
    # The second turn prefilled only what follows the cached conversation.
    assert stream.generation.start_pos > 0
    assert stream.generation.start_pos >= len(cached_before) - 2
    assert session.cached_ids[:stream.generation.start_pos] == cached_before[:stream.generation.start_pos]
    # Same reply as a fresh prefill of the whole conversation.
    messages = session.messages[:-1]
    ids = engine.tokenizer.encode(engine.chat_template.render(messages), add_special=False)
    fresh = engine.generate_ids(ids, max_new_tokens=24, params=GREEDY).text()
    assert fresh == second


def test_context_full_is_reported(engine):
    small = Engine(engine.model, engine.tokenizer, device=engine.device, max_seq_len=48,
                   chat_template=engine.chat_template)
    session = small.chat()
    stream = session.send("Tell me a long story.", max_new_tokens=100, params=GREEDY)
    stream.text()
    assert stream.stats.stop_reason == "context_full"
    from tachylm.engine import ContextFullError
    with pytest.raises(ContextFullError, match="/reset"):
        session.send("More please, " * 10)
