"""How the next token is chosen: `SamplingOptions`, the one sampling object (validated, field by field), which
plain decoding, speculative decoding and the batched engine all use; and `RowSampler`, which applies a
sequence's options to its logits step after step with its own seed, penalties, grammar and log-probabilities.

The logits processors themselves are `sample.py`'s pure functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx

from .sample import (apply_min_p, apply_presence_frequency, apply_repetition_penalty, apply_top_k, apply_top_p,
                     limit_vocab, scaled)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingOptions:
    """How one sequence's tokens are chosen. temp 0 is greedy. `repetition_penalty` (CTRL-style, over the last
    `repetition_context` tokens of prompt and output), `presence_penalty` and `frequency_penalty` (OpenAI's,
    over the output) are off at their defaults. `seed` makes sampling reproducible; `vocab_limit` (a tokenizer
    smaller than the model's vocabulary) keeps the ids past it from ever being chosen."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    vocab_limit: int | None = None

    def __post_init__(self) -> None:
        checks = {"temp": (_number(self.temp) and self.temp >= 0, "a number >= 0 (0 is greedy)"),
                  "top_p": (_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
                  "top_k": (_integer(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 is off)"),
                  "min_p": (_number(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1] (0 is off)"),
                  "repetition_penalty": (_number(self.repetition_penalty) and self.repetition_penalty > 0,
                                         "a number > 0 (1 is off)"),
                  "repetition_context": (_integer(self.repetition_context) and self.repetition_context >= 1,
                                         "an integer >= 1"),
                  "presence_penalty": (_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                                       "in [-2, 2] (0 is off)"),
                  "frequency_penalty": (_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                                        "in [-2, 2] (0 is off)"),
                  "seed": (self.seed is None or _integer(self.seed) and 0 <= self.seed < 2**63,
                           "an integer in [0, 2**63)"),
                  "vocab_limit": (self.vocab_limit is None or _integer(self.vocab_limit) and self.vocab_limit >= 1,
                                  "an integer >= 1")}
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no logits processor: the argmax of the (vocabulary-limited) raw logits."""
        return self.greedy and self.repetition_penalty == 1.0 and not self.presence_penalty \
            and not self.frequency_penalty

    @property
    def looks_back(self) -> bool:
        """Whether a choice depends on the tokens before it (a penalty)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)

    def replace(self, **changes: Any) -> "SamplingOptions":
        return SamplingOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def penalized(self, logits: mx.array, recent: mx.array | None = None, counts: mx.array | None = None
                  ) -> mx.array:
        """(..., V) -> (..., V'): the repetition penalty over `recent` (ids), presence and frequency over `counts`
        ((V,) times each token was output), then the vocabulary limit."""
        if recent is not None and self.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, recent, self.repetition_penalty)
        if counts is not None and (self.presence_penalty or self.frequency_penalty):
            logits = apply_presence_frequency(logits, counts, self.presence_penalty, self.frequency_penalty)
        return limit_vocab(logits, self.vocab_limit)

    def _filtered(self, logits: mx.array) -> mx.array:
        return apply_min_p(apply_top_p(apply_top_k(logits.astype(mx.float32), self.top_k), self.top_p), self.min_p)

    def draw(self, logits: mx.array, key: mx.array | None = None) -> mx.array:
        """(..., V) penalized logits -> the token(s) (...): argmax when greedy, else a draw (from `key`, or the
        global generator) after top-k, top-p and min-p, at the temperature."""
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        return mx.random.categorical(scaled(self._filtered(logits), self.temp), axis=-1, key=key)

    def distribution(self, logits: mx.array) -> mx.array:
        """(..., V) penalized logits -> the probabilities `draw` draws from (one-hot argmax when greedy): what
        speculative acceptance compares."""
        if self.greedy:
            return (mx.arange(logits.shape[-1]) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
        return mx.softmax(scaled(self._filtered(logits), self.temp), axis=-1)

    def draw_from(self, probs: mx.array) -> mx.array:
        """A token from `distribution`'s probabilities (V,)."""
        return mx.argmax(probs) if self.greedy else mx.random.categorical(mx.log(probs))


class RowSampler:
    """Chooses one sequence's tokens with its options: penalties over its own tokens, its grammar's mask, a
    random key of its own when seeded (the same tokens alone or among others); `accept(token)` records each.
    Log-probabilities are of the model's own distribution (the raw, vocabulary-limited logits)."""

    def __init__(self, options: SamplingOptions, *, history: list[int] = (), grammar: Any = None,
                 logprobs: int | None = None):
        self.options, self.grammar, self.logprobs = options, grammar, logprobs
        self.recent = list(history)[-options.repetition_context:]
        self.counts: mx.array | None = None  # (V,) times each token was output (presence and frequency penalties)
        self.key = None if options.seed is None else mx.random.key(options.seed)

    @property
    def simple(self) -> bool:
        """Whether `choose` is the raw logits' argmax (rows like this are chosen together, in one op)."""
        return self.options.plain_greedy and self.grammar is None and self.logprobs is None

    @property
    def runs_ahead(self) -> bool:
        """Whether the next token can be chosen before this one is read back: no penalty over the tokens so
        far, no grammar to advance."""
        return self.grammar is None and not self.options.looks_back

    def choose(self, logits: mx.array) -> mx.array:
        """(V,) raw logits -> the token (a lazy () array)."""
        o = self.options
        if self.counts is None and (o.presence_penalty or o.frequency_penalty):
            self.counts = mx.zeros((logits.shape[-1],), mx.int32)
        logits = o.penalized(logits.astype(mx.float32), mx.array(self.recent) if self.recent else None, self.counts)
        if self.grammar is not None:
            logits = mx.where(self.grammar.mask(logits.shape[-1]), logits, -mx.inf)
        key = None
        if self.key is not None and not o.greedy:
            self.key, key = mx.random.split(self.key)
        return o.draw(logits, key)

    def token_logprobs(self, logits: mx.array, token: mx.array) -> tuple[mx.array, mx.array, mx.array] | None:
        """(logprob of `token`, the top `logprobs` ids, their logprobs) under the raw logits, lazy; None when off."""
        if self.logprobs is None:
            return None
        logits = limit_vocab(logits, self.options.vocab_limit).astype(mx.float32)
        lp = logits - mx.logsumexp(logits)
        top = mx.argsort(-lp)[: max(self.logprobs, 1)]
        return lp[token], top, lp[top]

    def accept(self, token: int) -> None:
        self.recent = (self.recent + [token])[-self.options.repetition_context:]
        if self.counts is not None:
            self.counts = self.counts.at[token].add(1)
        if self.grammar is not None:
            self.grammar.consume(token)
