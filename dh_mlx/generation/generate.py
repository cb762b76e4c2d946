"""Generation loops over the steps: generate_tokens (plain or MTP-speculative), stream_generate, generate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import mlx.core as mx

from ..model import Model
from .options import SamplingOptions
from .speculative import DraftPolicy, mtp_generate
from .steps import PromptCache, check_context, compiled_decode_step, decode_step, prefill


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
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    pc = prompt_cache if prompt_cache is not None else PromptCache.new(model)
    todo = pc.reuse(list(prompt_ids))
    compiled = getattr(model, "fixed_capacity_steps", True)  # (not DeepSeek-V4's caches, not a pipeline rank's)
    if mtp is None:
        mtp = getattr(model, "drafts_with_mtp", True)
    if mtp and model.config.num_nextn_predict_layers and not (sampling.presence_penalty or sampling.frequency_penalty):
        yield from mtp_generate(model, pc, todo, stats=stats, max_tokens=max_tokens, eos_ids=eos_ids,
                                prefill_step_size=prefill_step_size, domain=domain, options=sampling,
                                policy=mtp if isinstance(mtp, DraftPolicy) else None)
        return
    # The penalised window and the output counts stay on the device (updated lazily), so a step can be queued
    # before the token it consumes has been read back.
    recent = mx.array(list(prompt_ids)[-sampling.repetition_context:])
    counts = mx.zeros((model.config.vocab_size,), mx.int32) if sampling.presence_penalty or \
        sampling.frequency_penalty else None

    def choose(logits: mx.array) -> mx.array:
        return sampling.draw(sampling.penalized(logits, recent, counts))

    step = compiled_decode_step(model, domain) if compiled else (
        lambda tok, cache: decode_step(model, tok, cache, domain))
    tic = time.perf_counter()
    logits, _ = prefill(model, mx.array([todo]), pc.cache, step_size=prefill_step_size, domain=domain)
    token = choose(logits)
    mx.eval(token)
    stats.prompt_tokens = len(todo)
    stats.prompt_tps = len(todo) / (time.perf_counter() - tic)
    pc.tokens = list(prompt_ids)
    tic = time.perf_counter()
    try:
        for n in range(max_tokens):
            # Build and queue step n + 1 from the still-lazy token n before reading token n back, as mlx-lm's
            # generate_step does: the graph building (Python) overlaps the evaluation of
            # step n instead of following it. After an EOS that one step is wasted.
            ahead = None
            if n + 1 < max_tokens:
                logits, _ = step(token[:, None], pc.cache)
                if sampling.repetition_penalty != 1.0:
                    recent = mx.concatenate([recent, token])[-sampling.repetition_context:]
                if counts is not None:
                    counts = counts.at[token].add(1)
                ahead = choose(logits)
                mx.async_eval(ahead)
            t = token.item()
            pc.tokens.append(t)
            stats.generation_tokens = n + 1
            yield t
            if t in eos_ids:
                break
            token = ahead
    finally:  # also when the consumer stops early
        # The cache holds every token fed so far (not the last one when max_tokens ended the run).
        pc.tokens = pc.tokens[: max(c.offset for c in pc.cache)]  # (a pipeline rank fills only its layers')
        stats.generation_tps = stats.generation_tokens / max(time.perf_counter() - tic, 1e-9)
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
