"""Chat templates: the jinja2 template of a `tokenizer_config.json`, rendered as transformers renders it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


class ChatTemplateError(ValueError):
    """A chat template that cannot render these messages (its own `raise_exception`, or a jinja2 error)."""


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
           tools: list[dict] | None = None, documents: list[dict] | None = None, **variables: Any) -> str:
    """The text of `messages` ({"role", "content"} dicts) under `template`, as transformers renders it: keys
    whose value is None dropped from the messages, `tools` (JSON schemas) and `documents` passed (None when
    absent); `variables` are the special-token strings (bos_token, ...) and the template's own switches
    (e.g. `enable_thinking`, `thinking`). Sandboxed: a template can call no Python."""
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
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return env.from_string(template).render(messages=messages, tools=tools, documents=documents,
                                                add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from None


ROLES = ("system", "user", "assistant")
# What a chat template of a release may also be handed: tool results, the assistant's reasoning and tool calls.
TOOL_ROLES = ROLES + ("tool",)
_OPTIONAL = {"reasoning_content": str, "tool_calls": list, "tool_call_id": str, "name": str}


def check_messages(messages: list[dict], *, tools: bool = False) -> list[dict]:
    """`messages` if each is {"role": system|user|assistant, "content": text}; else a ValueError naming it.
    `tools` (a release's template): also the "tool" role, and `reasoning_content`, `tool_calls` (an assistant
    message's content may then be absent), `tool_call_id` and `name`."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("a conversation needs at least one message")
    roles = TOOL_ROLES if tools else ROLES
    for k, m in enumerate(messages):
        calls = tools and isinstance(m, dict) and m.get("tool_calls")
        if not isinstance(m, dict) or m.get("role") not in roles or not (
                isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            raise ChatTemplateError(f"messages[{k}] must be {{\"role\": one of {', '.join(roles)}, "
                                    "\"content\": text}")
        for key, kind in _OPTIONAL.items():
            if tools and m.get(key) is not None and not isinstance(m[key], kind):
                raise ChatTemplateError(f"messages[{k}].{key} must be {'text' if kind is str else 'a list'}")
    return messages


def messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: the system message (if any), then the user's prompt."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
