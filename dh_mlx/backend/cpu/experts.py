"""CPU implementations of the routed experts and the router (dh_mlx.model.moe).

gather_mm over single rows is slow on the CPU backend, so the experts run one of these, all exact:
- "native": pairs sorted by expert, one BLAS call per expert over its exact run of rows (`segment_linear`;
  the run boundaries are read when the kernel runs, so it compiles): training steps and prefill; experts with
  4/8-bit packed or bfloat16/float16 weights (and LoRA adapters over them) take the same layout through the
  weight kernels (`segment_project`, `native/quantized.cpp`);
- "segments": per-expert MLX matmuls over each run, the run lengths read back to the host (not under
  mx.compile), when the native kernels are missing;
- "blocked": a static-shape layout padded to blocks of BLOCK_ROWS rows of one expert (compiles; quantized
  or adapted experts too);
- "gather": the model's reference;
and a decode-sized call is one native node (`packed_expert_rows`, for float32, packed or half-precision
weights), as is the decode router (`native_route`).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from ...model import moe
from ...model.moe import SORT_THRESHOLD, Projection, Routing, affinities, mixing_weights
from . import native
from .layers import swiglu
from .quantized import kernels
from .weight_experts import kind, packed_expert_rows, segment_linear, segment_project  # noqa: F401 (segment_linear)

# Rows per block in the blocked layout: a block of rows sharing an expert is one BLAS matmul.
BLOCK_ROWS = 16
# Without the native kernels: from this many rows per expert on average, per-expert matmuls beat gather_mm
# (outside mx.compile); quantized or adapted experts take the blocked layout from 4 blocks per expert.
SEGMENT_MIN_ROWS = 16
PATHS = ("gather", "native", "segments", "blocked")
_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


Projections = tuple[Projection, Projection, Projection]  # the experts' (gate, up, down)


def plain(projections: Projections) -> bool:
    """Float weights, no adapters: what the native and per-expert paths take apart per expert."""
    return all(p.quantization is None and p.adapter is None for p in projections)


def native_ok(projections: Projections, *arrays: mx.array) -> bool:
    """The CPU, the native kernels built, and either plain float32 experts with float32 `arrays`, or float
    `arrays` and projections every one of which the weight kernels read (`kind`)."""
    kinds = {kind(p) for p in projections}
    if kinds == {"float32"}:
        return native.usable(*arrays, projections[0].weight) is not None
    return None not in kinds and kernels(*arrays) is not None


def choose_path(projections: Projections, x: mx.array, pairs: int) -> str:
    E = projections[0].num_experts
    if mx.default_device() != mx.cpu:
        return "gather"
    if pairs >= SORT_THRESHOLD and native_ok(projections, x):
        return "native"
    if plain(projections) and pairs >= SEGMENT_MIN_ROWS * E:
        return "segments"
    if pairs >= 4 * E * BLOCK_ROWS:
        return "blocked"
    return "gather"


def apply(projections: Projections, x: mx.array, indices: mx.array, path: str) -> mx.array:
    """x (..., D), indices (..., k) -> (..., k, D) through the experts' (gate, up, down) `projections` on `path`
    (one of PATHS)."""
    if path not in PATHS:
        raise ValueError(f"experts path: expected one of {', '.join(PATHS)}, got {path!r}")
    *lead, D = x.shape
    k = indices.shape[-1]
    xf, idx = x.reshape(-1, D), indices.reshape(-1, k)  # (N, D), (N, k)
    if path == "native":
        if not native_ok(projections, x):
            raise ValueError("experts path 'native' needs the CPU, float32 activations, plain float32 experts and "
                             f"the native kernels (dh_mlx.backend.cpu.native: {native.status})")
        return run_native(projections, xf, idx).reshape(*lead, k, D)
    if path == "segments":
        y = run_segments(projections, xf, idx)
        if y is not None:
            return y.reshape(*lead, k, D)
        path = "blocked"  # traced (mx.compile): static shapes only
    if path == "blocked":
        return run_blocked(projections, xf, idx).reshape(*lead, k, D)
    return moe.routed_experts.reference(x, indices, *projections)


def routed_experts(x: mx.array, indices: mx.array, gate: Projection, up: Projection, down: Projection) -> mx.array:
    projections = (gate, up, down)
    return apply(projections, x, indices, choose_path(projections, x, x.size // x.shape[-1] * indices.shape[-1]))


def weighted_experts(x: mx.array, indices: mx.array, weights: mx.array, gate: Projection, up: Projection,
                     down: Projection) -> mx.array:
    projections = (gate, up, down)
    pairs = x.size // x.shape[-1] * indices.shape[-1]
    if pairs < SORT_THRESHOLD and native_ok(projections, x, weights):  # decode: one native node
        idx = indices if indices.dtype in (mx.int32, mx.uint32) else indices.astype(mx.int32)
        if "lora" not in {kind(p) for p in projections}:
            return packed_expert_rows(x, idx, weights, projections)
    return moe.weighted_experts.reference(x, indices, weights, gate, up, down)


def forced(path: str) -> dict[str, Callable | None]:
    """`ops.using(**forced(path))`: the experts always through `path` (what tests compare paths with)."""
    if path not in PATHS:
        raise ValueError(f"experts path: expected one of {', '.join(PATHS)}, got {path!r}")
    return {"routed_experts": lambda x, i, gate, up, down: apply((gate, up, down), x, i, path),
            "weighted_experts": None}


def _runs(num_experts: int, idx: mx.array) -> tuple[mx.array, mx.array]:
    """idx (N, k) -> (order (P,): the N*k pairs grouped by expert, counts (E,): each expert's pairs)."""
    flat = idx.reshape(-1)
    return mx.argsort(flat), (flat[:, None] == mx.arange(num_experts)).sum(axis=0)


def run_native(projections: Projections, x: mx.array, idx: mx.array) -> mx.array:
    """x (N, D), idx (N, k) -> (N, k, D): pairs sorted by expert, then `segment_linear`."""
    N, k = idx.shape
    gate, up, down = projections
    order, counts = _runs(gate.num_experts, idx)
    offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts).astype(mx.int32)])  # (E + 1,)
    inverse = mx.argsort(order)
    xs = gather_pairs(x, order, inverse, k)  # (P, D)
    h = swiglu(segment_project(gate, xs, offsets), segment_project(up, xs, offsets))
    y = segment_project(down, h, offsets)  # (P, D)
    return permute_rows(y, inverse, order).reshape(N, k, -1)


