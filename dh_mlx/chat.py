"""Chat templates: the jinja2 template of a `tokenizer_config.json`, rendered as transformers renders it."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any


class ChatTemplateError(ValueError):
    """A chat template that cannot render these messages (its own `raise_exception`, or a jinja2 error)."""


#: What rendering one chat template may take: its output (characters), the calls it makes (macros, filters,
#: functions), how deeply they nest, the iterations of its range() loops, and the seconds it runs.
TEMPLATE_LIMITS = {"output": 16 << 20, "calls": 200_000, "depth": 64, "iterations": 1_000_000, "seconds": 10.0}


def _bounded_environment():
    """A jinja2 sandbox (no Python reachable) that also bounds the work a template can do: a value it builds
    past the output limit, or a call, loop or time budget exceeded, is a ChatTemplateError."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    limits = TEMPLATE_LIMITS

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def __init__(self, **options):
            super().__init__(**options)
            self.calls = self.depth = self.iterations = 0
            self.start = time.perf_counter()
            self.globals["range"] = self._range

        def _budget(self) -> None:
            if time.perf_counter() - self.start > limits["seconds"]:
                raise ChatTemplateError(f"ran for more than {limits['seconds']:g} s")

        def _small(self, value):
            if isinstance(value, (str, list, tuple, dict)) and len(value) > limits["output"]:
                raise ChatTemplateError(f"built a value of {len(value):,} items, more than the "
                                        f"{limits['output']:,} a template may")
            return value

        def _range(self, *args):
            for i in range(*args):
                self.iterations += 1
                if self.iterations > limits["iterations"]:
                    raise ChatTemplateError(f"looped more than {limits['iterations']:,} times")
                if self.iterations % 4096 == 0:
                    self._budget()
                yield i

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja2's signature)
            __self.calls += 1
            if __self.calls > limits["calls"]:
                raise ChatTemplateError(f"made more than {limits['calls']:,} calls")
            if __self.calls % 1024 == 0:
                __self._budget()
            __self.depth += 1
            try:
                if __self.depth > limits["depth"]:
                    raise ChatTemplateError(f"nested calls more than {limits['depth']} deep")
                return __self._small(super().call(__context, __obj, *args, **kwargs))
            finally:
                __self.depth -= 1

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise ChatTemplateError(f"raised a number to the power {right}")
            if operator == "*" and isinstance(left, (str, list)) and isinstance(right, int):
                self._small(range(len(left) * right))  # before the product is built
            if operator == "*" and isinstance(right, (str, list)) and isinstance(left, int):
                self._small(range(len(right) * left))
            return self._small(super().call_binop(context, operator, left, right))

        def getattr(self, obj, attribute):
            return self._small(super().getattr(obj, attribute))

        def getitem(self, obj, argument):
            return self._small(super().getitem(obj, argument))

    return Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
           tools: list[dict] | None = None, documents: list[dict] | None = None, where: str = "chat template",
           **variables: Any) -> str:
    """The text of `messages` ({"role", "content"} dicts) under `template`, as transformers renders it: keys
    whose value is None dropped from the messages, `tools` (JSON schemas) and `documents` passed (None when
    absent); `variables` are the special-token strings (bos_token, ...) and the template's own switches
    (e.g. `enable_thinking`, `thinking`). Sandboxed: a template can call no Python, and its work is bounded
    (TEMPLATE_LIMITS); any failure is a ChatTemplateError naming `where`."""
    import jinja2

    def raise_exception(message: str):
        raise ChatTemplateError(f"{where}: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _bounded_environment()
    env.filters["tojson"] = tojson  # as transformers defines it: plain JSON, no HTML escaping
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    out, size = [], 0
    try:
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        for piece in env.from_string(template).generate(messages=messages, tools=tools, documents=documents,
                                                        add_generation_prompt=add_generation_prompt, **variables):
            size += len(piece)
            if size > TEMPLATE_LIMITS["output"]:
                raise ChatTemplateError(f"wrote more than {TEMPLATE_LIMITS['output']:,} characters")
            out.append(piece)
    except ChatTemplateError as e:
        raise ChatTemplateError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{where}: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError, IndexError, RecursionError,
            MemoryError) as e:  # a template's own mistakes, e.g. {% include %} with no loader to read from
        raise ChatTemplateError(f"{where}: {type(e).__name__}: {str(e)[:200]}") from None
    return "".join(out)


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
