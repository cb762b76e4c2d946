"""What the engine takes and gives: a `Request`, its `Handle` (the events of its output, and cancel), and
each `Event` with the request's `Usage` at the end."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from .options import SamplingOptions

_ids = itertools.count()


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int = 256
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: tuple[str, ...] = ()  # strings that end the text (not included)
    eos_ids: tuple[int, ...] | None = None  # None: the tokenizer's
    logprobs: int | None = None  # None: off; n: each token's log-probability and the n likeliest alternatives
    domain: int | None = None
    grammar: Any = None  # a structured.Grammar (one per request: it is stateful)
    # MTP speculative decoding (True or a speculative.DraftPolicy): the row then decodes alone (solo.py)
    mtp: Any = False
    prompt_cache: Any = None  # a steps.PromptCache to start from (its reusable prefix) and leave the caches in
    stats: Any = None  # a GenerationStats that MTP drafting fills in (drafted, accepted, what paid)
    prefill_chunk: int | None = None  # None: the engine's
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt positions taken from the prefix cache


@dataclass
class Event:
    """New output of one request: text (whole characters), the tokens it came from and their log-probabilities
    ((token, logprob, [(alt, logprob), ...]) each); the last event has `finish_reason` and `usage`."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    usage: Usage | None = None
    error: str | None = None
    time: float = field(default_factory=time.perf_counter)


class Handle:
    """What `submit` returns: iterate for the request's events; `cancel()` frees its row at the next step."""

    def __init__(self, request: Request):
        self.request, self.events, self.cancelled = request, queue.Queue(), False
        self.listener = None  # set: events go to it (from the engine's thread) instead of the queue
        self.usage: Usage | None = None  # the counts so far, once the engine has taken the request
        self._lock = threading.Lock()

    def put(self, event: Event) -> None:
        with self._lock:
            (self.listener or self.events.put)(event)

    def listen(self, listener) -> None:
        """Hand every event to `listener` from now on, those that came before first."""
        with self._lock:
            while not self.events.empty():
                listener(self.events.get_nowait())
            self.listener = listener

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.events.get()
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.cancelled = True


class RequestError(ValueError):
    """A request the engine cannot serve as asked, naming the field (`param`) at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class QueueFull(RuntimeError):
    """The engine's queue is full: the server answers 429 with Retry-After."""
