"""One training step of the twin: the MLX trainer's objective (`dh_mlx/train/loss.py`) term for term, MLX's AdamW
and schedule (`optim.py`), then the ALF bias update.

Legend: B rows, T tokens per row, V vocab, E routed experts, k experts per token. A batch is the data
pipeline's (`dh_mlx/train/data.py`): packed rows of several documents, each token with its document's
segment id, a loss mask (1 where the target is a trained token of the input's document: never a prompt, a
non-assistant turn, padding or the next document's `<s>`) and a domain id (-1: none).

    mask    = document_mask(segment_ids): causal and inside the same document, in every layer and the MTP module
    CE      = sum(loss_mask * -log p(target)) / sum(loss_mask)
    MTP     = the same for the depth-1 module (DeepSeek-V3 section 2.2; deeper modules are not trained): at
              t < T-1, from the main model's final hidden state h_t and the embedding of token t+1 (its target
              t) predict target t+1, counted where loss_mask is 1 at both t and t+1, the mask cut to T-1
    balance = alpha * sum over the main stack's MoE layers of mean over rows of sum_i f_i * P_i, where
              f_i = E / (k * T_valid) * (number of valid tokens choosing expert i)   (no gradient),
              P_i = mean over valid tokens of s_i / sum_j s_j   (valid: loss_mask; DeepSeek-V3 eqs. 17-20)
    loss    = CE + mtp_lambda * MTP + balance
    loads   = per MoE layer (main stack, then MTP), the tokens routed to each expert, counted over valid tokens
              (the MTP module's at t by loss_mask at t), and with domain routing only over tokens without a
              domain (tokens confined to their domain's experts would push every other bias up)
    ALF     = after the optimizer step: bias_i += alf_gamma * sign(mean load - load_i) over the first n_base
              experts of each layer (an added domain's experts take no id-less token: their biases stay)

With `counts` of a larger batch (data-parallel ranks), the terms are these rows' shares of that batch's:
the ranks' shares add up to the batch's terms and gradients.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..train.config import TrainConfig
from .model import Model
from .moe import Routing
from .optim import AdamW


class Batch(NamedTuple):
    """`dh_mlx.train.loss.Batch` in torch tensors."""

    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64
    loss_mask: torch.Tensor  # (B, T) float32
    segment_ids: torch.Tensor  # (B, T) int64: document index inside the packed row (-1 on padding)
    domain_ids: torch.Tensor  # (B, T) int64: -1 for no domain

    @classmethod
    def from_numpy(cls, b, device: torch.device | str = "cpu") -> "Batch":
        """From the data pipeline's numpy batch (`dh_mlx.train.data.Batch`)."""
        dtypes = (torch.int64, torch.int64, torch.float32, torch.int64, torch.int64)
        return cls(*(torch.from_numpy(np.ascontiguousarray(a)).to(device, t) for a, t in zip(b, dtypes)))


class Counts(NamedTuple):
    """What a batch's terms are averaged over (see the module docstring)."""

    tokens: torch.Tensor  # masked-in next-token targets
    mtp_tokens: torch.Tensor  # masked-in MTP targets
    sequences: int  # rows


class LossTerms(NamedTuple):
    loss: torch.Tensor  # ce + mtp_lambda * mtp + balance
    ce: torch.Tensor
    mtp: torch.Tensor  # 0 without an MTP module or with mtp_lambda 0
    balance: torch.Tensor  # alpha included, as MLX's LossParts.balance
    loads: torch.Tensor  # (MoE layers that ran, E), no gradient: ALF's input


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, 1, T, T) bool: causal and inside the same packed document."""
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


def mtp_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    return loss_mask[:, 1:] * loss_mask[:, :-1]


def batch_counts(batch: Batch) -> Counts:
    return Counts(batch.loss_mask.sum(), mtp_mask(batch.loss_mask).sum(), batch.loss_mask.shape[0])


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """sum(mask * cross-entropy) / max(count, 1), in float32."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (per_token.view(mask.shape) * mask).sum() / count.clamp_min(1.0)


