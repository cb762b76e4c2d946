"""Samplers and logits processors: pure functions of (logits, state) -> logits or token."""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]


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


def check_options(*, temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                  repetition_penalty: float = 1.0, repetition_context: int = 1, max_tokens: int = 0,
                  prefill_step_size: int = 1, seed: int | None = None) -> None:
    """ValueError naming the first option outside its range (NaN is outside every range)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks = [("--temp", temp, number(temp) and temp >= 0, "a number >= 0 (0 is greedy)"),
              ("--top-p", top_p, number(top_p) and 0 < top_p <= 1, "in (0, 1]"),
              ("--top-k", top_k, integer(top_k) and top_k >= 0, "an integer >= 0 (0 is off)"),
              ("--min-p", min_p, number(min_p) and 0 <= min_p <= 1, "in [0, 1] (0 is off)"),
              ("--repetition-penalty", repetition_penalty, number(repetition_penalty) and repetition_penalty > 0,
               "a number > 0 (1 is off)"),
              ("repetition_context", repetition_context, integer(repetition_context) and repetition_context >= 1,
               "an integer >= 1 (the tokens the penalty looks back over)"),
              ("--max-tokens", max_tokens, integer(max_tokens) and max_tokens >= 0, "an integer >= 0"),
              ("--seed", seed, seed is None or integer(seed) and 0 <= seed < 2**63, "an integer in [0, 2**63)"),
              ("--prefill-step-size", prefill_step_size, integer(prefill_step_size) and prefill_step_size >= 1,
               "an integer >= 1")]
    for name, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {value!r}")


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Sampler:
    """logits (B, V) -> tokens (B,). temp 0 is argmax."""
    check_options(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    if temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array) -> mx.array:
        logits = apply_min_p(apply_top_p(apply_top_k(logits.astype(mx.float32), top_k), top_p), min_p)
        return mx.random.categorical(scaled(logits, temp), axis=-1)

    return sample


def sampling_distribution(logits: mx.array, temp: float, top_p: float = 1.0, top_k: int = 0,
                          min_p: float = 0.0) -> mx.array:
    """The probabilities `make_sampler` draws from (needed by speculative acceptance). temp 0: one-hot argmax."""
    if temp == 0:
        return (mx.arange(logits.shape[-1]) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
    logits = apply_min_p(apply_top_p(apply_top_k(logits.astype(mx.float32), top_k), top_p), min_p)
    return mx.softmax(scaled(logits, temp), axis=-1)


def scaled(logits: mx.array, temp: float) -> mx.array:
    """logits / temp. At a tiny temperature the quotient overflows to inf and the draw turns uniform (NaN);
    shifted by the row's maximum first it stays finite, and the top token gets all the probability."""
    if temp < 1e-3:
        logits = logits - logits.max(axis=-1, keepdims=True)
    return logits / temp
