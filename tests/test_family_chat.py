"""Chat templates with thinking and tool sections, in the styles GLM-4.7/GLM-5 and Kimi-K2.5 ship (written here:
no release file is downloaded): our text and ids equal transformers' apply_chat_template's, with tools, tool
results, reasoning and the templates' own switches; `generate --chat --chat-template-args` passes them."""

import json
import os
import subprocess
import sys

import pytest

from dh_mlx.chat import ChatTemplateError
from dh_mlx.tokenizer import load_tokenizer
from helpers import make_bpe_tokenizer

transformers = pytest.importorskip("transformers")

GLM_STYLE = (
    "[gMASK]<sop>"
    "{%- if tools -%}<|system|>\n# Tools\n{% for tool in tools %}{{ tool | tojson(ensure_ascii=False) }}\n"
    "{% endfor %}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}<|system|>\n{{ m.content }}"
    "{%- elif m.role == 'user' -%}<|user|>\n{{ m.content }}"
    "{%- elif m.role == 'assistant' -%}<|assistant|>"
    "{%- if m.reasoning_content is defined and m.reasoning_content -%}<think>{{ m.reasoning_content.strip() }}"
    "</think>{%- else -%}</think>{%- endif -%}"
    "{{ m.content if m.content is string else '' }}"
    "{%- for tc in m.tool_calls or [] -%}<tool_call>{{ tc.function.name }}"
    "{% for k, v in tc.function.arguments | items %}<arg_key>{{ k }}</arg_key><arg_value>"
    "{{ v if v is string else v | tojson(ensure_ascii=False) }}</arg_value>{% endfor %}</tool_call>"
    "{%- endfor -%}"
    "{%- elif m.role == 'tool' -%}<|observation|><tool_response>{{ m.content }}</tool_response>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{{ '<think>' if enable_thinking is not defined or enable_thinking else '</think>' }}{%- endif -%}")
KIMI_STYLE = (
    "{%- macro text(m) -%}{%- if m.content is string -%}{{ m.content }}{%- else -%}"
    "{%- for part in m.content -%}{{ part.text }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- set ns = namespace(last_user=0) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}"
    "<|im_end|>{%- endif -%}"
    "{%- for m in messages -%}<|im_{{ m.role }}|>{{ m.name if m.name is defined else m.role }}<|im_middle|>"
    "{%- if m.role == 'assistant' -%}"
    "{%- if loop.index0 > ns.last_user and m.reasoning_content is defined -%}<think>{{ m.reasoning_content }}"
    "</think>{%- else -%}<think></think>{%- endif -%}{{ text(m) }}"
    "{%- if m.tool_calls -%}<|tool_calls_section_begin|>{%- for tc in m.tool_calls -%}<|tool_call_begin|>"
    "{{ tc.id }}<|tool_call_argument_begin|>{{ tc.function.arguments | tojson }}<|tool_call_end|>"
    "{%- endfor -%}<|tool_calls_section_end|>{%- endif -%}"
    "{%- elif m.role == 'tool' -%}## Return of {{ m.tool_call_id }}\n{{ text(m) }}"
    "{%- else -%}{{ text(m) }}{%- endif -%}<|im_end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- if thinking is defined and not thinking -%}<think></think>{%- endif -%}{%- endif -%}")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city, now", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}}]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Zürich for 2 days?"},
    {"role": "assistant", "content": None, "reasoning_content": " The user wants a forecast. ",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "21 °C.", "reasoning_content": "It is 21."},
    {"role": "user", "content": "Thanks 🙂"},
]


@pytest.fixture(scope="module", params=["glm", "kimi"])
def tokenizer_dir(request, tmp_path_factory):
    d = make_bpe_tokenizer(tmp_path_factory.mktemp(request.param))
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = GLM_STYLE if request.param == "glm" else KIMI_STYLE
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("switches", [{}, {"enable_thinking": False}, {"thinking": False}])
def test_thinking_and_tool_sections_render_as_transformers_renders_them(tokenizer_dir, switches):
    ours, theirs = load_tokenizer(tokenizer_dir), transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    for tools, turns in ((TOOLS, CONVERSATION), (None, CONVERSATION[:2])):
        for add in (True, False):
            want = theirs.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=add,
                                              **switches)
            got = ours.apply_chat_template(turns, tools=tools, add_generation_prompt=add, **switches)
            assert got == want
            want_ids = theirs.apply_chat_template(turns, tools=tools, tokenize=True, add_generation_prompt=add,
                                                  return_dict=True, **switches)["input_ids"]
            assert ours.encode_chat(turns, tools=tools, add_generation_prompt=add, **switches) == list(want_ids)


def test_the_switches_change_the_generation_prompt(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    plain = tok.apply_chat_template(CONVERSATION[:2])
    off = tok.apply_chat_template(CONVERSATION[:2], enable_thinking=False, thinking=False)
    assert plain != off and (off.endswith("<|assistant|></think>") or off.endswith("<think></think>"))


def test_malformed_tool_messages_are_named(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]\.tool_calls must be a list"):
        tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": 3}])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\] must be"):
        tok.encode_chat([{"role": "robot", "content": "hi"}])


@pytest.mark.slow
def test_generate_passes_the_template_switches(tmp_path, tokenizer_dir):
    """`dh-mlx generate --chat --chat-template-args` on a V3.2 model: the prompt is the template's text under
    those switches (its token count printed), and a bad JSON object is a one-line error."""
    from dh_mlx import random_model, save_model
    from dh_mlx.config import ModelConfig
    from dh_mlx.hf_tokenizer import HFTokenizer
    from helpers import BASE
    config = ModelConfig(**{**BASE, "vocab_size": 402, "model_type": "deepseek_v32", "index_topk": 8,
                            "index_head_dim": 16, "index_n_heads": 4, "num_nextn_predict_layers": 0})
    save_model(random_model(config, seed=1, dtype="float32"), tmp_path / "m")
    HFTokenizer(tokenizer_dir).write_files(tmp_path / "m")
    args = json.dumps({"enable_thinking": False, "thinking": False, "tools": TOOLS})
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "generate", "--model", str(tmp_path / "m"), "--chat",
                          "--prompt", "Weather in Zürich?", "--max-tokens", "3", "--chat-template-args", args],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    want = len(load_tokenizer(tokenizer_dir).encode_chat([{"role": "user", "content": "Weather in Zürich?"}],
                                                         **json.loads(args)))
    assert f"prompt: {want} tokens" in run.stderr and want > 40  # the tool declaration is in the prompt
    chat = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "chat", "--model", str(tmp_path / "m"), "--max-tokens",
                           "2", "--chat-template-args", args], input="Weather in Zürich?\nAnd tomorrow?\n",
                          capture_output=True, text=True, env=env)
    assert chat.returncode == 0 and chat.stderr.count("prompt: ") == 2, chat.stderr
    assert f"prompt: {want} tokens" in chat.stderr  # the first turn: the same text as generate's
    bad = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "generate", "--model", str(tmp_path / "m"), "--chat",
                          "--prompt", "x", "--chat-template-args", "[1]"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --chat-template-args")
