"""Logits processors: pure functions of (logits, state) -> logits, one of each. `options.SamplingOptions`
composes them into the one way a token is chosen."""

from __future__ import annotations

import mlx.core as mx


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits per row (ties at the k-th value kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.sort(logits, axis=-1)[..., -k][..., None]
    return mx.where(logits >= kth, logits, -mx.inf)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    sorted_kept = mx.where(before < p, sorted_logits, -mx.inf)
    return mx.put_along_axis(mx.full(logits.shape, -mx.inf, logits.dtype), order, sorted_kept, axis=-1)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    threshold = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(min_p))
    return mx.where(logprobs >= threshold, logits, -mx.inf)


def apply_repetition_penalty(logits: mx.array, previous: mx.array, penalty: float) -> mx.array:
    """CTRL-style penalty on tokens already seen: positive logits divided, negative multiplied."""
    if penalty == 1.0 or previous.size == 0:
        return logits
    seen = mx.take(logits, previous, axis=-1)
    seen = mx.where(seen > 0, seen / penalty, seen * penalty)
    return mx.put_along_axis(logits, mx.broadcast_to(previous, (*logits.shape[:-1], previous.size)), seen, axis=-1)


def apply_presence_frequency(logits: mx.array, counts: mx.array, presence: float, frequency: float) -> mx.array:
    """OpenAI's penalties on the output so far: a token seen `counts[id]` times (counts (V,)) loses
    presence (once seen) + frequency x its count."""
    counts = counts[: logits.shape[-1]].astype(mx.float32)
    return logits - (presence * (counts > 0) + frequency * counts)


def limit_vocab(logits: mx.array, vocab_limit: int | None) -> mx.array:
    """(..., V) -> (..., vocab_limit): the ids a tokenizer smaller than the model's vocabulary can decode."""
    return logits if vocab_limit is None or vocab_limit >= logits.shape[-1] else logits[..., :vocab_limit]


def scaled(logits: mx.array, temp: float) -> mx.array:
    """logits / temp. At a tiny temperature the quotient overflows to inf and the draw turns uniform (NaN);
    shifted by the row's maximum first it stays finite, and the top token gets all the probability."""
    if temp < 1e-3:
        logits = logits - logits.max(axis=-1, keepdims=True)
    return logits / temp
