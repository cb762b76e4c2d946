"""DeepSeek MoE: router (scoring, group-limited top-k, selection bias, domain mask), stacked experts, shared experts.

Legend: N tokens (flattened), E routed experts, G expert groups, k experts per token, D hidden, I expert width.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import native
from ..config import ModelConfig
from .layers import MLP, linear, swiglu

# Below this many (token, expert) pairs gather_mm reads weights in token order; above, we sort by expert
# so each expert's weights are read once (what mlx-lm's SwitchGLU does too).
SORT_THRESHOLD = 64
# CPU only: rows per block in the blocked path. gather_mm over single rows runs at ~7 GFLOP/s on the CPU
# backend; over blocks of 16 rows that share an expert it is a BLAS matmul per block (~60 GFLOP/s here).
BLOCK_ROWS = 16
# CPU only, float experts, without the native kernels (`dh_mlx.native`, normally used from SORT_THRESHOLD
# pairs, compiled or not): from this many rows per expert on average, one matmul per expert over its rows
# (`Experts._segments`) beats gather_mm (1b, 512 tokens: 61 vs 94 ms per layer; crossover ~16); under
# mx.compile the blocked layout does (a training step of tiny over two 2 x 256 halves: 1,500 vs 1,430 tok/s).
# Quantized or adapted experts use the blocked layout from 4 blocks per expert on average.
SEGMENT_MIN_ROWS = 16


@mx.custom_function
def segment_linear(x: mx.array, w: mx.array, offsets: mx.array) -> mx.array:
    """x (R, in) rows sorted by expert, w (E, out, in), offsets (E + 1,) int32 -> (R, out): rows offsets[e] to
    offsets[e + 1] times w[e].T, one BLAS call per expert (CPU; `native.load()` must have succeeded)."""
    return native.load().segment_rows(x, w, offsets, True)


@segment_linear.vjp
def _segment_linear_vjp(primals, dy, y):
    x, w, offsets = primals
    ext = native.load()
    return ext.segment_rows(dy, w, offsets, False), ext.segment_outer(dy, x, offsets), mx.zeros_like(offsets)


@mx.custom_function
def expert_rows(x: mx.array, idx: mx.array, weights: mx.array, gate: mx.array, up: mx.array,
                down: mx.array) -> mx.array:
    """x (..., D), idx and weights (..., k), stacked expert weights -> (..., D): each token through its k
    experts, weighted and summed, as one native node (3k sgemv per token; CPU, float32, a few tokens: the
    decode step). Differentiated through the gather_mm formulation (`_rows_reference`)."""
    return native.load().moe_rows(x, idx, weights, gate, up, down)


def _rows_reference(x, idx, weights, gate, up, down):
    D, k = x.shape[-1], idx.shape[-1]
    xs, i = x.reshape(-1, 1, 1, D), idx.reshape(-1, k)
    h = swiglu(mx.gather_mm(xs, gate.swapaxes(-1, -2), rhs_indices=i),
               mx.gather_mm(xs, up.swapaxes(-1, -2), rhs_indices=i))
    y = mx.gather_mm(h, down.swapaxes(-1, -2), rhs_indices=i)  # (N, k, 1, D)
    return (y.reshape(*idx.shape, D) * weights[..., None]).sum(axis=-2)


@expert_rows.vjp
def _expert_rows_vjp(primals, cotangent, output):
    x, idx, weights, gate, up, down = primals
    _, (dx, dw, dg, du, dd) = mx.vjp(lambda x, w, g, u, d: _rows_reference(x, idx, w, g, u, d),
                                     [x, weights, gate, up, down], [cotangent])
    return dx, mx.zeros_like(idx), dw, dg, du, dd


@mx.custom_function
def gather_pairs(x: mx.array, order: mx.array, inverse: mx.array, k: int) -> mx.array:
    """x (N, D), order (P,) a permutation of the N*k (token, slot) pairs, inverse its inverse -> x[order // k].
    The gradient gathers and sums over the k slots instead of MLX's generic (serial) scatter-add."""
    return x[order // k]


@gather_pairs.vjp
def _gather_pairs_vjp(primals, dy, y):
    x, order, inverse, k = primals
    dx = dy[inverse].reshape(x.shape[0], k, -1).sum(axis=1)
    return dx, mx.zeros_like(order), mx.zeros_like(inverse), None


@mx.custom_function
def permute_rows(y: mx.array, perm: mx.array, inverse: mx.array) -> mx.array:
    """y[perm] for a permutation `perm` with inverse `inverse`; the gradient is a gather too (not a scatter)."""
    return y[perm]


@permute_rows.vjp
def _permute_rows_vjp(primals, dy, out):
    y, perm, inverse = primals
    return dy[inverse], mx.zeros_like(perm), mx.zeros_like(inverse)


_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def _scores(logits: mx.array, sigmoid: bool) -> mx.array:
    """(..., E) router affinities: sigmoid (V3) or softmax (V2)."""
    return mx.sigmoid(logits) if sigmoid else mx.softmax(logits, axis=-1)


def _mixing_weights(scores: mx.array, indices: mx.array, renorm: bool, scaling: float) -> mx.array:
    """(..., k): the chosen experts' unbiased scores, renormalised to sum to 1 when `renorm`, times `scaling`."""
    w = mx.take_along_axis(scores, indices, axis=-1)
    if renorm:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return w * scaling


_NO_DOMAINS = mx.array(False)


@mx.custom_function
def route(logits, bias, allowed, flag, domains: bool, sigmoid: bool, method: int, groups: int, topk_groups: int,
          k: int, renorm: bool, scaling: float):
    """`MoEGate` after its linear as one native node (CPU, float32, a few tokens: decode): (indices (..., k)
    int32, weights (..., k), scores (..., E)); with `domains`, a token whose `flag` is set chooses among its
    `allowed` experts instead of by group. Differentiated through MLX ops (the choice has no gradient)."""
    return tuple(native.load().route(logits, bias, allowed, flag, domains, sigmoid, method, groups, topk_groups, k,
                                     renorm, scaling))


@route.vjp
def _route_vjp(primals, cotangents, outputs):
    logits, bias, allowed, flag, domains, sigmoid, method, groups, topk_groups, k, renorm, scaling = primals
    indices = outputs[0]

    def weights_and_scores(logits):
        scores = _scores(logits, sigmoid)
        return _mixing_weights(scores, indices, renorm, scaling), scores

    _, (d_logits,) = mx.vjp(weights_and_scores, [logits], list(cotangents[1:]))
    return (d_logits, mx.zeros_like(bias), mx.zeros_like(allowed), mx.zeros_like(flag), *([None] * 8))


class Routing(NamedTuple):
    """What the router decided; `scores` and `indices` are what training's ALF and balance loss need."""

    indices: mx.array  # (..., k) int32: chosen experts
    weights: mx.array  # (..., k) float32: their mixing weights (unbiased scores, normalised, scaled)
    scores: mx.array  # (..., E) float32: sigmoid/softmax affinities of every expert


class MoEGate(nn.Module):
    """Router. `e_score_correction_bias` (noaux_tc only) changes which experts are chosen, never their weight."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.top_k = c.num_experts_per_tok
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.topk_method, self.scoring_func = c.topk_method, c.scoring_func
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        # DeepSeek-V3 renormalises sigmoid weights always; softmax weights (V2) only when k > 1.
        self._renorm = c.norm_topk_prob and (c.scoring_func == "sigmoid" or c.num_experts_per_tok > 1)
        self.weight = mx.zeros((c.n_routed_experts, c.hidden_size))
        if c.topk_method == "noaux_tc":
            self.e_score_correction_bias = mx.zeros((c.n_routed_experts,))
        else:
            self._no_bias = mx.zeros((c.n_routed_experts,))  # what the native router adds instead (not a parameter)
        dr = c.domain_routing
        # Row 0: no domain (every expert allowed); row d+1: domain d's experts and the common ones.
        self._domain_table = None if dr is None else mx.array(
            [[True] * c.n_routed_experts] + dr.allowed(c.n_routed_experts))

    def __call__(self, x: mx.array, domain_ids: mx.array | None = None) -> Routing:
        logits = linear(x.astype(mx.float32), self.weight.astype(mx.float32))  # (..., E)
        bias = self.e_score_correction_bias if self.topk_method == "noaux_tc" else self._no_bias
        if native.usable_small(logits, bias):
            domains = domain_ids is not None and self._domain_table is not None
            allowed = flag = _NO_DOMAINS
            if domains:
                d = domain_ids if domain_ids.ndim == x.ndim - 1 else domain_ids[:, None]  # (B, T) or (B, 1)
                allowed = mx.broadcast_to(self._domain_table[d + 1], logits.shape)
                flag = mx.broadcast_to(d >= 0, logits.shape[:-1])
            indices, weights, scores = route(logits, bias, allowed, flag, domains, self.scoring_func == "sigmoid",
                                             _METHODS[self.topk_method], self.n_group, self.topk_group, self.top_k,
                                             self._renorm, self.routed_scaling_factor)
            return Routing(mx.stop_gradient(indices), weights, scores)
        scores = _scores(logits, self.scoring_func == "sigmoid")
        choice = scores
        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
        allowed = self._group_mask(choice)
        if domain_ids is not None and self._domain_table is not None:
            d = domain_ids if domain_ids.ndim == x.ndim - 1 else domain_ids[:, None]  # (B, T) or (B, 1)
            domain_allowed = self._domain_table[d + 1]  # (B, T|1, E)
            allowed = domain_allowed if allowed is None else mx.where((d >= 0)[..., None], domain_allowed, allowed)
        if allowed is not None:
            choice = mx.where(allowed, choice, -mx.inf)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-choice, kth=k - 1, axis=-1)[..., :k])
        return Routing(indices, _mixing_weights(scores, indices, self._renorm, self.routed_scaling_factor), scores)

    def _group_mask(self, choice: mx.array) -> mx.array | None:
        """(..., E) bool: experts in the `topk_group` best groups, or None when routing is not group-limited."""
        G = self.n_group
        if G == 1 or self.topk_method == "greedy":
            return None
        grouped = mx.unflatten(mx.stop_gradient(choice), -1, (G, -1))  # (..., G, E/G)
        if self.topk_method == "noaux_tc":  # V3: a group scores the sum of its two best experts
            group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1)
        else:  # V2 group_limited_greedy: a group scores its best expert
            group_scores = grouped.max(axis=-1)
        kth = G - self.topk_group  # the topk_group largest sit at [kth:]
        best = mx.argpartition(group_scores, kth=kth, axis=-1)[..., kth:]  # (..., topk_group)
        keep = mx.put_along_axis(mx.zeros_like(group_scores), best, mx.array(1.0, group_scores.dtype), axis=-1)
        return mx.repeat(keep > 0, grouped.shape[-1], axis=-1)  # (..., E)


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
    with `mx.gather_qmm`; same call signature, so both expert paths (sorted rows, CPU blocks) use it unchanged."""

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
    """The routed experts: SwiGLU with stacked `gate_proj`/`up_proj` `[E, I, D]` and `down_proj` `[E, D, I]`.

    Exact ways to apply them, chosen by device: on Metal/CUDA, gather_mm over (token, expert) rows sorted by
    expert; on the CPU with many tokens, one BLAS matmul per expert over its exact run of rows with the native
    segment kernels (`_native`, compiled or not: training steps and prefill), else per-expert matmuls outside
    mx.compile (`_segments`) or a padded blocked layout inside it (`_blocked`, also for quantized or adapted
    experts).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.gate_proj = StackedLinear(E, D, I)
        self.up_proj = StackedLinear(E, D, I)
        self.down_proj = StackedLinear(E, I, D)
        # None: by device and row count (see __call__); "gather", "native", "segments" or "blocked" force one.
        self.path: str | None = None

    def _glu(self, x: mx.array, idx: mx.array, sort: bool) -> mx.array:
        h = swiglu(self.gate_proj(x, idx, sort), self.up_proj(x, idx, sort))
        return self.down_proj(h, idx, sort)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (..., D), indices (..., k) -> (..., k, D): each token through each of its experts."""
        *lead, D = x.shape
        k = indices.shape[-1]
        xf, idx = x.reshape(-1, D), indices.reshape(-1, k)  # (N, D), (N, k)
        N = xf.shape[0]
        path = self.path
        if path not in (None, "gather", "native", "segments", "blocked"):
            raise ValueError(f"Experts.path: expected None, 'gather', 'native', 'segments' or 'blocked', got {path!r}")
        if path is None and mx.default_device() == mx.cpu:
            if N * k >= SORT_THRESHOLD and self._native_ok(x):
                path = "native"
            elif self._plain() and N * k >= SEGMENT_MIN_ROWS * self.num_experts:
                path = "segments"
            elif N * k >= 4 * self.num_experts * BLOCK_ROWS:  # quantized or adapted experts
                path = "blocked"
        if path == "native":
            if not self._native_ok(x):
                raise ValueError("Experts.path 'native' needs the CPU, float32 activations, plain float32 experts and the "
                                 f"native kernels (dh_mlx.native: {native.status})")
            return self._native(xf, idx).reshape(*lead, k, D)
        if path == "segments":
            y = self._segments(xf, idx)
            if y is not None:
                return y.reshape(*lead, k, D)
            path = "blocked"  # traced (mx.compile): static shapes only
        if path == "blocked":
            return self._blocked(xf, idx).reshape(*lead, k, D)
        # Singleton axes come from reshape, never from `[:, None]` views: gather_mm on CPU runs ~4x slower
        # on such a strided operand.
        if N * k < SORT_THRESHOLD:
            y = self._glu(xf.reshape(N, 1, 1, D), idx, False)  # (N, k, 1, D)
            return y.reshape(*lead, k, D)
        flat = idx.flatten()
        order = mx.argsort(flat)  # (N*k,) pairs sorted by expert
        y = self._glu(xf.reshape(N, 1, D)[order // k], flat[order], True)  # (N*k, 1, D)
        y = y[mx.argsort(order)]  # back to (token, slot) order
        return y.reshape(*lead, k, D)

    def weighted(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x (..., D), indices and weights (..., k) -> (..., D): sum over j of weights[..., j] times expert
        indices[..., j] applied to x. On the CPU below SORT_THRESHOLD pairs (decode), one native node."""
        pairs = x.size // x.shape[-1] * indices.shape[-1]
        if self.path is None and pairs < SORT_THRESHOLD and self._native_ok(x, weights):
            idx = indices if indices.dtype in (mx.int32, mx.uint32) else indices.astype(mx.int32)
            return expert_rows(x, idx, weights, self.gate_proj.weight, self.up_proj.weight,
                               self.down_proj.weight)
        y = self(x, indices)  # (..., k, D)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    def _plain(self) -> bool:
        """Float weights, no adapters: what `_segments` can take apart per expert."""
        return all(type(p) is StackedLinear for p in (self.gate_proj, self.up_proj, self.down_proj))

    def _native_ok(self, *arrays: mx.array) -> bool:
        """Plain float32 experts, float32 `arrays` on the CPU (what the native kernels take) and the kernels
        built."""
        return self._plain() and native.usable(*arrays, self.gate_proj.weight) is not None

    def _runs(self, idx: mx.array) -> tuple[mx.array, mx.array]:
        """idx (N, k) -> (order (P,): the N*k pairs grouped by expert, counts (E,): each expert's pairs)."""
        flat = idx.reshape(-1)
        return mx.argsort(flat), (flat[:, None] == mx.arange(self.num_experts)).sum(axis=0)

    def _native(self, x: mx.array, idx: mx.array) -> mx.array:
        """x (N, D), idx (N, k) -> (N, k, D): pairs sorted by expert, then `segment_linear` (one BLAS call per
        expert over its exact run of rows; the run boundaries stay on the device, so this compiles)."""
        N, k = idx.shape
        order, counts = self._runs(idx)
        offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts).astype(mx.int32)])  # (E + 1,)
        inverse = mx.argsort(order)
        xs = gather_pairs(x, order, inverse, k)  # (P, D)
        h = swiglu(segment_linear(xs, self.gate_proj.weight, offsets), segment_linear(xs, self.up_proj.weight, offsets))
        y = segment_linear(h, self.down_proj.weight, offsets)  # (P, D)
        return permute_rows(y, inverse, order).reshape(N, k, -1)

    def _segments(self, x: mx.array, idx: mx.array) -> mx.array | None:
        """x (N, D), idx (N, k) -> (N, k, D): pairs sorted by expert, then one SwiGLU of matmuls per expert over
        its run of rows (~2x the GEMM rate of 16-row blocks for prefill's ~50 rows per expert, and no padding).

        The run lengths are read back to the host, so this returns None under mx.compile (shapes there must
        not depend on the routing) and for quantized or adapted experts; the caller then uses `_blocked`.
        Differentiable, but MLX's gradient through per-expert weight views is ~4x slower than the blocked
        layout's: for eager (uncompiled) training set `path = "blocked"` (our trainers compile their step).
        """
        if not self._plain():
            return None
        N, k = idx.shape
        order, counts = self._runs(idx)
        try:
            counts = counts.tolist()
        except ValueError:  # tracing (mx.compile): no host reads
            return None
        runs = mx.split(x[order // k], np.cumsum(counts)[:-1].tolist())  # E x (count_e, D)
        gate, up, down = (p.per_expert() for p in (self.gate_proj, self.up_proj, self.down_proj))
        ys = [swiglu(r @ gate[e].T, r @ up[e].T) @ down[e].T for e, r in enumerate(runs) if counts[e]]
        return mx.concatenate(ys)[mx.argsort(order)].reshape(N, k, -1)

    def _blocked(self, x: mx.array, idx: mx.array, b: int = BLOCK_ROWS) -> mx.array:
        """x (N, D), idx (N, k) -> (N, k, D) through a static-shape padded layout (P = N*k pairs).

        Each expert's pairs get a run of rows rounded up to a multiple of b, so every block of b rows belongs
        to one expert; R = P + E*(b-1) rows (rounded up to b) always suffice, so shapes never depend on the
        routing and the step stays compilable. Padding rows read a zero row and are never read back.
        """
        N, k = idx.shape
        E, P = self.num_experts, N * k
        flat = idx.reshape(-1)
        onehot = (flat[:, None] == mx.arange(E)).astype(mx.int32)  # (P, E)
        rank = mx.take_along_axis(mx.cumsum(onehot, axis=0), flat[:, None], axis=1)[:, 0] - 1  # (P,)
        counts = onehot.sum(axis=0)  # (E,)
        padded = (counts + b - 1) // b * b
        ends = mx.cumsum(padded)
        dest = (ends - padded)[flat] + rank  # (P,) row of each pair in the padded layout
        R = (P + E * (b - 1) + b - 1) // b * b
        src = mx.full((R,), N, mx.int32).at[dest].add(mx.arange(P, dtype=mx.int32) // k - N)  # (R,) token of row
        xp = mx.concatenate([x, mx.zeros((1, x.shape[1]), x.dtype)])[src].reshape(R // b, b, -1)  # (nb, b, D)
        owner = mx.minimum((mx.arange(R // b)[None] * b >= ends[:, None]).sum(axis=0), E - 1)  # (nb,)
        y = self._glu(xp, owner, True)  # (nb, b, D)
        return y.reshape(R, -1)[dest].reshape(N, k, -1)


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
