"""DeepSeek MoE: router (scoring, group-limited top-k, selection bias, domain mask), stacked experts, shared experts.

Legend: N tokens (flattened), E routed experts, G expert groups, k experts per token, D hidden, I expert width,
P = N*k (token, expert) pairs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP

# Below this many (token, expert) pairs we gather each pair's expert weights (no host sync, static shapes:
# decode); above, pairs are sorted by expert so each expert's weights are read once.
SORT_THRESHOLD = 64
IMPLS = ("auto", "gather", "loop", "grouped")


class Routing(NamedTuple):
    """What the router decided; `scores` and `indices` are what training's ALF and balance loss need."""

    indices: torch.Tensor  # (..., k) int64: chosen experts
    weights: torch.Tensor  # (..., k) float32: their mixing weights (unbiased scores, normalised, scaled)
    scores: torch.Tensor  # (..., E) float32: sigmoid/softmax affinities of every expert


class MoEGate(nn.Module):
    """Router. `e_score_correction_bias` (noaux_tc only) changes which experts are chosen, never their weight."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        self.top_k = c.num_experts_per_tok
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.topk_method, self.scoring_func = c.topk_method, c.scoring_func
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(c.n_routed_experts, c.hidden_size))
        if c.topk_method == "noaux_tc":
            # A buffer: moved by the ALF rule (train.py), never by the optimizer.
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))
        self.init_buffers()

    def init_buffers(self) -> None:
        """Row 0: no domain (every expert but added domains'); row d+1: domain d's experts and the common ones."""
        dr, E = self.config.domain_routing, self.config.n_routed_experts
        self.n_base = E if dr is None else dr.base_experts(E)  # what groups and id-less tokens cover
        table = None if dr is None else torch.tensor(dr.table(E), device=self.weight.device)
        self.register_buffer("domain_table", table, persistent=False)

    def forward(self, x: torch.Tensor, domain_ids: torch.Tensor | None = None) -> Routing:
        logits = x.float() @ self.weight.float().T  # (..., E)
        scores = torch.sigmoid(logits) if self.scoring_func == "sigmoid" else torch.softmax(logits, dim=-1)
        choice = scores.detach()
        if self.topk_method == "noaux_tc":
            choice = choice + self.e_score_correction_bias.float()
        allowed = self._group_mask(choice)
        if allowed is None and self.n_base < choice.shape[-1]:  # the added domains' experts need their id
            allowed = torch.arange(choice.shape[-1], device=choice.device) < self.n_base
        if domain_ids is not None and self.domain_table is not None:
            d = domain_ids if domain_ids.dim() == x.dim() - 1 else domain_ids[:, None]  # (B, T) or (B, 1)
            domain_allowed = self.domain_table[d + 1]  # (B, T|1, E)
            allowed = domain_allowed if allowed is None else torch.where((d >= 0)[..., None], domain_allowed,
                                                                         allowed)
        if allowed is not None:
            choice = choice.masked_fill(~allowed, float("-inf"))
        k = self.top_k
        indices = torch.topk(choice, k, dim=-1).indices  # (..., k)
        weights = scores.gather(-1, indices)
        # DeepSeek-V3 renormalises sigmoid weights always; softmax weights (V2) only when k > 1.
        if self.norm_topk_prob and (self.scoring_func == "sigmoid" or k > 1):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(indices, weights * self.routed_scaling_factor, scores)

    def _group_mask(self, choice: torch.Tensor) -> torch.Tensor | None:
        """(..., E) bool: experts in the `topk_group` best groups, or None when routing is not group-limited."""
        G = self.n_group
        if G == 1 or self.topk_method == "greedy":
            return None
        E = choice.shape[-1]
        if self.n_base < E:  # groups over the base experts; the added domains' are outside every group
            keep = self._group_mask(choice[..., : self.n_base])
            return torch.cat([keep, keep.new_zeros((*choice.shape[:-1], E - self.n_base))], dim=-1)
        grouped = choice.unflatten(-1, (G, -1))  # (..., G, E/G)
        if self.topk_method == "noaux_tc":  # V3: a group scores the sum of its two best experts
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:  # V2 group_limited_greedy: a group scores its best expert
            group_scores = grouped.amax(dim=-1)
        best = group_scores.topk(self.topk_group, dim=-1).indices  # (..., topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, best, True)  # (..., G)
        return keep.repeat_interleave(grouped.shape[-1], dim=-1)  # (..., E)


class StackedLinear(nn.Module):
    """E bias-free linears stored as one `[E, out, in]` tensor (one contiguous read per expert)."""

    def __init__(self, num_experts: int, in_dims: int, out_dims: int):
        super().__init__()
        bound = in_dims**-0.5
        self.weight = nn.Parameter(torch.empty(num_experts, out_dims, in_dims).uniform_(-bound, bound))


@functools.lru_cache(maxsize=None)
def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether this torch has a grouped GEMM that runs on `device` in `dtype` (torch >= 2.8, CUDA bf16 at least)."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        a = torch.ones(16, 16, device=device, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype)
        fn(a, b.transpose(-1, -2), offs=torch.tensor([8, 16], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w.transpose(-1, -2), offs=offs)  # (P, in) x (E, in, out) -> (P, out)


class Experts(nn.Module):
    """The routed experts: SwiGLU with stacked `gate_proj`/`up_proj` `[E, I, D]` and `down_proj` `[E, D, I]`.

    `impl` picks the kernel: "gather" (each pair's weights gathered; static shapes, for decode and export),
    "loop" (pairs sorted by expert, one matmul per expert that has tokens; any device, trains), "grouped"
    (pairs sorted, one grouped GEMM; static shapes, fast on CUDA bf16), "auto" (gather below
    SORT_THRESHOLD pairs, else loop).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.gate_proj = StackedLinear(E, D, I)
        self.up_proj = StackedLinear(E, D, I)
        self.down_proj = StackedLinear(E, I, D)
        self.impl = "auto"

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x (..., D), indices (..., k) -> (..., k, D): each token through each of its experts."""
        *lead, D = x.shape
        k = indices.shape[-1]
        xf, idx = x.reshape(-1, D), indices.reshape(-1, k)  # (N, D), (N, k)
        impl = self.impl
        if impl == "auto":
            impl = "gather" if idx.numel() < SORT_THRESHOLD else "loop"
        if impl == "gather":
            y = self._gathered(xf, idx)
        else:
            flat = idx.flatten()  # (P,)
            order = torch.argsort(flat, stable=True)  # pairs sorted by expert
            xs = xf[order // k]  # (P, D)
            # not bincount: its output length depends on the data, which export cannot trace
            counts = flat.new_zeros(self.num_experts).scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
            ys = self._grouped(xs, counts) if impl == "grouped" else self._looped(xs, counts)  # (P, D)
            y = torch.empty_like(ys).index_copy(0, order, ys).view(-1, k, D)  # back to (token, slot) order
        return y.view(*lead, k, D)

    def _gathered(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g, u, d = (p.weight[idx] for p in (self.gate_proj, self.up_proj, self.down_proj))  # (N, k, out, in)
        h = F.silu(torch.einsum("nd,nkid->nki", x, g)) * torch.einsum("nd,nkid->nki", x, u)  # (N, k, I)
        return torch.einsum("nki,nkdi->nkd", h, d)  # (N, k, D)

    def _looped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts.tolist()):  # one host sync per layer, not per expert
            if c:
                seg = xs[start:start + c]  # (c, D)
                h = F.silu(seg @ self.gate_proj.weight[e].T) * (seg @ self.up_proj.weight[e].T)  # (c, I)
                out[start:start + c] = h @ self.down_proj.weight[e].T
                start += c
        return out

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        h = F.silu(_grouped_mm(xs, self.gate_proj.weight, offs)) * _grouped_mm(xs, self.up_proj.weight, offs)
        return _grouped_mm(h, self.down_proj.weight, offs)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = MoEGate(config)
        self.experts = Experts(config)
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor, domain_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        routing = self.gate(x, domain_ids)
        y = self.experts(x, routing.indices)  # (..., k, D)
        y = (y * routing.weights[..., None].to(y.dtype)).sum(dim=-2)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y, routing
