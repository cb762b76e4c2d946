"""DeepSeek MoE: router (scoring, group-limited top-k, selection bias, domain mask), stacked experts, shared experts.

Legend: N tokens (flattened), E routed experts, G expert groups, k experts per token, D hidden, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class Quantization:
    """MLX quantization's plain options (`mx.quantize`): what a packed projection was quantized with."""

    group_size: int
    bits: int
    mode: str = "affine"


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter over a stacked projection as arrays: y_e += scale * B_e A_e dropout(x)."""

    lora_a: mx.array  # [E, r, in]
    lora_b: mx.array  # [E, out, r]
    scale: float
    dropout: float = 0.0  # the rate of dropout on the adapter's input
    key: mx.array | None = None  # this call's dropout key; None: no dropout (eval, or rate 0)


@dataclass(frozen=True)
class Projection:
    """One stacked expert projection `[E, out, in]` as arrays and plain options: what the expert operations take.
    Float `weight`; or MLX-quantized `weight` (packed uint32), `scales`, `biases` with their `quantization`;
    either with a LoRA `adapter`."""

    weight: mx.array  # [E, out, in] float, or [E, out, in * bits / 32] packed
    scales: mx.array | None = None  # [E, out, in / group_size]
    biases: mx.array | None = None  # [E, out, in / group_size] (affine mode)
    quantization: Quantization | None = None
    adapter: Adapter | None = None

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def base(self) -> "Projection":
        """This projection without its adapter."""
        return replace(self, adapter=None)


def dropout(x: mx.array, rate: float, key: mx.array | None) -> mx.array:
    """Inverted dropout of x with mask key `key` (None: x unchanged)."""
    if key is None:
        return x
    keep = mx.random.bernoulli(1 - rate, x.shape, key=key)
    return mx.where(keep, x / (1 - rate), 0).astype(x.dtype)


def project(x: mx.array, p: Projection, indices: mx.array, sorted_indices: bool = False) -> mx.array:
    """x (..., rows, in) against expert `indices` (...) -> (..., rows, out) through gather_mm (gather_qmm for a
    quantized weight), plus the adapter's two gathered products through its rank."""
    q = p.quantization
    if q is None:
        y = mx.gather_mm(x, p.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
    else:
        y = mx.gather_qmm(x, p.weight, p.scales, p.biases, rhs_indices=indices, transpose=True,
                          group_size=q.group_size, bits=q.bits, mode=q.mode, sorted_indices=sorted_indices)
    a = p.adapter
    if a is None:
        return y
    z = mx.gather_mm(dropout(x, a.dropout, a.key), a.lora_a.swapaxes(-1, -2), rhs_indices=indices,
                     sorted_indices=sorted_indices)  # (..., rows, r)
    z = mx.gather_mm(z, a.lora_b.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
    return y + (a.scale * z).astype(x.dtype)


def glu(x: mx.array, indices: mx.array, sort: bool, gate: Projection, up: Projection,
        down: Projection) -> mx.array:
    """SwiGLU of the gathered projections: x (..., rows, D) -> (..., rows, D)."""
    h = swiglu(project(x, gate, indices, sort), project(x, up, indices, sort))
    return project(h, down, indices, sort)


class StackedLinear(nn.Module):
    """E bias-free linears stored as one `[E, out, in]` tensor (one contiguous read per expert)."""

    def __init__(self, num_experts: int, in_dims: int, out_dims: int):
        super().__init__()
        bound = in_dims**-0.5
        self.weight = mx.random.uniform(-bound, bound, (num_experts, out_dims, in_dims))

    def projection(self) -> Projection:
        return Projection(self.weight)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # x (..., 1, in) gathered against weight[indices] (..., in, out) -> (..., 1, out)
        return project(x, self.projection(), indices, sorted_indices)

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

    def projection(self) -> Projection:
        return Projection(self.weight, self.scales, self.get("biases"),
                          Quantization(self.group_size, self.bits, self.mode))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return project(x, self.projection(), indices, sorted_indices)

    def dequantized_weight(self) -> mx.array:
        """The float `[E, out, in]` weight these packed values stand for."""
        return mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, mode=self.mode)


class Experts(nn.Module):
    """The routed experts: SwiGLU with stacked `gate_proj`/`up_proj` `[E, I, D]` and `down_proj` `[E, D, I]`,
    applied with gather_mm (`routed_experts`, `weighted_experts`: replaceable operations over their arrays)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.gate_proj = StackedLinear(E, D, I)
        self.up_proj = StackedLinear(E, D, I)
        self.down_proj = StackedLinear(E, I, D)

    def projections(self) -> tuple[Projection, Projection, Projection]:
        """(gate, up, down) as arrays and options: once per call (an adapter's dropout key advances)."""
        return self.gate_proj.projection(), self.up_proj.projection(), self.down_proj.projection()

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (..., D), indices (..., k) -> (..., k, D): each token through each of its experts."""
        return routed_experts(x, indices, *self.projections())

    def weighted(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x (..., D), indices and weights (..., k) -> (..., D): sum over j of weights[..., j] times expert
        indices[..., j] applied to x."""
        return weighted_experts(x, indices, weights, *self.projections())


@replaceable("routed_experts")
def routed_experts(x: mx.array, indices: mx.array, gate: Projection, up: Projection, down: Projection) -> mx.array:
    """x (..., D), indices (..., k) -> (..., k, D) through gather_mm; from SORT_THRESHOLD pairs sorted by
    expert, so that each expert's weights are read once."""
    *lead, D = x.shape
    k = indices.shape[-1]
    xf, idx = x.reshape(-1, D), indices.reshape(-1, k)  # (N, D), (N, k)
    N = xf.shape[0]
    # Singleton axes come from reshape, not `[:, None]` views: gather_mm is slower on a strided operand.
    if N * k < SORT_THRESHOLD:
        return glu(xf.reshape(N, 1, 1, D), idx, False, gate, up, down).reshape(*lead, k, D)  # (N, k, 1, D)
    flat = idx.flatten()
    order = mx.argsort(flat)  # (N*k,) pairs sorted by expert
    y = glu(xf.reshape(N, 1, D)[order // k], flat[order], True, gate, up, down)  # (N*k, 1, D)
    return y[mx.argsort(order)].reshape(*lead, k, D)  # back to (token, slot) order


@replaceable("weighted_experts")
def weighted_experts(x: mx.array, indices: mx.array, weights: mx.array, gate: Projection, up: Projection,
                     down: Projection) -> mx.array:
    """x (..., D), indices and weights (..., k) -> (..., D): the routed experts' outputs, weighted and summed."""
    y = routed_experts(x, indices, gate, up, down)  # (..., k, D)
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
