"""MTP self-speculative decoding: the MTP module drafts one token, the main model verifies it in one forward.

Per step the main model reads [last token, draft] (2 positions); the draft is kept with probability
min(1, p(d)/q(d)) (standard speculative sampling: greedy when temp = 0, where it reduces to "draft == argmax"),
so the output follows the main model's distribution exactly. A rejected draft's cache position is trimmed.
"""

from __future__ import annotations

import time
from typing import Iterator

import mlx.core as mx

from .cache import LatentCache
from .generate import compiled_cached_step
from .model import Model
from .sample import sampling_distribution


def mtp_generate(model: Model, pc, todo: list[int], *, stats, max_tokens: int, eos_ids=(),
                 prefill_step_size: int = 512, domain: int | None = None, temp: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0) -> Iterator[int]:
    """Yield tokens like `generate_tokens`; `pc` is a PromptCache already trimmed to the reused prefix."""
    d = None if domain is None else mx.array([domain])
    cache = pc.cache
    if pc.tokens:  # the MTP cache is not kept across calls: rebuild it from scratch with the main cache
        for c in cache:
            c.trim(c.offset)
        todo = pc.tokens + todo
        pc.tokens = []
    mtp_cache = LatentCache()
    # Both per-draft forwards are compiled fixed-capacity steps (see generate.compiled_cached_step).
    verify = compiled_cached_step(lambda tokens, views, mask: model.forward(tokens, views, d, mask=mask))
    propose = compiled_cached_step(
        lambda tokens, views, mask, hidden: model.mtp_forward(hidden, tokens, 0, views[0], d, mask),
        caches_of=lambda c: [c])

    def dist(logits: mx.array) -> mx.array:  # (1, V) -> (V,) the distribution sampling draws from
        return sampling_distribution(logits, temp, top_p, top_k, min_p)[0]

    def draw(probs: mx.array) -> mx.array:
        return mx.argmax(probs) if temp == 0 else mx.random.categorical(mx.log(probs))

    ids = mx.array([todo])
    T = len(todo)

    tic = time.perf_counter()
    h = None
    for s in range(0, T, prefill_step_size):
        e = min(s + prefill_step_size, T)
        h, _ = model.model(ids[:, s:e], cache, d)  # (1, L, D) normalised hidden states
        known = min(e, T - 1) - s  # positions whose next token is already in the prompt
        if known > 0:
            model.mtp_forward(h[:, :known], ids[:, s + 1: s + 1 + known], cache=mtp_cache, domain_ids=d)
        mx.eval(h, *([] if mtp_cache.latent is None else [mtp_cache.latent]))
    h_last = h[:, -1:]
    token = draw(dist(model.head(h_last[:, 0]))).item()
    stats.prompt_tokens, stats.prompt_tps = T, T / (time.perf_counter() - tic)
    pc.tokens = list(todo)

    tic = time.perf_counter()
    emitted = 0

    def emit(t: int) -> bool:
        nonlocal emitted
        emitted += 1
        pc.tokens.append(t)
        stats.generation_tokens = emitted
        return t in eos_ids or emitted >= max_tokens

    done = emit(token)
    yield token
    tok = mx.array(token)
    q = dist(propose(tok.reshape(1, 1), mtp_cache, h_last)[0][:, -1])
    while not done:
        # Everything up to the accept decision stays lazy: one host sync per draft.
        draft = draw(q)
        logits, hidden = verify(mx.stack([tok, draft])[None], cache)  # positions of token and draft
        p0, p1 = dist(logits[:, 0]), dist(logits[:, 1])
        ratio = p0[draft] / mx.maximum(q[draft], 1e-20)
        accept = (ratio >= 1.0) | (mx.random.uniform() < ratio)
        residual = mx.maximum(p0 - q, 0.0)
        bonus, correction = draw(p1), draw(residual / mx.maximum(residual.sum(), 1e-20))
        mx.eval(accept, draft, bonus, correction)
        stats.drafted += 1
        if accept.item():
            stats.accepted += 1
            new = [draft.item(), bonus.item()]
            tok = bonus
        else:
            for c in cache:
                c.trim(1)  # the rejected draft's position
            new = [correction.item()]
            hidden, tok = hidden[:, :1], correction
        for t in new:
            done = emit(t)
            yield t
            if done:
                break
        if not done:
            nxt = mx.array(new)[None]
            q = dist(propose(nxt, mtp_cache, hidden)[0][:, -1])
    pc.tokens = pc.tokens[: cache[0].offset]
    stats.generation_tps = emitted / max(time.perf_counter() - tic, 1e-9)
    stats.peak_memory_gb = mx.get_peak_memory() / 1e9
