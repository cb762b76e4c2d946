"""The OpenAI-compatible HTTP layer (FastAPI on uvicorn) over a running `Engine`: /v1/chat/completions,
/v1/completions, /v1/models, /health and /metrics. Requests are checked (`protocol`), queued on the engine, and
answered whole or as server-sent events; the engine runs in its own thread and hands events over with
`call_soon_threadsafe`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..generation.engine import Engine, Event, QueueFull, Request, RequestError, Usage
from .metrics import Metrics
from .protocol import APIError, Parsed, parse_common, parse_messages, parse_prompt
from .tools import CALLS_BEGIN, split_tool_calls

log = logging.getLogger("dh_mlx.serve")
KEEPALIVE = ": keep-alive\n\n"


def _merged(a: Event, b: Event) -> Event:
    """Two consecutive events of one request as one (b's end, if it is one)."""
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return Event(text=a.text + b.text, tokens=a.tokens + b.tokens, logprobs=logprobs, finish_reason=b.finish_reason,
                 usage=b.usage, error=b.error, time=b.time)


class Server:
    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, *, api_key: str | None = None,
                 keepalive: float = 5.0):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.keepalive = api_key, keepalive
        self.metrics = Metrics(engine)
        self.pieces = [b if b is not None else b"" for b in tokenizer.token_bytes()]
        self.created = int(time.time())
        self.draining = False

    # ---- requests into the engine ----------------------------------------------------------------------------
    def _engine_request(self, p: Parsed, prompt: list[int]) -> Request:
        config = self.engine.model.config
        domain = p.domain
        if domain is not None and domain != "auto":
            if config.domain_routing is None:
                raise APIError("domain: this model has no domains", "domain")
            try:
                domain = config.domain_routing.domain_id(domain)
            except ValueError as e:
                raise APIError(str(e), "domain") from None
        grammar = None
        if p.response_format is not None:
            from ..generation.structured import Grammar, GrammarError
            schema = (p.response_format.get("json_schema") or {}).get("schema") \
                if p.response_format["type"] == "json_schema" else None
            try:
                grammar = Grammar.json(self.tokenizer, schema)
            except GrammarError as e:
                raise APIError(str(e), "response_format") from None
        room = config.max_position_embeddings - len(prompt)
        if room < 1:
            raise APIError(f"the prompt has {len(prompt)} tokens; the model's context is "
                           f"{config.max_position_embeddings}", "messages", code="context_length_exceeded")
        return Request(prompt=prompt, max_tokens=min(p.max_tokens or room, room), sampling=p.sampling,
                       stop=p.stop, logprobs=p.logprobs, domain=domain, grammar=grammar)

    def _submit(self, request: Request):
        if self.draining:
            raise APIError("the server is shutting down", status=503, kind="server_error")
        try:
            return self.engine.submit(request)
        except QueueFull as e:
            self.metrics.requests.labels(outcome="rejected").inc()
            raise APIError(f"too many requests: {e}; retry shortly", status=429, kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except RequestError as e:
            raise APIError(str(e), e.param) from None
        except ValueError as e:
            raise APIError(str(e), "messages", code="context_length_exceeded") from None

    async def _events(self, handle, http: HTTPRequest) -> AsyncIterator[Event | None]:
        """The request's events as they come (None after `keepalive` seconds without one); a client gone
        cancels it, which frees its row at the engine's next step."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()
        handle.listen(lambda event: loop.call_soon_threadsafe(inbox.put_nowait, event))
        arrived, last = time.perf_counter(), None
        try:
            while True:
                try:
                    event = await asyncio.wait_for(inbox.get(), self.keepalive)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    yield None
                    continue
                while event.finish_reason is None and not inbox.empty():  # a client behind gets them as one
                    event = _merged(event, inbox.get_nowait())
                if event.tokens:
                    if last is None:
                        self.metrics.ttft.observe(event.time - arrived)
                    else:
                        self.metrics.itl.observe(event.time - last)
                    last = event.time
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            handle.cancel()  # (a no-op once it has finished)

    def _raw_text(self, tokens: list[int]) -> str:
        """The completion with special tokens spelled out (tool-call markers may be special tokens)."""
        decode = getattr(self.tokenizer, "decode_with_specials", None)
        return decode(tokens) if decode is not None else self.tokenizer.decode(tokens)

    # ---- responses -------------------------------------------------------------------------------------------
    def _logprobs(self, event: Event, chat: bool) -> Any:
        if event.logprobs is None:
            return None
        rows = []
        for token, lp, alts in event.logprobs:
            piece = self.pieces[token] if token < len(self.pieces) else b""
            rows.append({"token": piece.decode("utf-8", "replace"), "logprob": lp, "bytes": list(piece),
                         "top_logprobs": [{"token": self.pieces[a].decode("utf-8", "replace"), "logprob": alp,
                                           "bytes": list(self.pieces[a])} for a, alp in alts]})
        return rows

    @staticmethod
    def _usage(u: Usage | None) -> dict | None:
        if u is None:
            return None
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    def _finished(self, rid: str, kind: str, reason: str, usage: Usage | None, start: float) -> None:
        self.metrics.finished(reason, usage)
        u = usage or Usage()
        log.info("%s %s %s prompt=%d cached=%d completion=%d %.3fs", rid, kind, reason, u.prompt_tokens,
                 u.cached_tokens, u.completion_tokens, time.perf_counter() - start)

    async def complete(self, http: HTTPRequest, chat: bool) -> Response:
        start = time.perf_counter()
        body = await self._json(http)
        p = parse_common(body, chat=chat)
        limit = self.engine.model.config.max_position_embeddings
        try:
            if chat:
                messages = parse_messages(body)
                extra = {**p.template_args, **({"tools": p.tools} if p.tools else {})}
                prompt = self.tokenizer.encode_chat(messages, limit=limit, **extra)
            else:
                text = parse_prompt(body)
                prompt = self.tokenizer.encode(text, bos=True, limit=limit) if isinstance(text, str) else text
        except TypeError:
            raise APIError("this model's chat template takes no tools or template arguments", "tools") from None
        except ValueError as e:
            raise APIError(str(e), "messages" if chat else "prompt",
                           code="context_length_exceeded" if "context" in str(e) else None) from None
        handle = self._submit(self._engine_request(p, prompt))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        if p.stream:
            return StreamingResponse(self._stream(handle, http, p, rid, chat, start), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, tokens, logprobs, last = "", [], [], None
        async for event in self._events(handle, http):
            if event is None:
                continue
            text, tokens, last = text + event.text, tokens + event.tokens, event
            logprobs += self._logprobs(event, chat) or []
        if last is None or last.finish_reason is None:  # the client left
            self._finished(rid, kind, "cancelled", None, start)
            return Response(status_code=499)
        if last.finish_reason == "error":
            self._finished(rid, kind, "error", last.usage, start)
            raise APIError(last.error or "generation failed", status=500, kind="server_error")
        reason, calls = last.finish_reason, []
        if chat and p.tools:
            text, calls = split_tool_calls(self._raw_text(tokens)) if CALLS_BEGIN in self._raw_text(tokens) \
                else (text, [])
            reason = "tool_calls" if calls else reason
        self._finished(rid, kind, reason, last.usage, start)
        if chat:
            message = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "finish_reason": reason,
                      "logprobs": {"content": logprobs} if p.logprobs is not None else None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason,
                      "logprobs": self._completion_logprobs(logprobs) if p.logprobs is not None else None}
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name,
                             "choices": [choice], "usage": self._usage(last.usage)})

    @staticmethod
    def _completion_logprobs(rows: list[dict]) -> dict:
        offsets, at = [], 0
        for r in rows:
            offsets.append(at)
            at += len(r["token"])
        return {"tokens": [r["token"] for r in rows], "token_logprobs": [r["logprob"] for r in rows],
                "top_logprobs": [{a["token"]: a["logprob"] for a in r["top_logprobs"]} for r in rows],
                "text_offset": offsets}

    async def _stream(self, handle, http, p: Parsed, rid: str, chat: bool, start: float) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(delta: dict | None, reason: str | None = None, logprobs=None, usage=None, choices=True) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": self.model_name,
                    "choices": [] if not choices else [
                        {"index": 0, **({"delta": delta} if chat else {"text": (delta or {}).get("content", "")}),
                         "logprobs": logprobs, "finish_reason": reason}]}
            if usage is not None or p.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        ended = []

        def finished(reason: str, usage) -> None:
            ended.append(reason)
            self._finished(rid, kind, reason, usage, start)

        try:
            async for piece in self._stream_body(handle, http, p, chat, chunk, finished):
                yield piece
        finally:  # a client that left mid-stream (the generator closed) counts as cancelled
            if not ended:
                self._finished(rid, kind, "cancelled", None, start)

    async def _stream_body(self, handle, http, p: Parsed, chat: bool, chunk, finished) -> AsyncIterator[str]:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        tokens, holding, last = [], False, None
        async for event in self._events(handle, http):
            if event is None:
                yield KEEPALIVE
                continue
            last = event
            tokens += event.tokens
            if p.tools and chat and not holding and CALLS_BEGIN in self._raw_text(tokens):
                holding = True  # from here the reply is tool calls: sent whole at the end
            lp = self._logprobs(event, chat)
            if event.text and not holding:
                logprobs = {"content": lp} if chat and lp is not None else (
                    self._completion_logprobs(lp) if lp is not None else None)
                yield chunk({"content": event.text}, logprobs=logprobs)
            if event.finish_reason is not None:
                break
        if last is None or last.finish_reason is None:
            return
        if last.finish_reason == "error":
            finished("error", last.usage)
            yield f"data: {json.dumps(APIError(last.error or 'generation failed', status=500, kind='server_error').body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        reason = last.finish_reason
        if holding:
            content, calls = split_tool_calls(self._raw_text(tokens))
            if calls:
                reason = "tool_calls"
                yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
        finished(reason, last.usage)
        yield chunk({}, reason)
        if p.include_usage:
            yield chunk(None, usage=self._usage(last.usage), choices=False)
        yield "data: [DONE]\n\n"

    async def _json(self, http: HTTPRequest) -> Any:
        try:
            return json.loads(await http.body())
        except ValueError:
            raise APIError("the request body is not JSON") from None

    # ---- the app -----------------------------------------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI(title="dh-mlx", docs_url=None, redoc_url=None)

        @app.exception_handler(APIError)
        async def api_error(_, e: APIError):
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.middleware("http")
        async def bearer(http: HTTPRequest, call_next):
            if self.api_key and http.url.path.startswith("/v1/") and \
                    http.headers.get("authorization") != f"Bearer {self.api_key}":
                e = APIError("invalid or missing API key", status=401, kind="authentication_error",
                             code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401)
            return await call_next(http)

        @app.get("/health")
        async def health():
            return JSONResponse({"status": "draining" if self.draining else "ok"},
                                status_code=503 if self.draining else 200)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "dh-mlx"}]}

        @app.post("/v1/chat/completions")
        async def chat(http: HTTPRequest):
            return await self.complete(http, chat=True)

        @app.post("/v1/completions")
        async def completions(http: HTTPRequest):
            return await self.complete(http, chat=False)

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.metrics.text(), media_type="text/plain; version=0.0.4")

        return app
