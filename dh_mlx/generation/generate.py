"""Generation loops over the steps: generate_tokens (plain or MTP-speculative), stream_generate, generate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import mlx.core as mx

from ..model import Model
from .options import SamplingOptions
from .engine import Engine, Request
from .speculative import DraftPolicy
from .steps import PromptCache, check_context


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    drafted: int = 0
    accepted: int = 0
    draft_summary: str | None = None  # what the draft policy measured (MTP generation only)
    drafting_paid: bool = False  # the acceptance measured was above the break-even the policy measured
    domain_posterior: dict[str, float] | None = None  # with domain="auto": P(domain | prompt)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def generate_tokens(model: Model, prompt_ids: list[int], *, sampling: SamplingOptions = SamplingOptions(),
                    max_tokens: int = 256, domain: int | None = None, eos_ids: tuple[int, ...] = (),
                    prompt_cache: PromptCache | None = None, mtp: bool | DraftPolicy | None = None,
                    stats: GenerationStats | None = None, prefill_step_size: int = 512) -> Iterator[int]:
    """Yield generated token ids (like mlx-lm's generate_step); stops at an id in `eos_ids` or `max_tokens`.
    `sampling` says how each token is chosen (greedy by default; `seed`; `vocab_limit`: the tokenizer's size
    when the model's vocabulary is padded past it, so only ids below it are ever sampled or drafted).

    `mtp` (default: when the model has an MTP module) decodes speculatively with that module, drafting only
    while it pays (a `speculative.DraftPolicy` may be given instead of True: what it measured carries over);
    the tokens are the same as without it. `prompt_cache` keeps the caches across calls that share a prefix.
    The request runs as a batch of one through the serving engine's loop (`engine.Engine`).
    """
    for name, value, low in (("max_tokens", max_tokens, 0), ("prefill_step_size", prefill_step_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    check_context(model, len(prompt_ids) + max_tokens)
    stats = stats if stats is not None else GenerationStats()
    if max_tokens == 0:  # nothing to generate: the prompt is not even run
        stats.prompt_tokens = len(prompt_ids)
        return
    if sampling.seed is not None:  # (MTP drafting draws from the global generator)
        mx.random.seed(sampling.seed)
    if mtp is None:
        mtp = getattr(model, "drafts_with_mtp", True)
    drafts = model.config.num_nextn_predict_layers and not (sampling.presence_penalty or sampling.frequency_penalty)
    mtp = mtp if mtp and drafts else False
    engine = Engine(model, max_batch=1, prefill_chunk=prefill_step_size, prefix_cache_bytes=0, raise_errors=True)
    request = Request(list(prompt_ids), max_tokens, sampling, eos_ids=tuple(eos_ids), domain=domain, mtp=mtp,
                      prompt_cache=prompt_cache if prompt_cache is not None else PromptCache.new(model), stats=stats,
                      prefill_chunk=prefill_step_size)
    handle = engine.submit(request)
    tic, first, done, n = time.perf_counter(), None, False, 0
    try:
        while not done:
            engine.step()
            while not done and not handle.events.empty():
                event = handle.events.get_nowait()
                done = event.finish_reason is not None
                for t in event.tokens:
                    if first is None:  # (when the engine chose it: a decode step may follow in the same call)
                        first = event.time
                        stats.prompt_tokens = len(prompt_ids) - handle.usage.cached_tokens
                        stats.prompt_tps = stats.prompt_tokens / max(first - tic, 1e-9)
                    n += 1
                    stats.generation_tokens = n
                    yield t
    except GeneratorExit:  # the consumer stopped early: the row leaves (below), its caches stay in the prompt cache
        raise
    except BaseException:  # a failure (or Ctrl-C) inside the engine's step: this call's engine is not stepped again
        done = True
        raise
    finally:
        if not done:
            handle.cancel()
            engine.step()
        if first is not None:
            stats.generation_tps = stats.generation_tokens / max(time.perf_counter() - first, 1e-9)
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9


@dataclass
class GenerationResponse:
    text: str  # the new piece of text
    token: int
    stats: GenerationStats


def stream_generate(model: Model, tokenizer: Any, prompt: str | list[int], **kwargs) -> Iterator[GenerationResponse]:
    """Yield text pieces as tokens arrive; `kwargs` are `generate_tokens`' (the tokenizer's end-of-sequence ids
    and size by default), and `domain` may also be "auto" (inferred from the prompt; the posterior lands in
    `stats.domain_posterior`)."""
    context = model.config.max_position_embeddings  # a text that cannot fit is refused before it is tokenized
    ids = tokenizer.encode(prompt, bos=True, limit=context) if isinstance(prompt, str) else list(prompt)
    stats = kwargs.pop("stats", None) or GenerationStats()
    if kwargs.get("domain") == "auto":  # inferred from the prompt (generation.domains)
        from .domains import infer_domain
        kwargs["domain"], stats.domain_posterior = infer_domain(model, ids)
    kwargs.setdefault("eos_ids", tuple(tokenizer.eos_ids))
    sampling = kwargs.get("sampling", SamplingOptions())
    if sampling.vocab_limit is None:
        kwargs["sampling"] = sampling.replace(vocab_limit=tokenizer.vocab_size)
    decoder = tokenizer.stream_decoder()
    tokens = generate_tokens(model, ids, stats=stats, **kwargs)
    try:
        for t in tokens:
            piece = "" if t in kwargs["eos_ids"] else decoder.add(t)
            yield GenerationResponse(piece, t, stats)
    finally:  # a consumer that stops early stops the loop at once (its caches are left consistent)
        tokens.close()
    tail = decoder.flush()
    if tail:
        yield GenerationResponse(tail, -1, stats)


def generate(model: Model, tokenizer: Any, prompt: str | list[int], **kwargs) -> str:
    """The generated text (prompt excluded)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
