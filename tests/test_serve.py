"""`dh-mlx serve` driven with the official `openai` client on loopback: chat and text completions (plain and
streamed), usage, logprobs, stop strings, JSON-schema output, tool calls, 16 concurrent clients getting what
each gets alone, every error case, disconnects, metrics, and a SIGTERM drain. Each test is bounded in time."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from dh_mlx import load  # noqa: E402
from dh_mlx.generation import generate_tokens  # noqa: E402
from dh_mlx.generation.engine import Engine  # noqa: E402
from dh_mlx.generation.options import SamplingOptions  # noqa: E402
from helpers import model_with_tokenizer  # noqa: E402


class Running:
    """A server on a free loopback port, in this process (its engine inspectable), until `stop()`."""

    def __init__(self, model_dir, **engine_options):
        import uvicorn
        from dh_mlx.serve.app import Server
        self.model, self.tokenizer = load(model_dir)
        self.engine = Engine(self.model, self.tokenizer, **engine_options)
        self.server = Server(self.engine, self.tokenizer, "tiny-test", keepalive=0.2)
        self.loop = threading.Thread(target=self.engine.run, daemon=True)
        self.loop.start()
        self.uv = uvicorn.Server(uvicorn.Config(self.server.app(), host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.uv.started:
                break
            time.sleep(0.05)
        self.port = self.uv.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=120, max_retries=0)

    def stop(self):
        self.uv.should_exit = True
        self.thread.join(30)
        self.engine.stop()
        self.loop.join(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_with_tokenizer(tmp_path_factory.mktemp("serve"), "m")


@pytest.fixture(scope="module")
def server(model_dir):
    s = Running(model_dir, max_batch=16, prefill_chunk=32)
    yield s
    s.stop()


def greedy(server, prompt_ids, n):
    return list(generate_tokens(server.model, prompt_ids, max_tokens=n, mtp=False, eos_ids=tuple(
        server.tokenizer.eos_ids), sampling=SamplingOptions(vocab_limit=server.tokenizer.vocab_size)))


MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "the model expert"}]


def test_chat_completion_is_the_models_greedy_reply(server):
    r = server.client.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=12, temperature=0)
    ids = server.tokenizer.encode_chat(MESSAGES)
    want = greedy(server, ids, 12)
    assert r.choices[0].message.content == server.tokenizer.decode([t for t in want if t not in
                                                                    server.tokenizer.eos_ids])
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("stop" if want[-1] in server.tokenizer.eos_ids else "length")
    assert r.object == "chat.completion" and r.model == "tiny-test"


def test_streamed_chat_equals_the_whole_reply_and_ends_with_usage(server):
    whole = server.client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(server.client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its prefix reused


def test_text_completion_with_logprobs_of_the_model(server):
    prompt = "key latent cache"
    r = server.client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    ids = server.tokenizer.encode(prompt, bos=True)
    import mlx.core as mx
    logits = server.model(mx.array([ids]))[0, -1, :server.tokenizer.vocab_size]
    lp = np.array(logits - mx.logsumexp(logits))
    first = r.choices[0].logprobs
    assert abs(first.token_logprobs[0] - lp.max()) < 1e-4  # greedy: the likeliest token
    assert len(first.top_logprobs[0]) == 3
    assert sorted(first.top_logprobs[0].values(), reverse=True)[:3] == pytest.approx(np.sort(lp)[::-1][:3], abs=1e-4)


def test_a_stop_string_ends_the_text_before_it(server):
    free = server.client.completions.create(model="m", prompt="the expert", max_tokens=16, temperature=0)
    text = free.choices[0].text
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip() and
                 text.find(text[i:i + 2]) == i), None)
    if stop is None:
        pytest.skip("no distinctive stop string in this output")
    r = server.client.completions.create(model="m", prompt="the expert", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}, "kind": {"enum": ["a", "b", "c"]}},
          "required": ["name", "count", "ok", "kind"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_json_schema_output_parses_and_validates(server, temperature):
    import jsonschema
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    plain = [{"role": "user", "content": "hello"}]
    with ThreadPoolExecutor(3) as pool:  # beside unconstrained rows in the same batch
        free = [pool.submit(server.client.chat.completions.create, model="m", messages=plain, max_tokens=20,
                            temperature=temperature, seed=i) for i in range(2)]
        r = server.client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=200, seed=3,
                                                  temperature=temperature, response_format=fmt)
        assert all(f.result().choices[0].message.content is not None for f in free)
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, SCHEMA)
    # json_object: any JSON object, whose strings are unbounded: a random model may not close one in time
    obj = server.client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, seed=1,
                                                temperature=temperature, response_format={"type": "json_object"})
    content = obj.choices[0].message.content
    assert content.startswith("{")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.fixture(scope="module")
def hf_server(tokenizer_dir, tmp_path_factory):  # noqa: F811
    """A model whose tokenizer is a tokenizer.json with a chat template (which takes tools)."""
    from dh_mlx import random_model, save_model
    from helpers import make_config
    d = tmp_path_factory.mktemp("hf-serve")
    save_model(random_model(make_config(vocab_size=416), seed=0), d)
    for f in tokenizer_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    s = Running(d)
    yield s
    s.stop()


def test_a_deepseek_tool_call_comes_back_as_tool_calls(hf_server, monkeypatch):
    server = hf_server
    call = ("Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
            '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    script = server.tokenizer.encode(call) + list(server.tokenizer.eos_ids[:1])
    original, calls = server.engine._choose, {}

    def scripted(jobs, logits):  # each job's k-th choice is the script's k-th token
        import mlx.core as mx
        tokens, infos = original(jobs, logits)
        out = []
        for j in jobs:
            calls[id(j)] = calls.get(id(j), -1) + 1
            out.append(script[min(calls[id(j)], len(script) - 1)])
        return mx.array(out), infos
    monkeypatch.setattr(server.engine, "_choose", scripted)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = server.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather?"}],
                                              max_tokens=len(script) + 2, temperature=0, tools=tools)
    msg = r.choices[0]
    assert msg.finish_reason == "tool_calls" and msg.message.content == "Let me check."
    assert msg.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    chunks = list(server.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "w?"}],
                                                        max_tokens=len(script) + 2, temperature=0, tools=tools,
                                                        stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert [d.tool_calls[0].function.name for d in deltas if d.tool_calls] == ["get_weather"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_sixteen_concurrent_clients_get_what_each_gets_alone(server):
    rng = np.random.default_rng(5)
    words = "the of model token expert router latent attention cache layer value query key".split()
    prompts = [" ".join(rng.choice(words, int(rng.integers(3, 40)))) for _ in range(16)]

    def ask(p):
        r = server.client.completions.create(model="m", prompt=p, max_tokens=12, temperature=0, logprobs=1)
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs
    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    for (a_text, a_lp), (t_text, t_lp) in zip(alone, together):
        assert a_text == t_text
        np.testing.assert_allclose(a_lp, t_lp, atol=1e-4)
    ids = server.tokenizer.encode(prompts[0], bos=True)
    assert alone[0][0] == server.tokenizer.decode([t for t in greedy(server, ids, 12)
                                                   if t not in server.tokenizer.eos_ids])


@pytest.mark.parametrize("body, param", [
    ({"messages": [], "max_tokens": 4}, "messages"),
    ({"messages": MESSAGES, "temperature": 5}, "temperature"),
    ({"messages": MESSAGES, "n": 2}, "n"),
    ({"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": MESSAGES, "stop": [""]}, "stop"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x " * 3000}], "max_tokens": 4}, "messages"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_an_overlong_prompt_is_400_context_length_exceeded(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": list(range(5, 600)), "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_models_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in server.client.models.list()] == ["tiny-test"]
    text = httpx.get(server.url + "/metrics").text
    done = sum(float(v) for v in re.findall(r'^dh_mlx_requests_total\{outcome="(?:stop|length|tool_calls)"\} (\S+)',
                                            text, re.M))
    assert done >= 5
    assert float(re.search(r"^dh_mlx_generation_tokens_total (\S+)", text, re.M).group(1)) >= 5 * done
    assert re.search(r"^dh_mlx_time_to_first_token_seconds_count (\S+)", text, re.M)
    assert re.search(r"^dh_mlx_inter_token_latency_seconds_bucket", text, re.M)
    assert re.search(r"^dh_mlx_queue_depth 0\.0", text, re.M)


def test_a_client_that_leaves_frees_its_row(server):
    before = server.engine.counts["generation_tokens"]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "the", "max_tokens": 400, "temperature": 0, "stream": True,
                            "stop": ["\u2603\u2603\u2603"]}) as r:  # (a stop that never comes: no early EOS)
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data:"))
    for _ in range(100):  # the engine notices at its next step
        if server.engine.running == 0:
            break
        time.sleep(0.05)
    assert server.engine.running == 0
    assert server.engine.counts["generation_tokens"] - before < 400  # stopped, not run to the end
    metrics = httpx.get(server.url + "/metrics").text
    assert 'outcome="cancelled"' in metrics


def test_a_failing_request_is_500_and_the_others_go_on(server, monkeypatch):
    start = server.engine._start

    def fail(job):
        if job.request.sampling.seed == 13:
            raise RuntimeError("injected failure")
        start(job)
    monkeypatch.setattr(server.engine, "_start", fail)
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(httpx.post, server.url + "/v1/completions", timeout=60,
                          json={"prompt": "x", "max_tokens": 3, "seed": 13})
        good = pool.submit(httpx.post, server.url + "/v1/completions", timeout=60,
                           json={"prompt": "y", "max_tokens": 3, "seed": 1})
        assert bad.result().status_code == 500 and "injected failure" in bad.result().json()["error"]["message"]
        assert good.result().status_code == 200


def test_keep_alives_during_a_long_prefill(model_dir):
    s = Running(model_dir, prefill_chunk=8)
    try:
        s.server.keepalive = 0.02
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                          json={"prompt": list(range(5, 400)), "max_tokens": 2, "stream": True}) as r:
            lines = [l for l in r.iter_lines() if l]
        assert lines[0] == ": keep-alive" and lines[-1] == "data: [DONE]"
    finally:
        s.stop()


def test_a_full_queue_is_429_with_retry_after_and_the_api_key_is_checked(model_dir):
    s = Running(model_dir, max_batch=1, max_queue=1)
    try:
        s.server.api_key = "sekret"
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        auth = {"Authorization": "Bearer sekret"}
        s.engine.max_batch = 0  # admission paused: the first request waits in the queue
        with ThreadPoolExecutor(1) as pool:
            long = [pool.submit(httpx.post, s.url + "/v1/completions", headers=auth, timeout=120,
                                json={"prompt": "x", "max_tokens": 5, "temperature": 0})]
            for _ in range(200):
                if s.engine.queue_depth == 1:
                    break
                time.sleep(0.02)
            r = httpx.post(s.url + "/v1/completions", headers=auth, json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            s.engine.max_batch = 1
            with s.engine.lock:
                s.engine.lock.notify()
            assert all(f.result().status_code == 200 for f in long)
    finally:
        s.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight_then_exits(model_dir):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "dh_mlx.cli", "serve", "--model", str(model_dir), "--port",
                          str(port)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        lines = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                          json={"prompt": "the", "max_tokens": 150, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and not lines:
                    p.send_signal(signal.SIGTERM)  # mid-stream
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        done = [json.loads(l[6:]) for l in lines if l.startswith("data: {")]
        assert done[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert p.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if p.poll() is None:
            p.kill()
        assert "Traceback" not in p.stderr.read()


@pytest.mark.slow
def test_a_deepseek_v4_model_is_served_one_request_at_a_time(tmp_path):
    """V4's caches do not batch: concurrent requests queue, each decodes alone with the model's greedy text;
    logprobs (which need a batched row) are a 400 naming the field."""
    pytest.importorskip("transformers")
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from v4_release import build
    (tmp_path / "tok").mkdir()
    tok_dir = model_with_tokenizer(tmp_path / "tok", "m")
    v4 = build(tmp_path / "v4", "flash_like", vocab_size=512)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, v4 / f.name)
    s = Running(v4, max_batch=4)
    try:
        prompts = ["the expert router", "latent attention cache", "a model of the court"]
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda p: s.client.completions.create(model="m", prompt=p, max_tokens=5,
                                                                          temperature=0), prompts))
        for p, r in zip(prompts, replies):
            ids = s.tokenizer.encode(p, bos=True)
            want = greedy(s, ids, 5)
            assert r.usage.completion_tokens == len(want)
            assert r.choices[0].text == s.tokenizer.decode([t for t in want if t not in s.tokenizer.eos_ids])
        with pytest.raises(openai.BadRequestError) as e:
            s.client.completions.create(model="m", prompt="the", max_tokens=2, logprobs=2)
        assert e.value.body["param"] == "logprobs"
    finally:
        s.stop()
