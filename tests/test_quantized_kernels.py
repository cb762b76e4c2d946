"""The native weight kernels (native/quantized.cpp) against MLX's own operations, in value and input gradient, on
every instruction set this CPU runs (AVX-512, AVX2, portable): the quantized linear (mx.quantized_matmul), the
gathered experts (mx.gather_qmm), the embedding lookup, and bfloat16 / float16 weights (the float32 matmul of
the converted weight). Decode (1 row), a few rows (the direct kernels), many rows (a converted tile and the BLAS),
output counts that are not a multiple of the kernels' blocks, input widths with a partial 128-value chunk."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from dh_mlx.backend.cpu import native
from dh_mlx.backend.cpu.quantized import half_matmul, packed_matmul

GROUPS = (32, 64, 128)
# (rows, outputs, input width): decode; odd outputs and a partial chunk; a few rows; many rows (tile + BLAS)
SHAPES = [(1, 64, 256), (1, 37, 352), (3, 70, 384), (6, 33, 160), (40, 50, 224)]


@pytest.fixture(scope="module")
def ext():
    m = native.load()
    assert m is not None, native.status
    return m


@pytest.fixture(params=["avx512", "avx2", "portable"])
def isa(request, ext):
    if request.param not in ext.isas():
        pytest.skip(f"this CPU does not run {request.param} (it runs {ext.isas()})")
    before = ext.set_isa(request.param)
    yield request.param
    ext.set_isa(before)


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def packed(n: int, k: int, group: int, bits: int, dtype=mx.float32, seed: int = 0):
    w = mx.random.normal((n, k), key=mx.random.key(seed)).astype(dtype)
    return mx.quantize(w, group, bits)


def test_every_instruction_set_this_cpu_has_is_built_and_the_best_is_chosen(ext):
    flags = set(open("/proc/cpuinfo").read().split()) if native.sys.platform.startswith("linux") else set()
    want = (["avx512"] if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else []) + (
        ["avx2"] if {"avx2", "fma"} <= flags else []) + ["portable"]
    assert ext.isas() == want
    assert ext.isa() == want[0]
    with pytest.raises(ValueError, match="not supported"):
        ext.set_isa("sse9")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,n,k", SHAPES)
def test_quantized_linear_equals_quantized_matmul_in_value_and_input_gradient(isa, bits, rows, n, k):
    x = mx.random.normal((rows, k), key=mx.random.key(1))
    cot = mx.random.normal((rows, n), key=mx.random.key(2))
    for group in GROUPS:
        if k % group:
            continue
        w, s, b = packed(n, k, group, bits)
        want = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group, bits=bits)
        ours = packed_matmul(bits, group)
        assert rel(ours(x, w, s, b), want) <= 2e-6, (group, rel(ours(x, w, s, b), want))
        d_want = mx.grad(lambda x: (mx.quantized_matmul(x, w, s, b, group_size=group, bits=bits) * cot).sum())(x)
        d_ours = mx.grad(lambda x: (ours(x, w, s, b) * cot).sum())(x)
        assert rel(d_ours, d_want) <= 2e-6


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_activations_and_scales_sum_in_float32(isa, dtype):
    """A bfloat16 / float16 model: the result is the float32 product rounded once (MLX's own bfloat16
    quantized_matmul sums in bfloat16, so the exact product is the reference here)."""
    w, s, b = packed(48, 256, 32, 4, dtype)
    x = mx.random.normal((2, 256), key=mx.random.key(3)).astype(dtype)
    exact = x.astype(mx.float32) @ mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), 32, 4).T
    y = packed_matmul(4, 32)(x, w, s, b)
    assert y.dtype == dtype and rel(y, exact) <= 2 ** -8
    assert rel(mx.quantized_matmul(x, w, s, b, group_size=32, bits=4), exact) > rel(y, exact)


def test_partial_groups_and_bad_layouts_are_refused(ext):
    w, s, b = packed(8, 96, 32, 4)
    with pytest.raises(ValueError, match="disagree"):
        ext.qmatmul(mx.zeros((1, 96)), w, s, b, 4, 64, True, mx.float32)  # 96 is not a multiple of 64
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ext.qmatmul(mx.zeros((1, 96)), w, s, b, 3, 32, True, mx.float32)
    with pytest.raises(ValueError, match="x"):
        ext.qmatmul(mx.zeros((1, 95)), w, s, b, 4, 32, True, mx.float32)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 37, 100), (5, 64, 256), (40, 33, 72)])
def test_half_weights_equal_the_float32_matmul_in_value_and_gradients(isa, dtype, rows, n, k):
    w = mx.random.normal((n, k), key=mx.random.key(4)).astype(dtype)
    x = mx.random.normal((rows, k), key=mx.random.key(5))
    cot = mx.random.normal((rows, n), key=mx.random.key(6))
    wf = w.astype(mx.float32)
    assert rel(half_matmul(x, w), x @ wf.T) <= 2e-6
    dx, dw = mx.grad(lambda x, w: (half_matmul(x, w) * cot).sum(), argnums=(0, 1))(x, w)
    assert rel(dx, cot @ wf) <= 2e-6
    assert dw.dtype == dtype and rel(dw, cot.T @ x) <= 2 ** -7


def gathered_reference(x, idx, weights, projections):
    """What the decode node computes, with MLX's gather_qmm / gather_mm."""
    i = idx.reshape(-1, idx.shape[-1])

    def project(h, p):
        w, s, b, bits, group = p
        if bits:
            return mx.gather_qmm(h, w, s, b, rhs_indices=i, transpose=True, group_size=group, bits=bits)
        return mx.gather_mm(h, w.swapaxes(-1, -2), rhs_indices=i)

    xs = x.reshape(-1, 1, 1, x.shape[-1])
    g, u = project(xs, projections[0]), project(xs, projections[1])
    y = project(nn.silu(g) * u, projections[2])
    return (y.reshape(*idx.shape, -1) * weights[..., None]).sum(axis=-2)


