"""Generation loops over the steps: generate_tokens (plain or MTP-speculative), stream_generate, generate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import mlx.core as mx

from ..model import Model
from .sample import check_options, make_sampler
from .speculative import Choice, DraftPolicy, mtp_generate
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


def generate_tokens(model: Model, prompt_ids: list[int], *, max_tokens: int = 256, temp: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    repetition_context: int = 64, seed: int | None = None, domain: int | None = None,
                    eos_ids: tuple[int, ...] = (), prefill_step_size: int = 512,
                    prompt_cache: PromptCache | None = None, mtp: bool | None = None,
                    draft_policy: DraftPolicy | None = None, stats: GenerationStats | None = None,
                    compile_step: bool = True, vocab_limit: int | None = None) -> Iterator[int]:
    """Yield generated token ids (like mlx-lm's generate_step); stops at an id in `eos_ids` or `max_tokens`.

    `vocab_limit` (the tokenizer's size, when the model's vocabulary is padded past it): only ids below it are
    ever sampled or drafted.

    `mtp` (default: when the model has an MTP module) decodes speculatively with that module, drafting only
    while it pays (`draft_policy`: a `speculative.DraftPolicy`, new per call by default); the tokens are the
    same as without it. `compile_step=False` decodes with the eager `decode_step` (same tokens; for debugging;
    no MTP).
    """
    check_options(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                  repetition_context=repetition_context, max_tokens=max_tokens, prefill_step_size=prefill_step_size,
                  seed=seed)
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    check_context(model, len(prompt_ids) + max_tokens)
    stats = stats if stats is not None else GenerationStats()
    if max_tokens == 0:  # nothing to generate: the prompt is not even run
        stats.prompt_tokens = len(prompt_ids)
        return
    if seed is not None:
        mx.random.seed(seed)
    pc = prompt_cache if prompt_cache is not None else PromptCache.new(model)
    todo = pc.reuse(list(prompt_ids))
    if mtp is None:
        mtp = compile_step
    compile_step = compile_step and getattr(model, "fixed_capacity_steps", True)  # (not DeepSeek-V4's caches)
    choice = Choice(temp, top_p, top_k, min_p, repetition_penalty, repetition_context, vocab_limit)
    if mtp and model.config.num_nextn_predict_layers:
        yield from mtp_generate(model, pc, todo, stats=stats, max_tokens=max_tokens, eos_ids=eos_ids,
                                prefill_step_size=prefill_step_size, domain=domain, choice=choice,
                                policy=draft_policy)
        return
    sampler = make_sampler(temp, top_p, top_k, min_p)
    # The penalised window stays on the device (appended lazily), so a step can be queued before the token
    # it consumes has been read back.
    recent = mx.array(list(prompt_ids)[-repetition_context:])

    def choose(logits: mx.array) -> mx.array:
        return sampler(choice.logits(logits, recent if repetition_penalty != 1.0 else None))

    step = compiled_decode_step(model, domain) if compile_step else (
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
                if repetition_penalty != 1.0:
                    recent = mx.concatenate([recent, token])[-repetition_context:]
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
    """Yield text pieces as tokens arrive; `kwargs` are `generate_tokens`' sampling options, and `domain` may
    also be "auto" (inferred from the prompt; the posterior lands in `stats.domain_posterior`)."""
    context = model.config.max_position_embeddings  # a text that cannot fit is refused before it is tokenized
    ids = tokenizer.encode(prompt, bos=True, limit=context) if isinstance(prompt, str) else list(prompt)
    stats = kwargs.pop("stats", None) or GenerationStats()
    if kwargs.get("domain") == "auto":  # inferred from the prompt (generation.domains)
        from .domains import infer_domain
        kwargs["domain"], stats.domain_posterior = infer_domain(model, ids)
    kwargs.setdefault("eos_ids", tuple(tokenizer.eos_ids))
    kwargs.setdefault("vocab_limit", tokenizer.vocab_size)
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
