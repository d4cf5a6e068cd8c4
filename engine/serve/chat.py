"""Chat templates: finding a checkpoint's own, and rendering it in jinja2's sandbox.

Where a template comes from, first found wins: `--chat-template` (a file, or the template
itself), the folder's chat_template.jinja, chat_template.json, tokenizer_config.json's
`chat_template` (a string, or a list of named templates: "default"). Templates render as
transformers renders them (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loop controls, `tojson`, `raise_exception`, `strftime_now`), with the tokenizer's special
tokens as variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, RequestError

# For checkpoints aphro builds itself (the built-in tiny model): their tokenizer has none.
SIMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class ChatTemplateError(RequestError):
    """The template refused these messages (raise_exception) or failed on them."""


def find_chat_template(model_dir: str | Path, override: str | None = None) -> str | None:
    """The template source for this checkpoint, or None when it has none."""
    if override is not None:
        path = Path(override)
        if path.is_file():
            return path.read_text(encoding="utf-8")
        if "{{" in override or "{%" in override:
            return override
        raise ConfigError(f"--chat-template {override!r}: no such file, and not a template "
                          "(a Jinja template has {{ ... }} or {% ... %})")
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{file}: cannot read its chat_template: {e}") from e
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template:
            return template
    return None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


class ChatTemplate:
    """A compiled template; `render(messages)` is the prompt text (special tokens included)."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]) -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ConfigError(f"the chat template does not compile: {e}") from e
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **kwargs: Any) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, tools=tools,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **kwargs)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template refused these messages: {e}") from e
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: "
                                    f"{type(e).__name__}: {e}") from e


def special_tokens_of(tokenizer) -> dict[str, str | None]:
    """bos_token, eos_token, unk_token, pad_token as strings (the template's variables)."""
    return {name: _as_str(getattr(tokenizer, name, None))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")}


def _as_str(token) -> str | None:
    return None if token is None else str(getattr(token, "content", token))
