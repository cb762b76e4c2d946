"""Structured output: a grammar that constrains which tokens a sequence may sample, through llguidance (the
Rust constraint engine llama.cpp, vLLM and SGLang use: JSON Schema compiled lazily into a token-level mask
in microseconds per token, no per-vocabulary precompilation, and no PyTorch).

`Grammar.json(tokenizer, schema)` constrains a sequence to JSON text that validates against `schema` (None:
any JSON object); whitespace is compact, so a sequence cannot wander in blank space until it runs out of
tokens. The sampler asks `mask(V)` before each draw and tells `consume(token)` after.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np

_TOKENIZERS: dict[int, Any] = {}  # id(our tokenizer) -> llguidance's view of it (built once: 100k+ tokens)


def _ll_tokenizer(tokenizer: Any):
    import llguidance

    key = id(tokenizer)
    if key not in _TOKENIZERS:
        table = tokenizer.token_bytes()

        class View:  # what llguidance.TokenizerWrapper reads
            eos_token_id = tokenizer.eos_id
            bos_token_id = tokenizer.bos_id
            tokens = [b if b is not None else b"" for b in table]
            special_token_ids = [i for i, b in enumerate(table) if b is None]

            def __call__(self, text: str) -> list[int]:
                return tokenizer.encode(text)

        _TOKENIZERS[key] = (tokenizer, llguidance.LLTokenizer(llguidance.TokenizerWrapper(View())))
    return _TOKENIZERS[key][1]


class GrammarError(ValueError):
    """A schema llguidance cannot compile; the message says why."""


class Grammar:
    """One sequence's constraint (the matcher is stateful: one Grammar per sequence)."""

    def __init__(self, tokenizer: Any, grammar: str):
        import llguidance

        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), grammar)
        if self.matcher.is_error():
            raise GrammarError(f"response_format: {self.matcher.get_error()}")
        self.eos = tokenizer.eos_id

    @classmethod
    def json(cls, tokenizer: Any, schema: dict | None = None) -> "Grammar":
        """JSON text valid under `schema` (a JSON Schema object; None: any JSON object)."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema if schema is not None else {"type": "object"}),
                defaults={"whitespace_flexible": False})
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(f"response_format: the JSON schema cannot be used: {e}") from None
        return cls(tokenizer, grammar)

    def mask(self, vocab: int) -> mx.array:
        """(vocab,) bool: the tokens the grammar allows next (end of sequence once the text is complete)."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        if len(bits) < vocab:  # ids past the tokenizer (a padded vocabulary) are never allowed
            bits = np.concatenate([bits, np.zeros(vocab - len(bits), bool)])
        return mx.array(bits)

    def consume(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The text is complete and nothing more may follow."""
        return self.matcher.is_stopped()