def run_segments(projections: Projections, x: mx.array, idx: mx.array) -> mx.array | None:
    """x (N, D), idx (N, k) -> (N, k, D): pairs sorted by expert, then one SwiGLU of matmuls per expert over its
    run of rows; None under mx.compile (the run lengths are read back) or for quantized or adapted experts.
    Differentiable, but the gradient through per-expert weight views is slow: eager training wants "blocked"."""
    if not plain(projections):
        return None
    N, k = idx.shape
    order, counts = _runs(projections[0].num_experts, idx)
    try:
        counts = counts.tolist()
    except ValueError:  # tracing (mx.compile): no host reads
        return None
    runs = mx.split(x[order // k], np.cumsum(counts)[:-1].tolist())  # E x (count_e, D)
    gate, up, down = (per_expert(p.weight) for p in projections)
    ys = [swiglu(r @ gate[e].T, r @ up[e].T) @ down[e].T for e, r in enumerate(runs) if counts[e]]
    return mx.concatenate(ys)[mx.argsort(order)].reshape(N, k, -1)


def per_expert(w: mx.array) -> list[mx.array]:
    """w [E, out, in] -> the E `[out, in]` matrices as views (split + squeeze: indexing `w[e]` copies)."""
    return [m.squeeze(0) for m in mx.split(w, w.shape[0])]


def run_blocked(projections: Projections, x: mx.array, idx: mx.array, b: int = BLOCK_ROWS) -> mx.array:
    """x (N, D), idx (N, k) -> (N, k, D) through a static-shape padded layout (P = N*k pairs).

    Each expert's pairs get a run of rows rounded up to a multiple of b, so every block of b rows belongs
    to one expert; R = P + E*(b-1) rows (rounded up to b) always suffice, so shapes never depend on the
    routing and the step stays compilable. Padding rows read a zero row and are never read back.
    """
    N, k = idx.shape
    E, P = projections[0].num_experts, N * k
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
    y = moe.glu(xp, owner, True, *projections)  # (nb, b, D)
    return y.reshape(R, -1)[dest].reshape(N, k, -1)


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


def route(logits: mx.array, options: moe.RouterOptions, bias: mx.array | None = None,
          domain_ids: mx.array | None = None, domain_table: mx.array | None = None) -> Routing:
    o = options
    bias = mx.zeros(logits.shape[-1:]) if bias is None else bias
    if not native.usable_small(logits, bias) or o.n_base < logits.shape[-1]:  # (added domains: the reference)
        return moe.route.reference(logits, options, bias, domain_ids, domain_table)
    domains = domain_ids is not None and domain_table is not None
    allowed = flag = mx.array(False)
    if domains:
        d, rows = moe.domain_rows(domain_ids, domain_table, logits.ndim)
        allowed = mx.broadcast_to(rows, logits.shape)
        flag = mx.broadcast_to(d >= 0, logits.shape[:-1])
    indices, weights, scores = native_route(logits, bias, allowed, flag, domains, o.sigmoid, _METHODS[o.topk_method],
                                            o.n_group, o.topk_group, o.top_k, o.renorm, o.scaling)
    return Routing(mx.stop_gradient(indices), weights, scores)


@mx.custom_function
def native_route(logits, bias, allowed, flag, domains: bool, sigmoid: bool, method: int, groups: int,
                 topk_groups: int, k: int, renorm: bool, scaling: float):
    """The router after its linear as one native node: (indices (..., k) int32, weights (..., k), scores
    (..., E)); with `domains`, a token whose `flag` is set chooses among its `allowed` experts instead of by
    group. Differentiated through MLX ops (the choice has no gradient)."""
    return tuple(native.load().route(logits, bias, allowed, flag, domains, sigmoid, method, groups, topk_groups, k,
                                     renorm, scaling))


@native_route.vjp
def _native_route_vjp(primals, cotangents, outputs):
    logits, bias, allowed, flag, domains, sigmoid, method, groups, topk_groups, k, renorm, scaling = primals
    indices = outputs[0]

    def weights_and_scores(logits):
        scores = affinities(logits, sigmoid)
        return mixing_weights(scores, indices, renorm, scaling), scores

    _, (d_logits,) = mx.vjp(weights_and_scores, [logits], list(cotangents[1:]))
    return (d_logits, mx.zeros_like(bias), mx.zeros_like(allowed), mx.zeros_like(flag), *([None] * 8))


IMPLEMENTATIONS = {"routed_experts": routed_experts, "weighted_experts": weighted_experts, "route": route}
