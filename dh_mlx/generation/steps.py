"""Generation steps, each usable and compilable alone: prefill, decode_step, and the compiled fixed-capacity
step that decoding, verification and drafting share."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import mlx.core as mx

from ..model import Model
from ..progress import Task
from .cache import LatentCache, StepCache, make_cache


@dataclass
class PromptCache:
    """A latent cache plus the tokens it holds, reusable across calls that share a prompt prefix."""

    cache: list[LatentCache]
    tokens: list[int] = field(default_factory=list)
    mtp_cache: LatentCache | None = None  # the MTP module's, from the last MTP generation
    # The main model's hidden states (1, K, D) at the K cached positions after the MTP cache's last: their MTP
    # entries wait for the next tokens, so a later call runs them instead of prefilling those positions again.
    mtp_hidden: mx.array | None = None

    @classmethod
    def new(cls, model: Model) -> "PromptCache":
        return cls(make_cache(model.config))

    def reuse(self, prompt: list[int]) -> list[int]:
        """Trim to the longest common prefix with `prompt`; return the prompt tokens still to prefill."""
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # always recompute at least one token for its logits
        if common < len(self.tokens) and not all(getattr(c, "trimmable", True) for c in self.cache):
            self.cache, common = [type(c)() for c in self.cache], 0  # (DeepSeek-V4's: start again)
        for c in self.cache:
            c.trim(c.offset - common)
        if self.mtp_cache is not None:  # its entry t ran on token t + 1, which must be in the kept prefix
            kept = min(self.mtp_cache.offset, max(common - 1, 0))
            if self.mtp_hidden is not None:  # pending hidden states of positions kept..common-1, if still held
                ok = kept == self.mtp_cache.offset and self.mtp_hidden.shape[1] >= common - kept
                self.mtp_hidden = self.mtp_hidden[:, : common - kept] if ok else None
            self.mtp_cache.trim(self.mtp_cache.offset - kept)
        self.tokens = self.tokens[:common]
        return prompt[common:]


def domain_array(domain: int | None) -> mx.array | None:
    return None if domain is None else mx.array([domain])


def prefill(model: Model, tokens: mx.array, cache: list[LatentCache], *, step_size: int = 512,
            domain: int | None = None, mtp_cache: LatentCache | None = None) -> tuple[mx.array, mx.array]:
    """Run the prompt (1, T) through the cache in chunks; returns (last logits (1, V), last hidden (1, D)).

    Each chunk after the first attends through the absorbed path, so per-head K/V never exist for more than
    one chunk. With `mtp_cache`, the MTP module also runs over every position but the last (whose next token
    the prompt gives): what speculative decoding drafts from.
    """
    d = domain_array(domain)
    T = tokens.shape[1]
    with Task("prefill", T, "tokens") as task:  # (shown by the CLI when it takes a while)
        for start in range(0, T - 1, step_size):
            end = min(start + step_size, T - 1)
            h, _ = model.model(tokens[:, start:end], cache, d)
            if mtp_cache is not None:
                model.mtp_forward(h, tokens[:, start + 1:end + 1], cache=mtp_cache, domain_ids=d)
            mx.eval([c.arrays() for c in cache], [] if mtp_cache is None else mtp_cache.arrays(),
                    h if getattr(model, "pipelined", False) else [])  # a pipeline rank's output carries its send
            task.advance(end - start)
    out = model.forward(tokens[:, T - 1:], cache, d)
    return out.logits[:, -1], out.hidden[:, -1]


def decode_step(model: Model, token: mx.array, cache: list[LatentCache], domain: int | None = None):
    """One token (1, 1) -> (logits (1, V), hidden (1, D))."""
    out = model.forward(token, cache, domain_array(domain))
    return out.logits[:, -1], out.hidden[:, -1]


def compiled_cached_step(forward, caches_of=lambda cache: cache):
    """Compile `forward(tokens (1, L), caches, mask, *args) -> Output` over fixed-capacity cache views.

    Returns run(tokens, cache, *args) -> (logits (1, L, V), hidden (1, L, D)) that advances the caches by L.
    Each layer writes its new latents at an array offset into the cache's whole 256-position chunk and
    attends over it under a mask (`StepCache`), so `mx.compile` traces once per chunk (and per L) and reuses
    its fused kernels in between. The cache buffers are taken out of the caches for the call, so the step's
    slice updates write in place. `caches_of` maps the argument to its list of LatentCaches.
    """

    def step(has_index, tokens, offset, latents, k_pes, index_ks, *args):
        index_ks = iter(index_ks)  # the layers with an indexer (has_index) have its key buffer too
        views = [StepCache(lat, kpe, offset, next(index_ks) if has else None)
                 for lat, kpe, has in zip(latents, k_pes, has_index)]
        out = forward(tokens, views, views[0].valid_mask(tokens.shape[1]), *args)
        return (out.logits, out.hidden, [v.latent for v in views], [v.k_pe for v in views],
                [v.index_k for v in views if v.index_k is not None])

    compiled: dict[tuple, object] = {}  # one compiled step per layout of indexer buffers (one per model)

    def run(tokens: mx.array, cache, *args) -> tuple[mx.array, mx.array]:
        caches = caches_of(cache)
        # nothing cached yet (no capacity to write into), or caches of another kind (DeepSeek-V4's): eager
        if not caches[0].has_past or not getattr(caches[0], "fixed_capacity", True):
            out = forward(tokens, caches, "causal", *args)
            return out.logits, out.hidden
        L = tokens.shape[1]
        for c in caches:
            c.reserve(L)
        has_index = tuple(c.index_k is not None for c in caches)
        if has_index not in compiled:
            compiled[has_index] = mx.compile(partial(step, has_index))
        latents, k_pes = [c.latent for c in caches], [c.k_pe for c in caches]
        index_ks = [c.index_k for c in caches if c.index_k is not None]
        for c in caches:
            c.latent = c.k_pe = c.index_k = None
        logits, hidden, latents, k_pes, index_ks = compiled[has_index](
            tokens, mx.array(caches[0].offset, mx.int32), latents, k_pes, index_ks, *args)
        index_ks = iter(index_ks)
        for c, lat, kpe, has in zip(caches, latents, k_pes, has_index):
            c.latent, c.k_pe = lat, kpe
            c.index_k = next(index_ks) if has else None
            c.offset += L
        return logits, hidden

    return run


def compiled_decode_step(model: Model, domain: int | None = None):
    """`decode_step` as one `mx.compile`d function (see `compiled_cached_step`): (token (1, 1), cache) ->
    (logits (1, V), hidden (1, D))."""
    d = domain_array(domain)
    run = compiled_cached_step(lambda tokens, views, mask: model.forward(tokens, views, d, mask=mask))

    def step(token: mx.array, cache: list[LatentCache]) -> tuple[mx.array, mx.array]:
        logits, hidden = run(token, cache)
        return logits[:, -1], hidden[:, -1]

    return step


def check_context(model: Model, n_tokens: int) -> None:
    limit = model.config.max_position_embeddings
    if n_tokens > limit:
        raise ValueError(f"prompt plus generation needs {n_tokens} positions but the model's context "
                         f"(max_position_embeddings) is {limit}")
