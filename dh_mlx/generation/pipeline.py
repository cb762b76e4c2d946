"""Pipeline-parallel generation over `mx.distributed` (launched by `mlx.launch`), for a model larger than one
machine: rank r holds a contiguous range of decoder layers (rank 0 the embedding, the last rank the final norm
and the head) and reads only those weights. A forward pass receives the hidden state from rank r - 1, runs the
rank's layers (each with its own KV cache), and sends it on to rank r + 1; the last rank's logits are shared
with every rank (one all_sum of B x T x V), so each runs the same sampling loop with the same seed and draws
the same tokens. No MTP drafting, no compiled step: what the ranks exchange must be evaluated in order.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..model.transformer import Output


def split_layers(n_layers: int, ranks: int) -> list[range]:
    """Contiguous, as-even-as-possible ranges of decoder layers, the earlier ranks taking the remainder."""
    if ranks > n_layers:
        raise ValueError(f"a pipeline over {ranks} ranks needs at least as many decoder layers; the model has "
                         f"{n_layers}")
    base, extra = divmod(n_layers, ranks)
    bounds = [0]
    for r in range(ranks):
        bounds.append(bounds[-1] + base + (r < extra))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class _Stack:
    """What `prefill` calls as `model.model(tokens, cache, domain_ids)`: the pipelined decoder stack."""

    def __init__(self, pipe: "PipelineModel"):
        self.pipe = pipe

    def __call__(self, inputs, cache=None, domain_ids=None, mask="causal"):
        return self.pipe.hidden(inputs, cache, domain_ids, mask), []


class PipelineModel:
    """This rank's part of `model` (loaded with `layers=own`), as generation calls a model: `forward`,
    `model(...)`, `config` (without MTP). `pipelined` tells `prefill` to evaluate each chunk's output, which
    carries the send to the next rank."""

    pipelined = True
    fixed_capacity_steps = False  # each step crosses ranks: decoded with the eager step,
    drafts_with_mtp = False  # and without MTP drafting

    def __init__(self, model, group: Any, own: range, dtype: mx.Dtype):
        self.inner, self.group, self.own, self.dtype = model, group, own, dtype
        self.rank, self.size = group.rank(), group.size()
        self.config = model.config.replace(num_nextn_predict_layers=0)
        self.model = _Stack(self)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def _run(self, inputs, cache, domain_ids, mask) -> mx.array:
        """This rank's layers on what the previous rank sent (rank 0: on the embedded tokens)."""
        m = self.inner.model
        B, T = inputs.shape
        if self.first:
            h = m.embed_tokens(inputs)
        else:
            h = mx.distributed.recv((B, T, self.config.hidden_size), self.dtype, self.rank - 1, group=self.group)
        shared = {}  # sparse-attention selections; a rank starting at a "shared" layer is refused by name
        for i in self.own:
            h, _ = m.layers[i](h, mask, None if cache is None else cache[i], domain_ids, shared)
        return h

    def hidden(self, inputs, cache=None, domain_ids=None, mask="causal") -> mx.array:
        """The stack's final hidden state on the last rank; elsewhere zeros that depend on the send."""
        h = self._run(inputs, cache, domain_ids, mask)
        if self.last:
            return self.inner.model.norm(h)
        sent = mx.distributed.send(h.astype(self.dtype), self.rank + 1, group=self.group)  # what the next receives
        return mx.depends(mx.zeros_like(h), sent)

    def forward(self, inputs, cache=None, domain_ids=None, mask="causal") -> Output:
        """Logits (B, T, V) on every rank (the last rank's, all-summed); the hidden state is not shared."""
        h = self.hidden(inputs, cache, domain_ids, mask)
        B, T = inputs.shape
        logits = self.inner.head(h) if self.last else mx.depends(
            mx.zeros((B, T, self.config.vocab_size), h.dtype), h)
        return Output(mx.distributed.all_sum(logits, group=self.group), h, [])

    def __call__(self, inputs, cache=None, domain_ids=None, mask="causal") -> mx.array:
        return self.forward(inputs, cache, domain_ids, mask).logits
