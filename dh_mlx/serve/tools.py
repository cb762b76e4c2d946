"""Tool calls in DeepSeek's format, out of a reply's text: what follows `<｜tool▁calls▁begin｜>` is one
`<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>` per call, either V3's `function<｜tool▁sep｜>NAME` and the arguments
in a ```json fence, or V3.1's and later `NAME<｜tool▁sep｜>ARGUMENTS`."""

from __future__ import annotations

import json
import re
import uuid

CALLS_BEGIN, CALL_BEGIN, CALL_END, SEP = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                                          "<｜tool▁sep｜>")
_FENCE = re.compile(r"^\s*(\S+)\s*\n```(?:json)?\s*\n(.*?)\n?```\s*$", re.S)


def split_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the content before any tool call, [OpenAI tool_calls entries]); no calls: (text, [])."""
    at = text.find(CALLS_BEGIN)
    if at < 0:
        return text, []
    content, calls = text[:at], []
    for body in re.findall(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(CALL_END), text[at:], flags=re.S):
        kind, _, rest = body.partition(SEP)
        if kind.strip() == "function" and (m := _FENCE.match(rest)):
            name, arguments = m.group(1), m.group(2)
        else:
            name, arguments = kind.strip(), rest.strip()
        try:
            arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
        except ValueError:
            pass  # passed on as written: the client sees what the model produced
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": arguments}})
    return content, calls
