"""Validation: cross-entropy, expert load per domain and MTP agreement over the held-out rows."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..model import Model
from .config import TrainConfig
from .data import Batch as NpBatch, Dataset, drop_domains
from .distributed import Reducer, World
from .loss import Batch, document_mask, expert_counts, greedy_next, imbalance, masked_ce, mtp_mask, mtp_output


def to_mx(b: NpBatch) -> Batch:
    return Batch(*(mx.array(a) for a in b))


@dataclass
class EvalResult:
    loss: float
    tokens: int
    imbalance: float | None
    domain_load: list[list[float]] | None  # (domains + 1 for 'none', E): expert choices summed over MoE layers
    # Share of MTP positions whose draft (the MTP module's argmax) is the main model's greedy token: what
    # greedy `--mtp` decoding accepts, teacher-forced. None without MTP modules.
    mtp_agreement: float | None = None


def evaluate(model: Model, dataset: Dataset, cfg: TrainConfig, *, use_domains: bool = True,
             w: World | None = None) -> EvalResult:
    """Validation cross-entropy and expert load over up to `eval_batches` batches (domain ids hidden unless
    `use_domains`); with several ranks `w`, each takes every `w.size`-th batch and the sums are shared."""
    w = w or World(None)
    c = model.config
    E = c.n_routed_experts or 0
    n_dom = len(c.domain_routing.names) if c.domain_routing else 0

    def batch_stats(*arrays):
        b = Batch(*arrays)
        mask = document_mask(b.segment_ids)
        out = model.forward(b.inputs, domain_ids=b.domain_ids, mask=mask)
        ce_sum = masked_ce(out.logits, b.targets, b.loss_mask) * b.loss_mask.sum()
        agree = mx.zeros((2,))
        if c.num_nextn_predict_layers:
            m = mtp_output(model, out.hidden, b, mask)
            valid = mtp_mask(b.loss_mask)
            agree = mx.stack([((mx.argmax(m.logits, axis=-1) == greedy_next(out.logits)) * valid).sum(), valid.sum()])
        if not out.routing:
            return ce_sum, b.loss_mask.sum(), mx.zeros((1, 1)), mx.zeros((1, 1)), agree
        loads = mx.stack([expert_counts(r, b.loss_mask, E).sum(axis=0) for r in out.routing])  # (layers, E)
        dom = (b.domain_ids[..., None] + 1 == mx.arange(n_dom + 1)) * b.loss_mask[..., None]  # (B, T, D+1)
        hits = sum((r.indices[..., None] == mx.arange(E)).sum(axis=-2) for r in out.routing)  # (B, T, E)
        per_domain = mx.einsum("btd,bte->de", dom.astype(mx.float32), hits.astype(mx.float32))
        return ce_sum, b.loss_mask.sum(), loads, per_domain, agree

    if len(dataset.valid) == 0:
        return EvalResult(float("nan"), 0, None, None)
    ce_total, n_total, arrays = 0.0, 0.0, None
    batches = dataset.valid_batches(cfg.batch_size)
    # the rows one process on the global batch would score, each rank reading only its own batches
    for i in range(w.rank, min(batches.batches_per_epoch, cfg.eval_batches * w.size), w.size):
        nb = batches.batch_at(i)
        if not use_domains:
            nb = drop_domains(nb, 1.0, 0, 0)
        ce_sum, n, *stats = batch_stats(*to_mx(nb))
        mx.eval(ce_sum, n, *stats)
        ce_total += ce_sum.item()
        n_total += n.item()
        arrays = stats if arrays is None else [t + s for t, s in zip(arrays, stats)]
    if w.size > 1:  # summed over the ranks; one with no batch of its own adds zeros
        if arrays is None:
            arrays = [mx.zeros_like(s) for s in batch_stats(*to_mx(dataset.valid_batches(1).batch_at(0)))[2:]]
        sums, arrays = Reducer(w).sum([mx.array([ce_total, n_total]), arrays])
        ce_total, n_total = sums.tolist()
    loads_total, dom_total, agree_total = arrays[0], arrays[1], np.array(arrays[2])
    imb = imbalance(loads_total).item() if E else None
    return EvalResult(ce_total / max(n_total, 1.0), int(n_total), imb,
                      np.array(dom_total).tolist() if E else None,
                      float(agree_total[0] / agree_total[1]) if c.num_nextn_predict_layers and agree_total[1] else None)