def expert_counts(r: Routing, valid: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(B, T, k) chosen experts -> (B, E) float32: the valid tokens that chose each expert."""
    B, T, k = r.indices.shape
    weights = valid[..., None].float().expand(B, T, k).reshape(B, T * k)
    return valid.new_zeros(B, n_experts, dtype=torch.float32).scatter_add_(1, r.indices.reshape(B, T * k), weights)


def balance_loss(routing: list[Routing], valid: torch.Tensor, n_experts: int, top_k: int,
                 n_sequences: int | None = None) -> torch.Tensor:
    """Summed over layers, averaged over the rows (or summed and divided by `n_sequences`); no alpha."""
    total = valid.new_zeros((), dtype=torch.float32)
    n_valid = valid.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1)
    for r in routing:
        f = n_experts / (top_k * n_valid) * expert_counts(r, valid, n_experts)  # (B, E), no gradient
        p = r.scores / r.scores.sum(dim=-1, keepdim=True)  # (B, T, E)
        P = (p * valid[..., None]).sum(dim=1) / n_valid  # (B, E)
        total = total + (f * P).sum()
    return total / (valid.shape[0] if n_sequences is None else n_sequences)


def loss_terms(model: Model, batch: Batch, *, mtp_lambda: float, balance_alpha: float,
               counts: Counts | None = None) -> LossTerms:
    """The loss of `batch` and its terms (module docstring); with `counts` of a larger batch, these rows' shares."""
    c = model.config
    if counts is None:
        counts = batch_counts(batch)
    mtp_lambda = mtp_lambda if c.num_nextn_predict_layers else 0.0
    mask = document_mask(batch.segment_ids)
    out = model.forward_full(batch.inputs, domain_ids=batch.domain_ids, mask=mask)
    ce = masked_ce(out.logits, batch.targets, batch.loss_mask, counts.tokens)
    routing = list(out.routing)
    mtp = ce.new_zeros(())
    if mtp_lambda:
        m = model.mtp_forward(out.hidden[:, :-1], batch.targets[:, :-1], 0, domain_ids=batch.domain_ids[:, :-1],
                              mask=mask[..., :-1, :-1])
        mtp = masked_ce(m.logits, batch.targets[:, 1:], mtp_mask(batch.loss_mask), counts.mtp_tokens)
        routing += m.routing
    valid = batch.loss_mask
    counted = valid * (batch.domain_ids < 0) if c.domain_routing is not None else valid
    E = c.n_routed_experts or 0
    bal = ce.new_zeros(())
    if balance_alpha and out.routing:
        bal = balance_alpha * balance_loss(out.routing, valid, E, c.num_experts_per_tok, counts.sequences)
    loads = torch.stack([expert_counts(r, counted[:, : r.indices.shape[1]], E).sum(dim=0) for r in routing]
                        ) if routing else valid.new_zeros((0, max(E, 1)))
    return LossTerms(ce + mtp_lambda * mtp + bal, ce, mtp, bal, loads.detach())


@torch.no_grad()
def alf_update(model: Model, loads: torch.Tensor, gamma: float,
               reduce: Callable[[torch.Tensor], None] | None = None) -> None:
    """ALF (module docstring) from `loads` (the MoE layers in `Model.moe_layers()` order, main stack first, as
    many as ran). `reduce` sums the loads in place first, e.g. over the ranks of a distributed run."""
    moes = model.moe_layers()
    if loads.shape[0] > len(moes):
        raise ValueError(f"loads has {loads.shape[0]} layers, the model has {len(moes)} MoE layers")
    if not loads.shape[0] or not hasattr(moes[0].gate, "e_score_correction_bias"):
        return
    loads = loads.clone()
    if reduce is not None:
        reduce(loads)
    for moe, load in zip(moes, loads):
        bias = moe.gate.e_score_correction_bias
        n = moe.gate.n_base
        bias[:n].add_(gamma * torch.sign(load[:n].mean() - load[:n]).to(bias.device, bias.dtype))


def make_optimizer(model: Model, cfg: TrainConfig) -> AdamW:
    """MLX's AdamW over the model's parameters, with `cfg`'s learning-rate schedule, decay and clipping."""
    check_config(cfg)
    return AdamW(model.parameters(), cfg)


def check_config(cfg: TrainConfig) -> None:
    """The training options the twin does not implement are refused, naming the field."""
    if cfg.mtp_distill:
        raise ValueError("training option 'mtp_distill' is not supported by the PyTorch twin; train the MTP "
                         "module with dh-mlx train (`mtp_distill=True`)")


def train_step(model: Model, optimizer: AdamW, batch: Batch, cfg: TrainConfig) -> dict[str, float]:
    """Loss, backward, AdamW step, ALF update, as one `dh-mlx train` step; returns the terms as floats."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    terms = loss_terms(model, batch, mtp_lambda=cfg.mtp_lambda, balance_alpha=cfg.balance_alpha)
    terms.loss.backward()
    norm = optimizer.step()
    if cfg.alf_gamma:
        alf_update(model, terms.loads, cfg.alf_gamma)
    return {"loss": terms.loss.item(), "ce": terms.ce.item(), "mtp": terms.mtp.item(),
            "balance": terms.balance.item(), "grad_norm": norm.item(), "lr": optimizer.param_groups[0]["lr"]}