def stacked(E, n, k, bits, group, seed, dtype=mx.float32):
    w = (mx.random.normal((E, n, k), key=mx.random.key(seed)) * 0.2).astype(dtype)
    return (*mx.quantize(w, group, bits), bits, group) if bits else (w, w, w, 0, 0)


@pytest.mark.parametrize("bits,dtype", [(4, mx.float32), (8, mx.float32), (0, mx.float32), (0, mx.bfloat16),
                                        (0, mx.float16)])
def test_decode_experts_equal_gather_qmm_in_value_and_gradients(isa, bits, dtype):
    """k experts per token as one node: the 352-wide down projection takes group 32 (as `quantize` picks).
    Half-precision weights against the float32 experts of the same values (MLX's CPU gather_mm is float32 only)."""
    from dh_mlx.backend.cpu.weight_experts import _rows
    E, D, I, k = 6, 128, 352, 3
    projs = [stacked(E, I, D, bits, 128, 1, dtype), stacked(E, I, D, bits, 64, 2, dtype),
             stacked(E, D, I, bits, 32, 3, dtype)]
    x = mx.random.normal((2, 2, D), key=mx.random.key(7))
    idx = mx.argpartition(-mx.random.normal((2, 2, E), key=mx.random.key(8)), kth=k - 1, axis=-1)[..., :k]
    wts = mx.random.uniform(shape=(2, 2, k), key=mx.random.key(9))
    arrays = [a for p in projs for a in p[:3]]
    node = _rows(tuple(p[3:] for p in projs))
    if dtype != mx.float32:
        projs = [(*(a.astype(mx.float32) for a in p[:3]), *p[3:]) for p in projs]
    want = gathered_reference(x, idx, wts, projs)
    assert rel(node(x, idx, wts, *arrays), want) <= 1e-5
    cot = mx.random.normal(want.shape, key=mx.random.key(10))
    if dtype != mx.float32:
        return  # (the gradient is MLX's gather_mm's, which runs float32 only on the CPU)
    ours = mx.grad(lambda x, w: (node(x, idx, w, *arrays) * cot).sum(), argnums=(0, 1))(x, wts)
    theirs = mx.grad(lambda x, w: (gathered_reference(x, idx, w, projs) * cot).sum(), argnums=(0, 1))(x, wts)
    for a, b in zip(ours, theirs):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("bits,dtype", [(4, mx.float32), (8, mx.float32), (0, mx.float32), (0, mx.bfloat16)])
