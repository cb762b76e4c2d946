"""Greedy generation on the latent cache: prefill, one decode step, and the loop (absorbed MLA throughout)."""

from __future__ import annotations

import torch

from .cache import LatentCache, make_cache
from .model import Model


@torch.inference_mode()
def prefill(model: Model, prompt_ids: torch.Tensor, cache: list[LatentCache],
            domain_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt (B, T) into an empty `cache`; returns the last position's logits (B, V)."""
    return model(prompt_ids, cache=cache, domain_ids=domain_ids)[:, -1]


@torch.inference_mode()
def decode_step(model: Model, tokens: torch.Tensor, cache: list[LatentCache],
                domain_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row (B,) through the cached model; returns its logits (B, V)."""
    return model(tokens[:, None], cache=cache, domain_ids=domain_ids)[:, -1]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@torch.inference_mode()
def generate_greedy(model: Model, prompt_ids: torch.Tensor, max_tokens: int, *,
                    domain_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The `max_tokens` greedy continuations (B, max_tokens) of `prompt_ids` (B, T) (or (T,), giving (max_tokens,)).

    `domain_ids` (B,) applies to prompt and continuation alike; a per-token (B, T) map is for the prompt
    only, so generation takes (B,) here.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    device = next(model.parameters()).device
    single = prompt_ids.dim() == 1
    ids = (prompt_ids[None] if single else prompt_ids).to(device)
    if domain_ids is not None:
        domain_ids = domain_ids.to(device)
        if domain_ids.dim() != 1:
            raise ValueError(f"domain_ids must have shape (B,) for generation, got {tuple(domain_ids.shape)}")
    cache = make_cache(model.config)
    token = greedy(prefill(model, ids, cache, domain_ids))  # (B,)
    out = [token]
    for _ in range(max_tokens - 1):
        token = greedy(decode_step(model, token, cache, domain_ids))
        out.append(token)
    result = torch.stack(out, dim=1)  # (B, max_tokens)
    return result[0] if single else result
