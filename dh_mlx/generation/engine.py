"""The batched generation engine: one loop owns the model and serves many requests at once (continuous
batching), as vLLM's and mlx-lm's servers do.

Each `step()`: admit waiting requests (within `max_batch` and a latent-cache memory budget), starting each
from the longest prefix the `PrefixCache` holds; run one chunk of the oldest prompt still prefilling (so a
long prompt never stalls the others for more than a chunk); then one batched decode step for every sequence
past its prompt (`batch.BatchStep`: rows of different lengths, each with its own sampling options, seed,
grammar and domain). A sequence leaves the batch when it ends (end-of-sequence token, a stop string,
`max_tokens`, its grammar complete, or cancelled); its cache goes to the prefix cache (or to the request's
own `PromptCache`). A request that decodes alone (MTP drafting, or a model whose caches do not batch:
`solo.py`) waits until the engine is empty and holds it until done. Each request's output arrives as `Event`s
on its `Handle`. `run()` loops in a thread; a failure inside one request ends that request with an error event
and the others go on. `generate_tokens` is a batch of one through this loop.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from typing import Any

import mlx.core as mx

from ..model import Model
from ..params import kv_bytes_per_token
from .batch import BatchCache, BatchStep
from .cache import make_cache
from .options import RowSampler
from .prefix import PrefixCache
from .requests import Event, Handle, QueueFull, Request, RequestError, Usage  # noqa: F401  (re-exported)
from .solo import decodes_alone, solo_tokens
from .steps import PromptCache, prefill
from .text import NoText, TextOut


class Job:
    """A request inside the engine: its prompt still to prefill, sampler, text and counts."""

    def __init__(self, handle: Handle, engine: "Engine"):
        r = self.request = handle.request
        self.handle = handle
        tok = engine.tokenizer  # None: token ids only (generate_tokens)
        self.eos = set(r.eos_ids if r.eos_ids is not None else tok.eos_ids if tok is not None else ())
        options = r.sampling if r.sampling.vocab_limit is not None or engine.vocab_limit is None else \
            r.sampling.replace(vocab_limit=engine.vocab_limit)
        self.sampler = RowSampler(options, history=r.prompt, grammar=r.grammar, logprobs=r.logprobs)
        self.text = TextOut(NoText() if tok is None else tok.stream_decoder(), r.stop)
        self.alone = decodes_alone(engine.model, r)
        for param, asked in (("response_format", r.grammar is not None), ("logprobs", r.logprobs is not None)):
            if self.alone and asked:
                raise RequestError(param, "needs a batched row: not with MTP drafting or a model whose caches do "
                                   f"not batch ({engine.model.config.model_type})")
        self.tokens = None  # a solo job's token generator (solo.solo_tokens)
        self.usage = handle.usage = Usage(prompt_tokens=len(r.prompt))
        self.generated: list[int] = []
        self.cache = None  # per-layer LatentCaches while prefilling
        self.todo: list[int] = []
        self.last: int | None = None  # the newest token, fed at the next decode step
        self.domain = -1 if r.domain is None else r.domain


class Engine:
    def __init__(self, model: Model, tokenizer: Any = None, *, max_batch: int = 16, prefill_chunk: int = 512,
                 prefix_cache_bytes: int = 1 << 30, kv_budget_bytes: int | None = None, max_queue: int = 256,
                 raise_errors: bool = False):
        """`tokenizer` None: no text, end-of-sequence ids from each request. `raise_errors`: a failing request
        raises out of `step()` (one caller, one request: generate_tokens) instead of ending with an error."""
        if max_batch < 1 or prefill_chunk < 1 or max_queue < 0:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        self.model, self.tokenizer, self.raise_errors = model, tokenizer, raise_errors
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        self.vocab_limit = tokenizer.vocab_size if tokenizer is not None and \
            tokenizer.vocab_size < model.config.vocab_size else None
        embed = getattr(model.model, "embed_tokens", None)  # (a pipeline rank's stack may have none)
        dtype = embed.weight.dtype if embed is not None else mx.float32
        self.token_bytes = kv_bytes_per_token(model.config, 4 if dtype == mx.float32 else 2)
        self.kv_budget = kv_budget_bytes
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.batch, self.step_fn = BatchCache(model.config.num_hidden_layers), BatchStep(model)
        self.waiting: deque[Job] = deque()
        self.prefilling: list[Job] = []
        self.rows: list[Job] = []  # aligned with the batch's rows
        self.joining: list[Job] = []  # prefilled, joining the batch at the next step
        self.alone: Job | None = None  # a job decoding alone (solo.py): nothing else runs meanwhile
        self.ahead = None  # (tokens (B,), log-probabilities) of a decode step queued, not yet handed out
        self.lock = threading.Condition()
        self.stopping = False
        self.counts = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "failed": 0}

    # ---- the interface -------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        """Queue a request; QueueFull when `max_queue` requests already wait. The context is checked here."""
        limit = self.model.config.max_position_embeddings
        if not request.prompt:
            raise ValueError("prompt: empty; give at least one token")
        if len(request.prompt) + request.max_tokens > limit:
            raise ValueError(f"prompt: {len(request.prompt)} tokens plus max_tokens {request.max_tokens} exceed the "
                             f"model's context of {limit} tokens")
        handle = Handle(request)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(Job(handle, self))
            self.lock.notify()
        return handle

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows) + len(self.prefilling) + len(self.joining) + (self.alone is not None)

    def idle(self) -> bool:
        return not (self.waiting or self.running)

    def run(self, until=None) -> None:
        """Step until `stop()` (or `until()` turns true) and no work is left."""
        while True:
            with self.lock:
                while self.idle() and not self.stopping and not (until and until()):
                    self.lock.wait(timeout=None if until is None else 0.25)
                if self.idle() and (self.stopping or until and until()):
                    return
            self.step()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self) -> None:
        try:
            self._drop_cancelled()
            self._admit()
            if self.alone is not None:
                self._guarded(self.alone, self._solo_step)
            if self.prefilling:
                self._guarded(self.prefilling[0], self._prefill_chunk)
            if self.joining:  # the batch changes shape: the step in flight first
                self._decode(queue_next=False)
                for job in self.joining:
                    self.batch.add(job.cache)
                    self.rows.append(job)
                    job.cache = None
                self.joining = []
            if self.rows:
                self._decode(queue_next=True)
        except Exception as e:  # the batched step itself: every row in it fails, the engine goes on
            if self.raise_errors:
                raise
            for job in self.rows + self.joining:
                self._fail(job, e)
            self.rows, self.joining, self.ahead = [], [], None
            self.batch = BatchCache(self.model.config.num_hidden_layers)

    def _guarded(self, job: Job, fn) -> None:
        try:
            fn(job)
        except Exception as e:
            if job in self.prefilling:
                self.prefilling.remove(job)
            if job is self.alone:
                self.alone = None
            if self.raise_errors:
                raise
            self._fail(job, e)

    def _fail(self, job: Job, e: Exception) -> None:
        self.counts["failed"] += 1
        message = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        job.handle.put(Event(finish_reason="error", usage=job.usage, error=message))
        if not isinstance(e, ValueError):
            traceback.print_exception(e)

    def _drop_cancelled(self) -> None:
        if self.alone is not None and self.alone.handle.cancelled:
            self._end_alone("cancelled")
        if any(job.handle.cancelled for job in self.rows):
            self._decode(queue_next=False)  # (the rows must be as the cache is)
        for job in [j for j in self.prefilling + self.joining if j.handle.cancelled]:
            (self.prefilling if job in self.prefilling else self.joining).remove(job)
            self._finish(job, "cancelled")
        with self.lock:
            for job in [j for j in self.waiting if j.handle.cancelled]:
                self.waiting.remove(job)
                self._finish(job, "cancelled")
        self._retire([b for b, job in enumerate(self.rows) if job.handle.cancelled], "cancelled")

    def _need(self, job: Job) -> int:
        return (len(job.request.prompt) + job.request.max_tokens) * self.token_bytes

    def _admit(self) -> None:
        while self.waiting and self.running < self.max_batch and self.alone is None:
            with self.lock:
                job = self.waiting[0]
            if job.alone and self.running:  # it waits for the engine to be empty
                return
            if self.kv_budget is not None and self.running:  # the padded batch: rows x the longest row
                longest = max(self._need(j) for j in [*self.rows, *self.prefilling, job])
                if (self.running + 1) * longest > self.kv_budget:
                    return
            with self.lock:
                self.waiting.popleft()
            self._guarded(job, self._start)

    def _start(self, job: Job) -> None:
        r = job.request
        if r.domain == "auto":
            from .domains import infer_domain
            job.domain, _ = infer_domain(self.model, r.prompt)
            r.domain = job.domain
        if job.alone or r.prompt_cache is not None:  # the request's own caches (a fresh one when alone)
            pc = r.prompt_cache if r.prompt_cache is not None else PromptCache.new(self.model)
            todo = pc.reuse(list(r.prompt))
            n, caches = len(r.prompt) - len(todo), pc.cache
        else:
            n, caches = self.prefix.lookup(r.prompt)
        job.usage.cached_tokens = n
        if job.alone:
            chunk = r.prefill_chunk or self.prefill_chunk
            job.tokens = solo_tokens(self.model, r, job.sampler.options, pc, todo, job.eos, chunk, r.stats)
            self.alone = job
            return
        job.cache = caches if caches is not None else make_cache(self.model.config)
        job.todo = list(r.prompt[n:])
        self.prefilling.append(job)

    def _solo_step(self, job: Job) -> None:
        """The next token of the job decoding alone (its prompt is prefilled by the first)."""
        token = next(job.tokens, None)
        if token is None:  # (its generator ends at its end-of-sequence token or max_tokens: not reached)
            self._end_alone("stop")
        elif job.usage.completion_tokens == 0:
            self.counts["prompt_tokens"] += len(job.request.prompt) - job.usage.cached_tokens
        if token is not None and not self._emit(job, token, None):
            self._end_alone(None)

    def _end_alone(self, reason: str | None) -> None:
        job, self.alone = self.alone, None
        job.tokens.close()  # its caches and their tokens left consistent in the request's PromptCache
        if reason is not None:
            self._finish(job, reason)

    def _domains(self, jobs: list[Job]) -> mx.array | None:
        if self.model.config.domain_routing is None or all(j.domain == -1 for j in jobs):
            return None
        return mx.array([j.domain for j in jobs])

    def _prefill_chunk(self, job: Job) -> None:
        size = job.request.prefill_chunk or self.prefill_chunk
        chunk, job.todo = job.todo[:size], job.todo[size:]
        domain = None if job.domain == -1 else job.domain
        logits, _ = prefill(self.model, mx.array([chunk]), job.cache, step_size=size, domain=domain)
        self.counts["prompt_tokens"] += len(chunk)
        if job.todo:
            return
        self.prefilling.remove(job)
        token, info = self._choose([job], logits)
        mx.eval(token, [i for i in info if i is not None])
        if self._emit(job, token.tolist()[0], info[0]):
            self.joining.append(job)
        else:
            job.cache = None

    def _queue(self, tokens: mx.array):
        """Build one batched decode step feeding `tokens` (B, 1) and its choices; nothing is evaluated."""
        logits, _ = self.step_fn(tokens, self.batch, self._domains(self.rows))
        return self._choose(self.rows, logits[:, -1])

    def _decode(self, queue_next: bool) -> None:
        """Hand out the tokens of the step in flight (queued now when none is). With `queue_next`, the next step
        is built from those tokens, still lazy, and set computing before they are read back (as generate_tokens
        does): the handing out overlaps the computing. Rows whose choice needs the tokens read (penalties, a
        grammar) never run ahead."""
        if self.ahead is None:
            if not queue_next or not self.rows:
                return
            self.ahead = self._queue(mx.array([[job.last] for job in self.rows]))
        tokens, infos = self.ahead
        self.ahead = None
        # (not past a row's last token: its cache then holds exactly the tokens fed)
        if queue_next and all(job.sampler.runs_ahead and job.usage.completion_tokens + 1 < job.request.max_tokens
                              for job in self.rows):
            self.ahead = self._queue(tokens[:, None])
            mx.async_eval(self.ahead[0])
        mx.eval(tokens, [i for i in infos if i is not None])
        done = [b for b, (job, t, info) in enumerate(zip(self.rows, tokens.tolist(), infos))
                if not self._emit(job, t, info)]
        if done and self.ahead is not None:  # the step in flight goes on for the rows that go on
            keep = [b for b in range(len(self.rows)) if b not in set(done)]
            ahead_tokens, ahead_infos = self.ahead
            self.ahead = (ahead_tokens[mx.array(keep)], [ahead_infos[b] for b in keep]) if keep else None
        self._retire(done, None)

    def _choose(self, jobs: list[Job], logits: mx.array) -> tuple[mx.array, list]:
        """Each job's next token (B,) from its row of logits (B, V), lazy: the simple rows in one argmax."""
        limits = {j.sampler.options.vocab_limit for j in jobs}
        if len(limits) == 1 and all(j.sampler.simple for j in jobs):
            return mx.argmax(logits[:, : limits.pop() or logits.shape[-1]], axis=-1), [None] * len(jobs)
        out = [job.sampler.choose(logits[b]) for b, job in enumerate(jobs)]
        infos = [job.sampler.token_logprobs(logits[b], out[b]) for b, job in enumerate(jobs)]
        return mx.stack(out), infos

    def _emit(self, job: Job, token: int, info) -> bool:
        """Hand `token` to the job's consumer; False when the job is finished."""
        job.usage.completion_tokens += 1
        self.counts["generation_tokens"] += 1
        job.sampler.accept(token)
        job.last = token
        job.generated.append(token)
        lp = None if info is None else [(token, info[0].item(), list(zip(info[1].tolist(), info[2].tolist())))]
        if token in job.eos:
            job.handle.put(Event(text=job.text.flush(), tokens=[token], logprobs=lp))
            self._finish(job, "stop")
            return False
        text, stopped = job.text.add(token)
        job.handle.put(Event(text=text, tokens=[token], logprobs=lp))
        grammar_done = job.request.grammar is not None and job.request.grammar.done
        if stopped or grammar_done or job.usage.completion_tokens >= job.request.max_tokens:
            self._finish(job, "stop" if stopped or grammar_done else "length")
            return False
        return True

    def _finish(self, job: Job, reason: str) -> None:
        if reason != "cancelled":
            tail = job.text.flush()
            self.counts["finished"] += 1
        else:
            tail = ""
        job.handle.put(Event(text=tail, finish_reason=reason, usage=job.usage))

    def _retire(self, rows: list[int], reason: str | None) -> None:
        """Take rows out of the batch (their caches go to the prefix cache); `reason` finishes them first."""
        if not rows:
            return
        for b in rows:
            job = self.rows[b]
            if reason is not None:
                self._finish(job, reason)
            held = self.batch.row(b)  # the prompt and the tokens fed so far
            tokens = (job.request.prompt + job.generated)[: held[0].offset]
            pc = job.request.prompt_cache
            if pc is not None:  # the request keeps its caches (a chat's next turn starts from them)
                pc.cache, pc.tokens = held, tokens
            else:
                self.prefix.insert(tokens, held)
        self.batch.remove(rows)
        self.rows = [j for b, j in enumerate(self.rows) if b not in set(rows)]
