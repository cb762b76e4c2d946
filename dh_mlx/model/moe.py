"""DeepSeek MoE: router (scoring, group-limited top-k, selection bias, domain mask), stacked experts, shared experts.

Legend: N tokens (flattened), E routed experts, G expert groups, k experts per token, D hidden, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from ..ops import replaceable
from .layers import MLP, linear, swiglu

# Below this many (token, expert) pairs gather_mm reads weights in token order; above, we sort by expert
# so each expert's weights are read once (what mlx-lm's SwitchGLU does too).
SORT_THRESHOLD = 64



def affinities(logits: mx.array, sigmoid: bool) -> mx.array:
    """(..., E) router affinities: sigmoid (V3) or softmax (V2)."""
    return mx.sigmoid(logits) if sigmoid else mx.softmax(logits, axis=-1)


def mixing_weights(scores: mx.array, indices: mx.array, renorm: bool, scaling: float) -> mx.array:
    """(..., k): the chosen experts' unbiased scores, renormalised to sum to 1 when `renorm`, times `scaling`."""
    w = mx.take_along_axis(scores, indices, axis=-1)
    if renorm:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return w * scaling


class Routing(NamedTuple):
    """What the router decided; `scores` and `indices` are what training's ALF and balance loss need."""

    indices: mx.array  # (..., k) int32: chosen experts
    weights: mx.array  # (..., k) float32: their mixing weights (unbiased scores, normalised, scaled)
    scores: mx.array  # (..., E) float32: sigmoid/softmax affinities of every expert


@dataclass(frozen=True)
class RouterOptions:
    """The router's plain options, from the config: what `route` (and a backend's implementation) takes. (A
    dataclass, not a tuple: an MLX module would keep a tuple attribute among its parameters.)"""

    top_k: int
    n_group: int
    topk_group: int
    topk_method: str  # "noaux_tc" (V3: biased choice, groups by their two best), "group_limited_greedy", "greedy"
    sigmoid: bool  # sigmoid affinities (V3), else softmax (V2)
    renorm: bool  # the chosen weights renormalised to sum to 1
    scaling: float  # routed_scaling_factor
    n_base: int  # experts before the added domains': what id-less tokens and the groups cover

    @classmethod
    def from_config(cls, c: ModelConfig) -> "RouterOptions":
        dr = c.domain_routing
        return cls(c.num_experts_per_tok, c.n_group, c.topk_group, c.topk_method, c.scoring_func == "sigmoid",
                   # DeepSeek-V3 renormalises sigmoid weights always; softmax weights (V2) only when k > 1.
                   bool(c.norm_topk_prob and (c.scoring_func == "sigmoid" or c.num_experts_per_tok > 1)),
                   c.routed_scaling_factor, c.n_routed_experts if dr is None else dr.base_experts(c.n_routed_experts))


