"""Generation as composable steps: prefill, decode_step, generate_tokens, stream_generate, generate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import mlx.core as mx

from .cache import LatentCache, StepCache, make_cache
from .model import Model
from .sample import apply_repetition_penalty, check_options, make_sampler


@dataclass
class PromptCache:
    """A latent cache plus the tokens it holds, reusable across calls that share a prompt prefix."""

    cache: list[LatentCache]
    tokens: list[int] = field(default_factory=list)
    mtp_cache: LatentCache | None = None  # the MTP module's, from the last MTP generation (rebuilt per call)

    @classmethod
    def new(cls, model: Model) -> "PromptCache":
        return cls(make_cache(model.config))

    def reuse(self, prompt: list[int]) -> list[int]:
        """Trim to the longest common prefix with `prompt`; return the prompt tokens still to prefill."""
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # always recompute at least one token for its logits
        for c in self.cache:
            c.trim(c.offset - common)
        self.tokens = self.tokens[:common]
        return prompt[common:]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def _domain_array(domain: int | None) -> mx.array | None:
    return None if domain is None else mx.array([domain])


def prefill(model: Model, tokens: mx.array, cache: list[LatentCache], *, step_size: int = 512,
            domain: int | None = None) -> tuple[mx.array, mx.array]:
    """Run the prompt (1, T) through the cache in chunks; returns (last logits (1, V), last hidden (1, D)).

    Each chunk after the first attends through the absorbed path, so per-head K/V never exist for more than
    one chunk.
    """
    d = _domain_array(domain)
    T = tokens.shape[1]
    for start in range(0, T - 1, step_size):
        end = min(start + step_size, T - 1)
        model.model(tokens[:, start:end], cache, d)
        mx.eval([c.latent for c in cache])
    out = model.forward(tokens[:, T - 1:], cache, d)
    return out.logits[:, -1], out.hidden[:, -1]


def decode_step(model: Model, token: mx.array, cache: list[LatentCache], domain: int | None = None):
    """One token (1, 1) -> (logits (1, V), hidden (1, D))."""
    out = model.forward(token, cache, _domain_array(domain))
    return out.logits[:, -1], out.hidden[:, -1]


def compiled_cached_step(forward, caches_of=lambda cache: cache):
    """Compile `forward(tokens (1, L), caches, mask, *args) -> Output` over fixed-capacity cache views.

    Returns run(tokens, cache, *args) -> (logits (1, L, V), hidden (1, L, D)) that advances the caches by L.
    Each layer writes its new latents at an array offset into the cache's whole 256-position chunk and
    attends over it under a mask (`StepCache`), so `mx.compile` traces once per chunk (and per L) and reuses
    its fused kernels in between. The cache buffers are taken out of the caches for the call, so the step's
    slice updates write in place. `caches_of` maps the argument to its list of LatentCaches.
    """

    def step(tokens, offset, latents, k_pes, *args):
        views = [StepCache(lat, kpe, offset) for lat, kpe in zip(latents, k_pes)]
        out = forward(tokens, views, views[0].valid_mask(tokens.shape[1]), *args)
        return out.logits, out.hidden, [v.latent for v in views], [v.k_pe for v in views]

    compiled = mx.compile(step)

    def run(tokens: mx.array, cache, *args) -> tuple[mx.array, mx.array]:
        caches = caches_of(cache)
        if not caches[0].has_past:  # nothing cached yet: no capacity to write into
            out = forward(tokens, caches, "causal", *args)
            return out.logits, out.hidden
        L = tokens.shape[1]
        for c in caches:
            c.reserve(L)
        latents, k_pes = [c.latent for c in caches], [c.k_pe for c in caches]
        for c in caches:
            c.latent = c.k_pe = None
        logits, hidden, latents, k_pes = compiled(tokens, mx.array(caches[0].offset, mx.int32), latents, k_pes,
                                                  *args)
        for c, lat, kpe in zip(caches, latents, k_pes):
            c.latent, c.k_pe = lat, kpe
            c.offset += L
        return logits, hidden

    return run


def compiled_decode_step(model: Model, domain: int | None = None):
    """`decode_step` as one `mx.compile`d function (see `compiled_cached_step`): (token (1, 1), cache) ->
    (logits (1, V), hidden (1, D))."""
    d = _domain_array(domain)
    run = compiled_cached_step(lambda tokens, views, mask: model.forward(tokens, views, d, mask=mask))

    def step(token: mx.array, cache: list[LatentCache]) -> tuple[mx.array, mx.array]:
        logits, hidden = run(token, cache)
        return logits[:, -1], hidden[:, -1]

    return step


def limit_vocab(logits: mx.array, vocab_limit: int | None) -> mx.array:
    """(..., V) -> (..., vocab_limit): the ids a tokenizer smaller than the model's vocabulary can decode."""
    return logits if vocab_limit is None or vocab_limit >= logits.shape[-1] else logits[..., :vocab_limit]


