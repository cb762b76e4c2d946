"""A sequence that decodes alone on its own caches, as one of the engine's rows: MTP speculative decoding
(drafting pays only for a sequence alone) and models whose caches do not batch (DeepSeek-V4's compressed and
sliding-window caches, a pipeline rank's). The engine hands the tokens out like a batched row's."""

from __future__ import annotations

from typing import Any, Iterator

import mlx.core as mx

from ..model import Model
from .options import RowSampler, SamplingOptions
from .requests import Request
from .speculative import DraftPolicy, mtp_generate
from .steps import PromptCache, decode_step, prefill


def decodes_alone(model: Model, request: Request) -> bool:
    """Whether `request` runs alone: MTP drafting asked for, or caches that do not batch."""
    return bool(request.mtp) or not getattr(model, "fixed_capacity_steps", True)


def solo_tokens(model: Model, request: Request, options: SamplingOptions, pc: PromptCache, todo: list[int],
                eos: set[int], prefill_chunk: int, stats: Any) -> Iterator[int]:
    """The request's tokens, chosen with `options` (the request's, with the engine's vocabulary limit), from `pc`
    (already trimmed to the reused prefix; `todo` the prompt's rest), through the MTP drafter or the model's own
    eager step; `pc` holds the caches and their tokens when it ends."""
    r = request
    if r.mtp:
        policy = r.mtp if isinstance(r.mtp, DraftPolicy) else None
        yield from mtp_generate(model, pc, todo, stats=stats, max_tokens=r.max_tokens, eos_ids=tuple(eos),
                                prefill_step_size=prefill_chunk, domain=r.domain, options=options, policy=policy)
        return
    sampler = RowSampler(options, history=r.prompt)
    logits, _ = prefill(model, mx.array([todo]), pc.cache, step_size=prefill_chunk, domain=r.domain)
    pc.tokens = list(r.prompt)
    try:
        for n in range(r.max_tokens):
            t = sampler.choose(logits[0]).item()
            sampler.accept(t)
            pc.tokens.append(t)
            yield t
            if t in eos or n + 1 == r.max_tokens:
                return
            logits, _ = decode_step(model, mx.array([[t]]), pc.cache, r.domain)
    finally:  # the caches hold every token fed so far (not the last one handed out)
        pc.tokens = pc.tokens[: max(c.offset for c in pc.cache)]  # (a pipeline rank fills only its layers')
