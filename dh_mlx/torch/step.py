"""One training step of the twin: next-token + MTP + sequence-wise balance loss, AdamW, then the ALF bias update.

Legend: B sequences, T tokens per sequence, V vocab, E routed experts, K experts per token
(num_experts_per_tok), D MTP depths (num_nextn_predict_layers), L the MoE layers of the main stack.

The definitions (the MLX trainer uses the same, and a parity test compares them):

    loss      = CE + mtp_lambda * MTP + balance_alpha * BAL
    The model reads x[:, :T-1] (the last token is only a target), so routing, BAL and ALF see T-1 tokens.
    CE        = mean over b, t < T-1 of  -log softmax(logits[b, t])[x[b, t+1]]
    MTP       = (1/D) * sum_{d=0}^{D-1} MTP_d, where depth d (0-based; "depth d+1" in the paper) takes
                h_d[b, t] (h_0 = the main model's final hidden state, after the final norm; h_{d+1} = depth d's
                block output) and token x[b, t+d+1], and MTP_d = mean over b, t < T-d-2 of
                -log softmax(mtp_logits_d[b, t])[x[b, t+d+2]]  (depth 0: h_t and x_{t+1} predict x_{t+2})
    BAL       = sum over l in L of  mean over b of  sum_i f[l,b,i] * P[l,b,i]     (DeepSeek-V3 eq. 17-20)
                f[l,b,i] = E / (K*(T-1)) * #{t : expert i in the top-K of token (b, t)}   (a count, no gradient)
                P[l,b,i] = (1/(T-1)) * sum_t s[l,b,t,i] / sum_j s[l,b,t,j]   (s: the sigmoid/softmax affinities,
                           before the selection bias; the gradient flows through s into the router)
    optimizer = torch.optim.AdamW(all parameters, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ALF       = after the optimizer step, for each MoE layer that has `e_score_correction_bias` (noaux_tc),
                the main stack's and the MTP modules' alike:
                load[i] = #{(b, t) : expert i in the top-K of token (b, t)} in this step's forward pass,
                bias[i] += alf_gamma * sign(mean_j load[j] - load[i])   (sign(0) = 0: no change)

BAL counts only the main stack's MoE layers (the routing `Model.forward_full` returns); ALF also moves the
biases of the MTP modules' MoE layers, from the tokens they routed. The MTP modules run only when
mtp_lambda > 0. A per-token domain map (B, T) routes MTP position t (h_t with token t+d+1) by the domain of
position t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .model import Model
from .moe import Routing


@dataclass
class TrainConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    alf_gamma: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"train field '{name}' must be a positive number, got {v!r}")
        for name in ("weight_decay", "mtp_lambda", "balance_alpha", "alf_gamma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"train field '{name}' must be a number >= 0, got {v!r}")
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"train field 'betas' must be two numbers in [0, 1), got {self.betas!r}")


class LossTerms(NamedTuple):
    loss: torch.Tensor  # scalar: ce + mtp_lambda * mtp + balance_alpha * balance
    ce: torch.Tensor
    mtp: torch.Tensor  # mean over depths (0 without MTP modules)
    balance: torch.Tensor  # BAL, before balance_alpha
    routing: list[Routing]  # every MoE layer that ran (main stack, then MTP depths), for the ALF update


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def balance_loss(routing: list[Routing], n_experts: int, top_k: int) -> torch.Tensor:
    """BAL above: sum over layers of the per-sequence f.P, averaged over sequences (no alpha)."""
    per_layer = []
    for r in routing:
        B, T, _ = r.scores.shape
        ones = torch.ones(B, T * top_k, device=r.scores.device)
        counts = torch.zeros(B, n_experts, device=r.scores.device).scatter_add_(
            1, r.indices.reshape(B, T * top_k), ones)  # (B, E)
        f = counts * (n_experts / (top_k * T))
        P = (r.scores / r.scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
        per_layer.append((f * P).sum(dim=-1).mean())
    return torch.stack(per_layer).sum() if per_layer else torch.zeros(())


def loss_terms(model: Model, input_ids: torch.Tensor, domain_ids: torch.Tensor | None = None, *,
               mtp_lambda: float = 0.3, balance_alpha: float = 1e-4) -> LossTerms:
    """The loss of one batch `input_ids` (B, T) as defined in this module's docstring."""
    c = model.config
    D, T = c.num_nextn_predict_layers, input_ids.shape[1]
    need = D + 3 if mtp_lambda and D else 2  # the deepest MTP module needs one target
    if T < need:
        raise ValueError(f"input_ids must have at least {need} tokens per sequence (num_nextn_predict_layers={D}, "
                         f"mtp_lambda={mtp_lambda}), got {T}")
    L = T - 1  # the last token is only ever a target
    inputs = input_ids[:, :L]
    dom_all = domain_ids[:, :L] if domain_ids is not None and domain_ids.dim() == 2 else domain_ids
    out = model.forward_full(inputs, domain_ids=dom_all)
    ce = _ce(out.logits, input_ids[:, 1:])
    bal = balance_loss(out.routing, c.n_routed_experts, c.num_experts_per_tok).to(ce.device)
    routing = list(out.routing)
    mtp = torch.zeros((), device=ce.device)
    if mtp_lambda and D:
        h = out.hidden  # (B, L, D)
        for d in range(D):
            n = L - d - 1  # positions t whose target x[t+d+2] exists
            dom = domain_ids[:, :n] if domain_ids is not None and domain_ids.dim() == 2 else domain_ids
            m = model.mtp_forward(h[:, :n], input_ids[:, d + 1:d + 1 + n], d, domain_ids=dom)  # (B, n, V)
            mtp = mtp + _ce(m.logits, input_ids[:, d + 2:d + 2 + n])
            h = m.hidden
            routing += m.routing
        mtp = mtp / D
    loss = ce + mtp_lambda * mtp + balance_alpha * bal
    return LossTerms(loss, ce, mtp, bal, routing)


