"""How the next token is chosen: `SamplingOptions` (validated, one place), and `RowSampler`, which applies them
to one sequence's logits step after step with its own seed, penalties, grammar and log-probabilities.

The logits processors and samplers themselves are `sample.py`'s pure functions.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx

from .sample import apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p, scaled


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling options of one sequence. temp 0 is greedy. `repetition_penalty` (CTRL-style, over the last
    `repetition_context` tokens of prompt and output), `presence_penalty` and `frequency_penalty` (OpenAI's,
    over the output) are off at their defaults."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

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
                                        "in [-2, 2] (0 is off)")}
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no logits processor: the argmax of the raw logits."""
        return self == SamplingOptions(repetition_context=self.repetition_context)

    def replace(self, **changes: Any) -> "SamplingOptions":
        return SamplingOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def check_seed(seed: int | None) -> None:
    if seed is not None and not (_integer(seed) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")


class RowSampler:
    """Chooses one sequence's tokens: `logits(raw)` applies the penalties, the vocabulary limit and the
    grammar's mask; `choose` draws (argmax when greedy) with this sequence's own random key when seeded;
    `accept(token)` records the token. Log-probabilities are of the model's own distribution (raw logits)."""

    def __init__(self, options: SamplingOptions, *, history: list[int] = (), seed: int | None = None,
                 vocab_limit: int | None = None, grammar: Any = None, logprobs: int | None = None):
        check_seed(seed)
        self.options, self.vocab_limit, self.grammar, self.logprobs = options, vocab_limit, grammar, logprobs
        self.recent = list(history)[-options.repetition_context:]
        self.counts: Counter[int] = Counter()  # output tokens so far (presence and frequency penalties)
        self.key = None if seed is None else mx.random.key(seed)

    @property
    def simple(self) -> bool:
        """Whether `choose` is the raw logits' argmax (rows like this are chosen together, in one op)."""
        return self.options.plain_greedy and self.grammar is None and self.logprobs is None

    @property
    def runs_ahead(self) -> bool:
        """Whether the next token can be chosen before this one is read back: no penalty over the tokens so
        far, no grammar to advance."""
        o = self.options
        return (self.grammar is None and o.repetition_penalty == 1.0 and not o.presence_penalty
                and not o.frequency_penalty)

    def logits(self, logits: mx.array) -> mx.array:
        """(V,) raw -> (V',) the logits tokens are drawn from."""
        o = self.options
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits = logits[: self.vocab_limit]
        logits = logits.astype(mx.float32)
        if o.repetition_penalty != 1.0 and self.recent:
            logits = apply_repetition_penalty(logits, mx.array(self.recent), o.repetition_penalty)
        if (o.presence_penalty or o.frequency_penalty) and self.counts:
            ids = mx.array(list(self.counts))
            n = mx.array(list(self.counts.values()), mx.float32)
            logits = logits.at[ids].add(-(o.presence_penalty + o.frequency_penalty * n))
        if self.grammar is not None:
            logits = mx.where(self.grammar.mask(logits.shape[-1]), logits, -mx.inf)
        return logits

    def choose(self, logits: mx.array) -> mx.array:
        """(V,) raw logits -> the token (a lazy () array)."""
        o = self.options
        logits = self.logits(logits)
        if o.temp == 0:
            return mx.argmax(logits)
        logits = apply_min_p(apply_top_p(apply_top_k(logits, o.top_k), o.top_p), o.min_p)
        key = None
        if self.key is not None:
            self.key, key = mx.random.split(self.key)
        return mx.random.categorical(scaled(logits, o.temp), key=key)

    def token_logprobs(self, logits: mx.array, token: mx.array) -> tuple[mx.array, mx.array, mx.array] | None:
        """(logprob of `token`, the top `logprobs` ids, their logprobs) under the raw logits, lazy; None when off."""
        if self.logprobs is None:
            return None
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits = logits[: self.vocab_limit]
        lp = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32))
        k = max(self.logprobs, 1)
        top = mx.argsort(-lp)[:k]
        return lp[token], top, lp[top]

    def accept(self, token: int) -> None:
        self.recent = (self.recent + [token])[-self.options.repetition_context:]
        self.counts[token] += 1
        if self.grammar is not None:
            self.grammar.consume(token)
