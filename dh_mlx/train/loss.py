"""Training objective: next-token cross-entropy + lambda * MTP cross-entropy + alpha * sequence-wise balance loss.

Legend: B batch, T tokens, E routed experts, k experts per token, V vocabulary.

    CE      = sum(mask * -log p(target)) / sum(mask)
    MTP     = the same for the depth-1 module: from h_t and embed(token t+1) predict token t+2 (or, distilling
              the MTP module, cross-entropy against the main model's own distribution of token t+2)
    balance = alpha * sum over MoE layers of mean over sequences of sum_i f_i * P_i, where
              f_i = E / (k * T_valid) * (number of valid tokens choosing expert i),
              P_i = mean over valid tokens of s_i / sum_j s_j      (DeepSeek-V3 eqs. 17-20)
    loss    = CE + mtp_lambda * MTP + balance

The attention mask is `document_mask` (causal inside each packed document); `mask` is the batch's loss mask.
The PyTorch twin (dh_mlx/torch/step.py) implements the same terms over the same masks (not the distillation),
and torch/optim.py this trainer's AdamW and schedule; tests/test_twin_train.py compares their steps.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from ..model import Model
from ..model.moe import Routing
from ..ops import replaceable


class Batch(NamedTuple):
    inputs: mx.array  # (B, T) int32
    targets: mx.array  # (B, T) int32
    loss_mask: mx.array  # (B, T) float32
    segment_ids: mx.array  # (B, T) int32: document index inside the packed row
    domain_ids: mx.array  # (B, T) int32: -1 for no domain


class LossParts(NamedTuple):
    ce: mx.array
    mtp: mx.array
    balance: mx.array
    loads: mx.array  # (n_moe_layers incl. MTP, E) domain-free tokens routed to each expert (ALF's input)


def document_mask(segment_ids: mx.array) -> mx.array:
    """(B, T) -> (B, 1, T, T) bool: causal and inside the same packed document."""
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (mx.arange(T)[:, None] >= mx.arange(T)[None]))[:, None]


@replaceable("cross_entropy")
def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """(..., V) logits, (...) targets -> per-token cross-entropy (...), as `mlx.nn.losses.cross_entropy`."""
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def masked_ce(logits: mx.array, targets: mx.array, mask: mx.array, count: mx.array | None = None) -> mx.array:
    """Mean cross-entropy over the masked-in tokens, or their sum divided by `count` (a whole batch's count
    when these are some of its rows)."""
    return _masked_mean(cross_entropy(logits.astype(mx.float32), targets), mask, count)


def _masked_mean(per_token: mx.array, mask: mx.array, count: mx.array | None) -> mx.array:
    """(B, T) -> the mean over the masked-in tokens, or their sum divided by `count`."""
    return (per_token * mask).sum() / mx.maximum(mask.sum() if count is None else count, 1.0)


def masked_soft_ce(logits: mx.array, target_logits: mx.array, mask: mx.array,
                   count: mx.array | None = None) -> mx.array:
    """`masked_ce` against a distribution instead of a token: -sum_v softmax(target_logits)_v log softmax(logits)_v
    (the KL divergence from the target plus its constant entropy); no gradient into the target."""
    p = mx.stop_gradient(mx.softmax(target_logits.astype(mx.float32), axis=-1))
    q = logits.astype(mx.float32)
    return _masked_mean(mx.logsumexp(q, axis=-1) - (p * q).sum(axis=-1), mask, count)


def expert_counts(r: Routing, valid: mx.array, n_experts: int) -> mx.array:
    """(B, T, k) chosen experts -> (B, E) number of valid tokens per expert."""
    hits = (r.indices[..., None] == mx.arange(n_experts)).sum(axis=-2)  # (B, T, E)
    return (hits * valid[..., None]).sum(axis=1)


def balance_loss(routing: list[Routing], valid: mx.array, n_experts: int, top_k: int,
                 n_sequences: int | None = None) -> mx.array:
    """Summed over layers, averaged over the rows (or summed and divided by `n_sequences`, a whole batch's)."""
    if not routing:
        return mx.array(0.0)
    n_valid = mx.maximum(valid.sum(axis=1, keepdims=True), 1.0)  # (B, 1)
    total = mx.array(0.0)
    for r in routing:
        f = n_experts / (top_k * n_valid) * mx.stop_gradient(expert_counts(r, valid, n_experts))  # (B, E)
        p = r.scores / r.scores.sum(axis=-1, keepdims=True)  # (B, T, E)
        P = (p * valid[..., None]).sum(axis=1) / n_valid  # (B, E)
        total = total + (f * P).sum(axis=-1).sum()
    return total / (valid.shape[0] if n_sequences is None else n_sequences)


class Counts(NamedTuple):
    """What a batch's losses are averaged over; given to `loss_parts` for some of its rows, the parts of the
    rows add up to the batch's."""

    tokens: mx.array  # masked-in next-token targets
    mtp_tokens: mx.array  # masked-in MTP targets (token t+2 with t+1 also masked in)
    sequences: int  # rows


def greedy_next(logits: mx.array) -> mx.array:
    """The main model's greedy choice of token t+2 for each MTP position t: argmax of its logits at t+1."""
    return mx.stop_gradient(mx.argmax(logits[:, 1:], axis=-1))


def mtp_output(model: Model, hidden: mx.array, batch: Batch, mask):
    """The depth-1 MTP module at positions t = 0..T-2: the main model's hidden state (B, T, D) at t and the
    input token t+1 -> its Output for token t+2 (B, T-1, ...)."""
    sub = mask if isinstance(mask, str) else mask[..., :-1, :-1]
    return model.mtp_forward(hidden[:, :-1], batch.targets[:, :-1], 0, domain_ids=batch.domain_ids[:, :-1], mask=sub)


def mtp_mask(loss_mask: mx.array) -> mx.array:
    return loss_mask[:, 1:] * loss_mask[:, :-1]


def batch_counts(batch: Batch) -> Counts:
    return Counts(batch.loss_mask.sum(), mtp_mask(batch.loss_mask).sum(), batch.loss_mask.shape[0])


def loss_parts(model: Model, batch: Batch, *, mtp_lambda: float, balance_alpha: float,
               document_masking: bool = True, counts: Counts | None = None,
               mtp_distill: bool = False) -> tuple[mx.array, LossParts]:
    """The loss of `batch` and its parts; with `counts` of a larger batch that `batch` is some rows of, these
    rows' shares of that batch's loss and parts (summing the shares of all its rows gives them exactly).
    `mtp_distill`: the MTP module's target is the main model's next-token distribution instead of the data's
    token (what speculative decoding accepts: greedy its argmax, sampling min(p, q) summed)."""
    c = model.config
    if counts is None:
        counts = batch_counts(batch)
    mask = document_mask(batch.segment_ids) if document_masking else "causal"
    out = model.forward(batch.inputs, domain_ids=batch.domain_ids, mask=mask)
    ce = masked_ce(out.logits, batch.targets, batch.loss_mask, counts.tokens)
    routing = list(out.routing)
    mtp = mx.array(0.0)
    if mtp_lambda and c.num_nextn_predict_layers:
        m = mtp_output(model, mx.stop_gradient(out.hidden) if mtp_distill else out.hidden, batch, mask)
        if mtp_distill:  # towards the main model's own next-token distribution at t+1
            mtp = masked_soft_ce(m.logits, out.logits[:, 1:], mtp_mask(batch.loss_mask), counts.mtp_tokens)
        else:
            mtp = masked_ce(m.logits, batch.targets[:, 1:], mtp_mask(batch.loss_mask), counts.mtp_tokens)
        routing += m.routing
    valid = batch.loss_mask
    # ALF balances plain routing: tokens confined to their domain's experts would push every other expert's
    # bias up forever, so with domain routing only domain-free tokens count towards the loads.
    counted = valid * (batch.domain_ids < 0) if c.domain_routing is not None else valid
    E = c.n_routed_experts or 0
    bal = mx.array(0.0)
    loads = mx.zeros((0, max(E, 1)))
    if routing:
        main = routing[: len(out.routing)]
        if balance_alpha:
            bal = balance_alpha * balance_loss(main, valid, E, c.num_experts_per_tok, counts.sequences)
        loads = mx.stack([expert_counts(r, counted[:, : r.indices.shape[1]], E).sum(axis=0) for r in routing])
    loss = ce + mtp_lambda * mtp + bal
    return loss, LossParts(ce, mtp, bal, mx.stop_gradient(loads))


def alf_update(biases: list[mx.array], loads: mx.array, gamma: float, n_base: int | None = None) -> list[mx.array]:
    """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i), per MoE layer, over the first
    `n_base` experts: an added domain's experts take no id-less tokens, so their biases are left alone (a zero
    load would push them up for ever)."""
    n = loads.shape[-1] if n_base is None else n_base
    return [mx.concatenate([b[:n] + gamma * mx.sign(l[:n].mean() - l[:n]), b[n:]]) for b, l in zip(biases, loads)]


def imbalance(loads: mx.array) -> mx.array:
    """Max over mean expert load, averaged over layers (1.0 is perfectly balanced)."""
    return (loads.max(axis=-1) / mx.maximum(loads.mean(axis=-1), 1e-9)).mean()