@torch.no_grad()
def alf_update(model: Model, routing: list[Routing], gamma: float = 1e-3,
               reduce: Callable[[torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """ALF above; `routing` in `Model.moe_layers()` order (main stack first). Returns each updated layer's load.
    `reduce` sums the stacked loads (L, E) in place first, e.g. over the ranks of a distributed run."""
    moes = model.moe_layers()
    if len(routing) > len(moes):
        raise ValueError(f"routing has {len(routing)} entries, the model has {len(moes)} MoE layers")
    pairs = [(moe, r) for moe, r in zip(moes, routing) if hasattr(moe.gate, "e_score_correction_bias")]
    if not pairs:
        return []
    loads = torch.stack([torch.bincount(r.indices.flatten(), minlength=moe.gate.e_score_correction_bias.numel())
                         .float() for moe, r in pairs])  # (L, E)
    if reduce is not None:
        reduce(loads)
    for (moe, _), load in zip(pairs, loads):
        bias = moe.gate.e_score_correction_bias
        n = moe.gate.n_base  # an added domain's experts are left alone (no id-less token reaches them)
        bias[:n].add_(gamma * torch.sign(load[:n].mean() - load[:n]).to(bias.device, bias.dtype))
    return list(loads)


def make_optimizer(model: Model, config: TrainConfig | None = None) -> torch.optim.AdamW:
    c = config or TrainConfig()
    return torch.optim.AdamW(model.parameters(), lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)


def train_step(model: Model, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               domain_ids: torch.Tensor | None = None, config: TrainConfig | None = None) -> dict[str, float]:
    """Loss, backward, AdamW step, ALF update; returns the loss terms as floats."""
    c = config or TrainConfig()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    terms = loss_terms(model, input_ids, domain_ids, mtp_lambda=c.mtp_lambda, balance_alpha=c.balance_alpha)
    terms.loss.backward()
    optimizer.step()
    alf_update(model, terms.routing, c.alf_gamma)
    return {"loss": terms.loss.item(), "ce": terms.ce.item(), "mtp": terms.mtp.item(),
            "balance": terms.balance.item()}
