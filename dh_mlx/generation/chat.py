"""A multi-turn conversation over one prompt cache: each reply is generated from the whole conversation under
the tokenizer's chat template, and only what the cache does not already hold is prefilled."""

from __future__ import annotations

from typing import Any, Iterator

from ..chat import check_messages
from ..model import Model
from .generate import GenerationResponse, GenerationStats, stream_generate
from .steps import PromptCache


class Conversation:
    def __init__(self, model: Model, tokenizer: Any, *, system: str | None = None,
                 template_args: dict | None = None):
        """`template_args`: what a tokenizer.json chat template is rendered with (e.g. enable_thinking, tools)."""
        self.model, self.tokenizer = model, tokenizer
        self.template_args = template_args or {}
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cache = PromptCache.new(model)
        self.auto: tuple | None = None  # with domain="auto": inferred once, from the first turn (the cache holds
                                        # keys computed under that routing)

    def reply(self, text: str, *, stats: GenerationStats | None = None, **options) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to the user's `text` (options: `generate_tokens`'), then keep it in the
        conversation."""
        turn = {"role": "user", "content": text}
        ids = self.tokenizer.encode_chat(check_messages(self.messages + [turn]),
                                         limit=self.model.config.max_position_embeddings, **self.template_args)
        stats = stats if stats is not None else GenerationStats()
        if options.get("domain") == "auto":
            if self.auto is None:
                from .domains import infer_domain
                self.auto = infer_domain(self.model, ids)
            options["domain"], stats.domain_posterior = self.auto
        pieces = []
        for r in stream_generate(self.model, self.tokenizer, ids, prompt_cache=self.cache, stats=stats, **options):
            pieces.append(r.text)
            yield r
        self.messages += [turn, {"role": "assistant", "content": "".join(pieces)}]  # once the reply is whole