class MoEGate(nn.Module):
    """Router. `e_score_correction_bias` (noaux_tc only) changes which experts are chosen, never their weight."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.options = RouterOptions.from_config(c)
        self.weight = mx.zeros((c.n_routed_experts, c.hidden_size))
        if c.topk_method == "noaux_tc":
            self.e_score_correction_bias = mx.zeros((c.n_routed_experts,))
        dr = c.domain_routing
        # DomainRouting.table: which experts each domain id may choose from (private: not a parameter).
        self._domain_table = None if dr is None else mx.array(dr.table(c.n_routed_experts))

    @property
    def n_base(self) -> int:
        return self.options.n_base

    def __call__(self, x: mx.array, domain_ids: mx.array | None = None) -> Routing:
        logits = linear(x.astype(mx.float32), self.weight.astype(mx.float32))  # (..., E)
        bias = self.e_score_correction_bias if "e_score_correction_bias" in self else None
        return route(logits, self.options, bias, domain_ids, self._domain_table)


def group_mask(choice: mx.array, o: RouterOptions) -> mx.array | None:
    """(..., E) bool: experts in the `topk_group` best groups, or None when routing is not group-limited."""
    G = o.n_group
    if G == 1 or o.topk_method == "greedy":
        return None
    E = choice.shape[-1]
    if o.n_base < E:  # groups over the base experts; the added domains' are outside every group
        keep = group_mask(choice[..., : o.n_base], o) if o.n_base else None
        return mx.concatenate([keep, mx.zeros((*choice.shape[:-1], E - o.n_base), mx.bool_)], axis=-1)
    grouped = mx.unflatten(mx.stop_gradient(choice), -1, (G, -1))  # (..., G, E/G)
    if o.topk_method == "noaux_tc":  # V3: a group scores the sum of its two best experts
        group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1)
    else:  # V2 group_limited_greedy: a group scores its best expert
        group_scores = grouped.max(axis=-1)
    kth = G - o.topk_group  # the topk_group largest sit at [kth:]
    best = mx.argpartition(group_scores, kth=kth, axis=-1)[..., kth:]  # (..., topk_group)
    keep = mx.put_along_axis(mx.zeros_like(group_scores), best, mx.array(1.0, group_scores.dtype), axis=-1)
    return mx.repeat(keep > 0, grouped.shape[-1], axis=-1)  # (..., E)


def domain_rows(domain_ids: mx.array, table: mx.array, ndim: int) -> tuple[mx.array, mx.array]:
    """(domain ids (B, T|1), the experts each token's domain may use (B, T|1, E): table row d + 1) for logits
    of `ndim` dims; `domain_ids` is (B, T) or (B,) (one domain per sequence)."""
    d = domain_ids if domain_ids.ndim == ndim - 1 else domain_ids[:, None]
    return d, table[d + 1]


@replaceable("route")
def route(logits: mx.array, options: RouterOptions, bias: mx.array | None = None,
          domain_ids: mx.array | None = None, domain_table: mx.array | None = None) -> Routing:
    """The router's choice from its logits (..., E): scores, the selection `bias` (noaux_tc), group-limited
    top-k, and with `domain_table` (DomainRouting.table) a token whose domain id is set chooses among its
    domain's experts."""
    o = options
    scores = affinities(logits, o.sigmoid)
    choice = scores if bias is None else scores + bias
    allowed = group_mask(choice, o)
    if allowed is None and o.n_base < choice.shape[-1]:  # the added domains' experts need their id
        allowed = mx.arange(choice.shape[-1]) < o.n_base
    if domain_ids is not None and domain_table is not None:
        d, domain_allowed = domain_rows(domain_ids, domain_table, logits.ndim)
        allowed = domain_allowed if allowed is None else mx.where((d >= 0)[..., None], domain_allowed, allowed)
    if allowed is not None:
        choice = mx.where(allowed, choice, -mx.inf)
    indices = mx.stop_gradient(mx.argpartition(-choice, kth=o.top_k - 1, axis=-1)[..., : o.top_k])
    return Routing(indices, mixing_weights(scores, indices, o.renorm, o.scaling), scores)


class StackedLinear(nn.Module):
    """E bias-free linears stored as one `[E, out, in]` tensor (one contiguous read per expert)."""

    def __init__(self, num_experts: int, in_dims: int, out_dims: int):
        super().__init__()
        bound = in_dims**-0.5
        self.weight = mx.random.uniform(-bound, bound, (num_experts, out_dims, in_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # x (..., 1, in) gathered against weight[indices] (..., in, out) -> (..., 1, out)
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def per_expert(self) -> list[mx.array]:
        """The E `[out, in]` matrices as views (split + squeeze: indexing `weight[e]` copies the matrix)."""
        return [w.squeeze(0) for w in mx.split(self.weight, self.weight.shape[0])]

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedStackedLinear":
        """What `nn.quantize` calls: each expert's `[out, in]` matrix quantized along `in`."""
        return QuantizedStackedLinear(self.weight, group_size, bits, mode)


class QuantizedStackedLinear(nn.Module):
    """`StackedLinear` with MLX affine-quantized weights (`weight` packed uint32, `scales`, `biases`), applied
    with `mx.gather_qmm`; same call signature, so every way of applying the experts takes it unchanged."""

    def __init__(self, weight: mx.array, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, self.biases = mx.quantize(weight, group_size, bits, mode=mode)  # [E, out, in*bits/32]
        self.freeze()

    @property
    def input_dims(self) -> int:
        return self.scales.shape[-1] * self.group_size

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=indices, transpose=True,
                             group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)

    def dequantized_weight(self) -> mx.array:
        """The float `[E, out, in]` weight these packed values stand for."""
        return mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, mode=self.mode)


class Experts(nn.Module):
    """The routed experts: SwiGLU with stacked `gate_proj`/`up_proj` `[E, I, D]` and `down_proj` `[E, D, I]`,
    applied with gather_mm (`routed_experts`, `weighted_experts`: replaceable operations)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.gate_proj = StackedLinear(E, D, I)
        self.up_proj = StackedLinear(E, D, I)
        self.down_proj = StackedLinear(E, I, D)

    def glu(self, x: mx.array, idx: mx.array, sort: bool) -> mx.array:
        h = swiglu(self.gate_proj(x, idx, sort), self.up_proj(x, idx, sort))
        return self.down_proj(h, idx, sort)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (..., D), indices (..., k) -> (..., k, D): each token through each of its experts."""
        return routed_experts(self, x, indices)

    def weighted(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x (..., D), indices and weights (..., k) -> (..., D): sum over j of weights[..., j] times expert
        indices[..., j] applied to x."""
        return weighted_experts(self, x, indices, weights)


@replaceable("routed_experts")
def routed_experts(experts: Experts, x: mx.array, indices: mx.array) -> mx.array:
    """x (..., D), indices (..., k) -> (..., k, D) through gather_mm; from SORT_THRESHOLD pairs sorted by
    expert, so that each expert's weights are read once."""
    *lead, D = x.shape
    k = indices.shape[-1]
    xf, idx = x.reshape(-1, D), indices.reshape(-1, k)  # (N, D), (N, k)
    N = xf.shape[0]
    # Singleton axes come from reshape, not `[:, None]` views: gather_mm is slower on a strided operand.
    if N * k < SORT_THRESHOLD:
        return experts.glu(xf.reshape(N, 1, 1, D), idx, False).reshape(*lead, k, D)  # (N, k, 1, D)
    flat = idx.flatten()
    order = mx.argsort(flat)  # (N*k,) pairs sorted by expert
    y = experts.glu(xf.reshape(N, 1, D)[order // k], flat[order], True)  # (N*k, 1, D)
    return y[mx.argsort(order)].reshape(*lead, k, D)  # back to (token, slot) order


@replaceable("weighted_experts")
def weighted_experts(experts: Experts, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
    y = experts(x, indices)  # (..., k, D)
    return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = MoEGate(config)
        self.experts = Experts(config)
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def __call__(self, x: mx.array, domain_ids: mx.array | None = None) -> tuple[mx.array, Routing]:
        routing = self.gate(x, domain_ids)
        y = self.experts.weighted(x, routing.indices, routing.weights)  # (..., D)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y, routing
