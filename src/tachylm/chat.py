"""Chat templates: turn a list of messages into the prompt text the checkpoint was trained on.

The template is the checkpoint's own Jinja2 template (``tokenizer.chat_template`` in GGUF,
``chat_template`` in ``tokenizer_config.json``) or a file the user passes. It runs in Jinja2's
immutable sandbox with the same settings and helpers Hugging Face provides (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a non-HTML-escaping ``tojson``), so
templates written for ``transformers`` render the same text here. There is no built-in default:
a checkpoint without a template is an error that says what to do.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tachylm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplate:
    """A compiled chat template.

    Args:
        template_str: the Jinja2 template text.
        bos_token: the text of the BOS token, exposed to the template as ``bos_token``.
        eos_token: the text of the EOS token, exposed as ``eos_token``.
        source: where the template came from, for messages.

    Raises:
        ValueError: if the template does not parse.
    """

    def __init__(self, template_str: str, bos_token: str | None = None, eos_token: str | None = None,
                 source: str = "chat template") -> None:
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = self._raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(template_str)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"{source}: chat template does not parse (line {err.lineno}: {err.message}); "
                             "fix the template or pass another with --chat-template FILE") from err

    @classmethod
    def from_file(cls, path: str | Path, bos_token: str | None = None,
                  eos_token: str | None = None) -> ChatTemplate:
        """Read a Jinja2 chat template file.

        Args:
            path: the template file.
            bos_token: text of the BOS token for the template.
            eos_token: text of the EOS token for the template.

        Returns:
            The compiled template.

        Raises:
            ValueError: if the file does not exist or does not parse.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: chat template file not found; pass an existing Jinja2 file "
                             "to --chat-template")
        return cls(path.read_text(encoding="utf-8"), bos_token, eos_token, source=str(path))

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, template_file: str | Path | None = None) -> ChatTemplate:
        """The chat template to use with a checkpoint's tokenizer.

        Args:
            tokenizer: the checkpoint's tokenizer; supplies the template and the BOS/EOS text.
            template_file: a template file that overrides the checkpoint's own.

        Returns:
            The compiled template.

        Raises:
            ValueError: if there is neither a file nor a template in the checkpoint.
        """
        bos = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
        eos = tokenizer.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
        if template_file is not None:
            return cls.from_file(template_file, bos, eos)
        if tokenizer.chat_template is None:
            raise ValueError(f"{tokenizer.source}: the checkpoint has no chat template, and tachylm does "
                             "not guess one; pass --chat-template FILE (a Jinja2 chat template) or use "
                             "plain `generate` with a raw prompt")
        return cls(tokenizer.chat_template, bos, eos, source=f"{tokenizer.source} (chat template)")

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a conversation to prompt text.

        Args:
            messages: dicts with ``role`` (system, user, assistant or tool) and ``content`` (str);
                other keys are passed through to the template.
            add_generation_prompt: end with the header that opens the assistant's turn.

        Returns:
            The prompt text. It already contains the BOS token if the template writes one, so
            encode it with ``add_special=False``.

        Raises:
            ValueError: for malformed messages, or when the template itself rejects the conversation.
        """
        validate_messages(messages)
        return self._template.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)

    def _raise_exception(self, message: str) -> None:
        raise ValueError(f"{self.source}: the chat template rejected the conversation: {message}")


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Check the shape of a conversation.

    Args:
        messages: the conversation.

    Raises:
        ValueError: naming the first bad message and what is wrong with it.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; pass at least one {'role': 'user', 'content': ...} message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}) content must be a string, "
                             f"got {type(content).__name__}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes <, >, & and ', which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)