def check_context(model: Model, n_tokens: int) -> None:
    limit = model.config.max_position_embeddings
    if n_tokens > limit:
        raise ValueError(f"prompt plus generation needs {n_tokens} positions but the model's context "
                         f"(max_position_embeddings) is {limit}")


def generate_tokens(model: Model, prompt_ids: list[int], *, max_tokens: int = 256, temp: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    repetition_context: int = 64, seed: int | None = None, domain: int | None = None,
                    eos_ids: tuple[int, ...] = (), prefill_step_size: int = 512,
                    prompt_cache: PromptCache | None = None, mtp: bool = False, draft_policy=None,
                    stats: GenerationStats | None = None, compile_step: bool = True,
                    vocab_limit: int | None = None) -> Iterator[int]:
    """Yield generated token ids (like mlx-lm's generate_step); stops at an id in `eos_ids` or `max_tokens`.

    `vocab_limit` (the tokenizer's size, when the model's vocabulary is padded past it): only ids below it are
    ever sampled or drafted.

    `mtp=True` decodes speculatively with the model's MTP module when it has one, drafting while it pays
    (`draft_policy`: a `speculative.DraftPolicy`, new per call by default). `compile_step=False` decodes
    with the eager `decode_step` (same tokens; for debugging).
    """
    check_options(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                  max_tokens=max_tokens, prefill_step_size=prefill_step_size)
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
    sampler = make_sampler(temp, top_p, top_k, min_p)
    # The penalised window stays on the device (appended lazily), so a step can be queued before the token
    # it consumes has been read back.
    recent = mx.array(list(prompt_ids)[-repetition_context:])

    def choose(logits: mx.array) -> mx.array:
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, recent, repetition_penalty)
        return sampler(limit_vocab(logits, vocab_limit))

    if mtp and model.config.num_nextn_predict_layers and repetition_penalty == 1.0:
        from .speculative import mtp_generate
        yield from mtp_generate(model, pc, todo, stats=stats, max_tokens=max_tokens, eos_ids=eos_ids,
                                prefill_step_size=prefill_step_size, domain=domain, temp=temp, top_p=top_p,
                                top_k=top_k, min_p=min_p, policy=draft_policy, vocab_limit=vocab_limit)
        return
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
    for n in range(max_tokens):
        # Build and queue step n + 1 from the still-lazy token n before reading token n back, as mlx-lm's
        # generate_step does: the graph building (Python, ~1/5 of a 1b step) overlaps the evaluation of
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
    # The cache holds every token fed so far (not the last one when max_tokens ended the run).
    pc.tokens = pc.tokens[: pc.cache[0].offset]
    stats.generation_tps = stats.generation_tokens / max(time.perf_counter() - tic, 1e-9)
    stats.peak_memory_gb = mx.get_peak_memory() / 1e9


@dataclass
class GenerationResponse:
    text: str  # the new piece of text
    token: int
    stats: GenerationStats


def stream_generate(model: Model, tokenizer: Any, prompt: str | list[int], **kwargs) -> Iterator[GenerationResponse]:
    """Yield text pieces as tokens arrive; `kwargs` are `generate_tokens`' sampling options."""
    ids = tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
    kwargs.setdefault("eos_ids", (tokenizer.eos_id,))
    kwargs.setdefault("vocab_limit", tokenizer.vocab_size)
    stats = kwargs.pop("stats", None) or GenerationStats()
    decoder = tokenizer.stream_decoder()
    for t in generate_tokens(model, ids, stats=stats, **kwargs):
        piece = "" if t in kwargs["eos_ids"] else decoder.add(t)
        yield GenerationResponse(piece, t, stats)
    tail = decoder.flush()
    if tail:
        yield GenerationResponse(tail, -1, stats)


def generate(model: Model, tokenizer: Any, prompt: str | list[int], **kwargs) -> str:
    """The generated text (prompt excluded)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
