"""The OpenAI request bodies the server takes, checked field by field into engine requests; a bad field is an
`APIError` that becomes OpenAI's error body ({"error": {"message", "type", "param", "code"}}) with a 4xx status.
Typed dataclasses, no HTTP here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..generation.options import SamplingOptions


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """What a completion request asks for, checked."""

    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    domain: Any = None  # a name, "auto" or None
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", ...}
    tools: list[dict] | None = None
    tool_choice: Any = None
    template_args: dict = field(default_factory=dict)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not low <= v <= high:
        raise APIError(f"{name} must be a number in [{low}, {high}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise APIError(f"{name} must be an integer in [{low}, {high}], got {v!r}", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > 16 or not all(isinstance(s, str) and s for s in items):
        raise APIError("stop must be a non-empty string or a list of up to 16 of them", "stop")
    return tuple(items)


def parse_common(body: Any, *, chat: bool) -> Parsed:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    if _integer(body, "n", 1, 1, 1) != 1:
        raise APIError("n must be 1", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError("stream_options must be an object with include_usage true or false", "stream_options")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, None, 1, 1 << 30)
    try:
        sampling = SamplingOptions(
            temp=_number(body, "temperature", 1.0 if chat else 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
            top_k=max(_integer(body, "top_k", 0, -1, 1 << 20), 0),  # -1 (vLLM's "off") or 0: off
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-6, 100.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            seed=_integer(body, "seed", None, 0, 2**63 - 1))
    except ValueError as e:
        raise APIError(str(e)) from None
    if chat:
        wants = body.get("logprobs", False)
        if not isinstance(wants, bool):
            raise APIError("logprobs must be true or false", "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, 20)
        if top and not wants:
            raise APIError("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = top if wants else None
    else:
        logprobs = _integer(body, "logprobs", None, 0, 20)
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise APIError("response_format.type must be text, json_object or json_schema", "response_format")
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise APIError("response_format.json_schema must be an object with a schema object",
                               "response_format.json_schema")
        fmt = None if fmt["type"] == "text" else fmt
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise APIError("tools must be a list of {\"type\": \"function\", \"function\": {\"name\", ...}}", "tools")
    args = body.get("chat_template_kwargs") or {}
    if not isinstance(args, dict):
        raise APIError("chat_template_kwargs must be an object", "chat_template_kwargs")
    domain = body.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise APIError("domain must be a domain's name or \"auto\"", "domain")
    return Parsed(stream=stream, include_usage=bool(options.get("include_usage")), max_tokens=max_tokens,
                  sampling=sampling, stop=_stop(body), logprobs=logprobs, domain=domain,
                  response_format=fmt, tools=tools or None, tool_choice=body.get("tool_choice"),
                  template_args=args)


ROLES = ("system", "user", "assistant", "tool", "developer")


def parse_messages(body: dict) -> list[dict]:
    """OpenAI messages -> the chat template's: text parts joined; `developer` is the system role."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", "messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(f"messages[{k}].role must be one of {', '.join(ROLES)}", f"messages[{k}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"messages[{k}].content: only text parts are supported", f"messages[{k}].content")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise APIError(f"messages[{k}].content must be text", f"messages[{k}].content")
        if content is None and not m.get("tool_calls"):
            raise APIError(f"messages[{k}].content is missing", f"messages[{k}].content")
        msg = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        for key in ("tool_calls", "tool_call_id", "name", "reasoning_content"):
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    return out


def parse_prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise APIError("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")
