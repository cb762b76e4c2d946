"""`--domain auto`: the domain inferred from the prompt, as DEMix infers it: the prompt's likelihood under
each domain's routing (one batched forward pass, a row per domain), turned into a posterior with a uniform
prior; generation then routes by the most probable domain."""

from __future__ import annotations

import mlx.core as mx

from ..model import Model

MAX_TOKENS = 256  # the prompt's first tokens that vote: enough for the likelihoods to separate


def domain_posterior(model: Model, prompt_ids: list[int]) -> dict[str, float] | None:
    """P(domain | prompt) for each of the model's domains, or None for a prompt too short to judge (one
    token: nothing is predicted)."""
    dr = model.config.domain_routing
    if dr is None:
        raise ValueError("`domain=\"auto\"` needs a model with a domain_routing block in its config.json")
    ids = [int(i) for i in list(prompt_ids)[:MAX_TOKENS]]
    if len(ids) < 2:
        return None
    D = len(dr.names)
    # rows of domains per pass: all at once unless their float32 logits would pass ~256 MB (large vocabularies)
    per = max(1, min(D, (256 << 20) // (4 * len(ids) * model.config.vocab_size)))
    nll = []
    for start in range(0, D, per):
        d = mx.arange(start, min(start + per, D))
        rows = mx.array([ids] * d.size)  # the same prompt, row i routed as domain d[i]
        logits = model(rows[:, :-1], domain_ids=d).astype(mx.float32)  # (rows, T-1, V)
        gold = mx.take_along_axis(logits, rows[:, 1:, None], -1)[..., 0]
        nll.append((mx.logsumexp(logits, axis=-1) - gold).sum(-1))
    post = mx.softmax(-mx.concatenate(nll), axis=0)  # the log-likelihoods summed over the prompt; uniform prior
    return dict(zip(dr.names, post.tolist()))


def infer_domain(model: Model, prompt_ids: list[int]) -> tuple[int | None, dict[str, float] | None]:
    """(the most probable domain's id, the posterior), or (None, None) when the prompt cannot tell."""
    post = domain_posterior(model, prompt_ids)
    if post is None:
        return None, None
    best = max(post, key=post.get)
    return model.config.domain_routing.domain_id(best), post
