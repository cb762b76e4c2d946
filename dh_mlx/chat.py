"""Chat templates: the jinja2 template of a `tokenizer_config.json`, rendered as transformers renders it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


class ChatTemplateError(ValueError):
    """A chat template that cannot render these messages (its own `raise_exception`, or a jinja2 error)."""


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
           **tokens: Any) -> str:
    """The text of `messages` ({"role", "content"} dicts) under `template`; `tokens` are the special-token
    strings the template may use (bos_token, eos_token, ...). Sandboxed: a template can call no Python."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ChatTemplateError(f"chat template: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson  # as transformers defines it: plain JSON, no HTML escaping
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **tokens)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from None


ROLES = ("system", "user", "assistant")


def check_messages(messages: list[dict]) -> list[dict]:
    """`messages` if each is {"role": system|user|assistant, "content": text}; else a ValueError naming it."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("a conversation needs at least one message")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"messages[{k}] must be {{\"role\": one of {', '.join(ROLES)}, "
                                    "\"content\": text}")
    return messages


def messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: the system message (if any), then the user's prompt."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