def test_decode_experts_give_each_token_what_it_gets_alone(isa, bits, dtype):
    """16 tokens (a batch of decoding sequences) of which many chose the same experts: the node takes each
    chosen expert once over all its tokens, and every token's output is bit for bit what it gets alone (a
    sequence's tokens must not depend on the batch it is served in)."""
    from dh_mlx.backend.cpu.weight_experts import _rows
    E, D, I, k, T = 4, 128, 96, 2, 16
    projs = [stacked(E, I, D, bits, 64, 21, dtype), stacked(E, I, D, bits, 64, 22, dtype),
             stacked(E, D, I, bits, 32, 23, dtype)]
    arrays = [a for p in projs for a in p[:3]]
    node = _rows(tuple(p[3:] for p in projs))
    x = mx.random.normal((T, D), key=mx.random.key(24))
    idx = mx.argpartition(-mx.random.normal((T, E), key=mx.random.key(25)), kth=k - 1, axis=-1)[:, :k]
    wts = mx.random.uniform(shape=(T, k), key=mx.random.key(26))
    together = node(x, idx, wts, *arrays)
    for t in range(T):
        assert mx.array_equal(together[t:t + 1], node(x[t:t + 1], idx[t:t + 1], wts[t:t + 1], *arrays)).item(), t
    if dtype == mx.float32:  # (MLX's CPU gather_mm is float32 only)
        assert rel(together, gathered_reference(x, idx, wts, projs)) <= 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_expert_segments_equal_per_expert_quantized_matmul_in_value_and_input_gradient(isa, bits):
    """Prefill / training: rows sorted by expert; runs of 0, 1, a few and many rows (direct kernels and BLAS)."""
    from dh_mlx.backend.cpu.weight_experts import weight_segment
    E, n, k = 5, 45, 352
    w, s, b = mx.quantize(mx.random.normal((E, n, k), key=mx.random.key(11)), 32, bits)
    counts = [3, 0, 1, 40, 7]
    offsets = mx.array(np.concatenate([[0], np.cumsum(counts)]), mx.int32)
    x = mx.random.normal((sum(counts), k), key=mx.random.key(12))
    cot = mx.random.normal((sum(counts), n), key=mx.random.key(13))
    seg = weight_segment(bits, 32)

    def reference(x):
        parts, start = [], 0
        for e, c in enumerate(counts):
            if c:  # (MLX's quantized_matmul fails on zero rows)
                parts.append(mx.quantized_matmul(x[start:start + c], w[e], s[e], b[e], group_size=32, bits=bits))
            start += c
        return mx.concatenate(parts)

    assert rel(seg(x, w, s, b, offsets), reference(x)) <= 2e-6
    d_ours = mx.grad(lambda x: (seg(x, w, s, b, offsets) * cot).sum())(x)
    d_want = mx.grad(lambda x: (reference(x) * cot).sum())(x)
    assert rel(d_ours, d_want) <= 2e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_embedding_rows_equal_mlx_lookup(isa, bits):
    from dh_mlx.backend.cpu.quantized import _packed_rows
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(50, 96), 32, bits)
    ids = mx.array([[3, 0, 49], [7, 7, 1]])
    want = nn.QuantizedEmbedding.__call__(emb, ids)
    got = _packed_rows(bits, 32)(ids, emb.weight, emb.scales, emb.biases)
    assert got.shape == want.shape and rel(got, want) <= 1e-6


def test_threads_split_the_work_without_changing_the_result(ext):
    """Output rows (and decode experts' pairs) split over the pool: the same values on 1 and 2 threads."""
    from dh_mlx.backend.cpu.weight_experts import _rows
    w, s, b = packed(512, 1024, 64, 4)
    x = mx.random.normal((2, 1024), key=mx.random.key(14))
    projs = [stacked(8, 96, 128, 4, 128, 15), stacked(8, 96, 128, 4, 128, 16), stacked(8, 128, 96, 4, 32, 17)]
    arrays = [a for p in projs for a in p[:3]]
    idx = mx.array([[0, 3, 7], [1, 3, 5]], mx.int32)
    wts = mx.random.uniform(shape=(2, 3), key=mx.random.key(18))
    xe = mx.random.normal((2, 128), key=mx.random.key(19))
    before = ext.set_threads(1)
    try:
        one = [packed_matmul(4, 64)(x, w, s, b), _rows(tuple(p[3:] for p in projs))(xe, idx, wts, *arrays)]
        mx.eval(one)
        ext.set_threads(2)
        assert ext.threads() == 2
        two = [packed_matmul(4, 64)(x, w, s, b), _rows(tuple(p[3:] for p in projs))(xe, idx, wts, *arrays)]
        assert all(mx.array_equal(a, b).item() for a, b in zip(one, two))
    finally:
        ext.set_threads(before)


def test_two_mlx_streams_may_call_the_kernels_at_once(ext):
    """Training splits a step over two CPU streams: both may run a pooled kernel at the same moment (the second
    runs it serially); every result is the one-stream result."""
    w, s, b = packed(1024, 512, 32, 4)
    xs = [mx.random.normal((3, 512), key=mx.random.key(20 + i)) for i in range(8)]
    want = [packed_matmul(4, 32)(x, w, s, b) for x in xs]
    mx.eval(want)
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    for _ in range(5):
        got = []
        for i, x in enumerate(xs):
            with mx.stream(streams[i % 2]):
                got.append(packed_matmul(4, 32)(x, w, s, b))
        mx.eval(got)
        assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))


def test_blas_threads_keeps_the_weight_kernels_on_one_thread_inside_the_block(ext):
    """Training on two MLX streams runs inside blas_threads(1): the native products then stay on their caller's
    thread (the other stream has the other core), with the same values, and the pool is free again after."""
    from dh_mlx.backend import blas_threads
    w, s, b = packed(512, 1024, 64, 4)
    x = mx.random.normal((2, 1024), key=mx.random.key(21))
    want = packed_matmul(4, 64)(x, w, s, b)
    mx.eval(want)
    assert ext.limit_threads(0) == 0
    with blas_threads(1):
        assert ext.limit_threads(1) == 1
        got = packed_matmul(4, 64)(x, w, s, b)
        mx.eval(got)
    assert ext.limit_threads(0) == 0
    with blas_threads(None):  # leaves it alone
        assert ext.limit_threads(0) == 0
    assert mx.array_equal(got, want).item()
