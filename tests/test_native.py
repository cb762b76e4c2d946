"""The native decode-sized kernels (one MLX node each): values and gradients against MLX's own ops."""

import re
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import random_model
from dh_mlx.backend.cpu import native
from dh_mlx.generation import PromptCache, generate_tokens, prefill
from helpers import make_config, randomise_for_parity, tokens


@pytest.fixture(scope="module")
def ext():
    m = native.load()
    assert m is not None, native.status  # the CPU path this project relies on must build here
    return m


def grads(f, *args):
    return mx.grad(f, argnums=tuple(range(len(args))))(*args)


def close(a, b, tol):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def test_linear_equals_matmul_for_strided_inputs_with_row_major_weight_gradient(ext):
    k = mx.random.split(mx.random.key(0), 3)
    x = mx.random.normal((3, 2, 5, 40), key=k[0]).swapaxes(1, 2)  # a strided view
    w = mx.random.normal((24, 40), key=k[1])
    cot = mx.random.normal((3, 5, 2, 24), key=k[2])
    close(ext.linear(x, w), x @ w.T, 1e-5)
    ours = grads(lambda x, w: (ext.linear(x, w) * cot).sum(), x, w)
    ref = grads(lambda x, w: ((x @ w.T) * cot).sum(), x, w)
    for a, b in zip(ours, ref):
        close(a, b, 1e-4)
    assert mx.abs(ref[1]).max().item() > 1


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("offset", [0, 7, 100_000])
def test_rope_equals_mx_fast_rope_with_scale_offset_and_untouched_tail(ext, traditional, offset):
    k = mx.random.split(mx.random.key(1), 2)
    x = mx.random.normal((2, 4, 6, 48), key=k[0])  # rotate the first 32 of 48 dims
    wavelengths = mx.array(10_000 ** (np.arange(0, 32, 2) / 32), mx.float32)
    cot = mx.random.normal(x.shape, key=k[1])

    def ref(x):
        return mx.fast.rope(x * 1.3, 32, traditional=traditional, base=None, scale=1.0, offset=offset,
                            freqs=wavelengths)

    def ours(x):
        return ext.rope(x, mx.array(offset, mx.int32), wavelengths, 32, traditional, 1.3)

    close(ours(x), ref(x), 2e-5 if offset < 1000 else 1e-4)  # float32 angles at 1e5 positions
    assert mx.abs(ours(x) - x * 1.3).max().item() > 0.1  # it did rotate
    close(ours(x)[..., 32:], x[..., 32:] * 1.3, 1e-6)
    g_ours = mx.grad(lambda x: (ours(x) * cot).sum())(x)
    g_ref = mx.grad(lambda x: (ref(x) * cot).sum())(x)
    close(g_ours, g_ref, 2e-5 if offset < 1000 else 1e-4)


def test_rms_norm_equals_mx_fast_rms_norm_in_value_and_gradients(ext):
    k = mx.random.split(mx.random.key(2), 3)
    x = mx.random.normal((3, 5, 96), key=k[0]) * 3
    w = mx.random.normal((96,), key=k[1])
    cot = mx.random.normal(x.shape, key=k[2])
    close(ext.rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6), 1e-5)
    ours = grads(lambda x, w: (ext.rms_norm(x, w, 1e-6) * cot).sum(), x, w)
    ref = grads(lambda x, w: (mx.fast.rms_norm(x, w, 1e-6) * cot).sum(), x, w)
    for a, b in zip(ours, ref):
        close(a, b, 1e-4)
        assert mx.abs(b).max().item() > 0.1


def node_counts(model, cache, dot):
    """Primitive names in the graph of one cached decode step (what mx.compile traces and fuses from)."""
    from dh_mlx.generation.cache import StepCache
    for c in cache:
        c.reserve(1)
    views = [StepCache(c.latent, c.k_pe, mx.array(c.offset, mx.int32)) for c in cache]
    out = model.forward(mx.array([[5]]), views, None, mask=views[0].valid_mask(1))
    mx.export_to_dot(str(dot), out.logits, *[v.latent for v in views])
    return Counter(re.findall(r'label ="?([A-Za-z]+)', dot.read_text()))


def test_a_decode_step_is_built_from_the_one_node_kernels(ext, tmp_path, monkeypatch):
    """A decode step's graph: native linear/rope/norm/experts instead of MLX's ops, ~half the nodes (each costs
    a few microseconds of dispatch), and the same next-token logits."""
    model = randomise_for_parity(random_model(make_config(), seed=4), 4)
    ids = mx.array(tokens(12, batch=1))

    def step():
        pc = PromptCache.new(model)
        prefill(model, ids, pc.cache)
        mx.eval([c.latent for c in pc.cache])
        return node_counts(model, pc.cache, tmp_path / "g.dot")

    ours = step()
    monkeypatch.setattr(native, "usable_small", lambda *a: None)
    monkeypatch.setattr(native, "load", lambda: None)
    plain = step()
    assert min(ours[k] for k in ("Rope", "RmsNorm", "Linear", "QExperts", "MlaAbsorbed")) > 0
    assert plain["Cos"] > 0 and ours["Cos"] == 0  # mx.fast.rope's CPU fallback recomputes cos/sin per call
    assert sum(ours.values()) < 0.5 * sum(plain.values()), (sum(ours.values()), sum(plain.values()))
    monkeypatch.undo()
    prompt = ids[0].tolist()
    with_native = list(generate_tokens(model, prompt, max_tokens=6, mtp=False))
    monkeypatch.setattr(native, "usable_small", lambda *a: None)
    monkeypatch.setattr(native, "load", lambda: None)
    assert list(generate_tokens(model, prompt, max_tokens=6, mtp=False)) == with_native


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_absorbed_attention_equals_mlx_ops_in_value_and_gradients(ext, mode):
    """MLA's latent-space attention (decode) as one node, for every way keys are hidden, against MLX ops."""
    from dh_mlx.backend.cpu.attention import absorbed_reference as _absorbed_reference
    from dh_mlx.backend.cpu.attention import native_absorbed as absorbed_attention
    B, H, L, n, p, S, r, v = 2, 4, 3, 16, 8, 20, 32, 12
    k = mx.random.split(mx.random.key(5), 5)
    q = mx.random.normal((B, L, H, n + p), key=k[0]).transpose(0, 2, 1, 3)  # strided, as MLA slices it
    qn, qp = q[..., :n], q[..., n:]
    lat, kpe = mx.random.normal((B, 1, S, r), key=k[1]), mx.random.normal((B, 1, S, p), key=k[2])
    w = mx.random.normal((H * (n + v), r), key=k[3]) * 0.2
    mask = (mx.arange(S)[None] <= 10 + mx.arange(L)[:, None])[None, None] if mode == 2 else mx.array(True)
    cot = mx.random.normal((B, H, L, v), key=k[4])
    ours = absorbed_attention(qn, qp, lat, kpe, w, mask, mode, 0.3, v)
    want = _absorbed_reference(qn, qp, lat, kpe, w, mask, mode, 0.3, v)
    close(ours, want, 1e-5)
    if mode:  # hiding keys changed the result
        assert mx.abs(want - _absorbed_reference(qn, qp, lat, kpe, w, mask, 0, 0.3, v)).max().item() > 0.01
    args = (qn, qp, lat, kpe, w)
    g1 = grads(lambda *a: (absorbed_attention(*a, mask, mode, 0.3, v) * cot).sum(), *args)
    g2 = grads(lambda *a: (_absorbed_reference(*a, mask, mode, 0.3, v) * cot).sum(), *args)
    for a, b in zip(g1, g2):
        close(a, b, 1e-4)


@pytest.mark.parametrize("name", ["q_lora+groups+yarn+mtp", "no_q_lora+flat+dense0", "softmax_greedy",
                                  "softmax_group_limited", "domains"])
def test_native_router_chooses_and_weighs_like_mlx_ops(ext, name, monkeypatch):
    """Every scoring/selection rule of the presets, and domain routing with per-token ids (-1: none): same
    experts, weights, scores and gradients."""
    from dh_mlx.config import DomainRouting
    from dh_mlx.model.moe import MoEGate
    domains = name == "domains"
    c = make_config("q_lora+groups+yarn+mtp", domain_routing=DomainRouting(domains=["code", "math", "legal"],
                                                                           experts_per_domain=2)) if domains else make_config(name)
    domain_ids = mx.array([[0, -1, 2, 1, -1], [-1] * 5, [1] * 5]) if domains else None
    gate = MoEGate(c)
    gate.weight = mx.random.normal(gate.weight.shape, key=mx.random.key(6)) * 0.5
    if "e_score_correction_bias" in gate:
        gate.e_score_correction_bias = mx.random.normal((c.n_routed_experts,), key=mx.random.key(7)) * 0.1
    x = mx.random.normal((3, 5, c.hidden_size), key=mx.random.key(8))
    cot_w, cot_s = mx.random.normal((3, 5, c.num_experts_per_tok)), mx.random.normal((3, 5, c.n_routed_experts))
    real = native.usable_small

    def run(use):
        monkeypatch.setattr(native, "usable_small", real if use else lambda *a: None)

        def loss(w):
            gate.weight = w
            r = gate(x, domain_ids)
            order = mx.argsort(r.indices, axis=-1)  # the top-k come in any order
            return (mx.take_along_axis(r.weights, order, -1) * cot_w).sum() + (r.scores * cot_s).sum(), r

        w0 = gate.weight
        _, r = loss(w0)
        g = mx.grad(lambda w: loss(w)[0])(w0)
        gate.weight = w0
        order = mx.argsort(r.indices, axis=-1)
        return mx.sort(r.indices.astype(mx.int32), -1), mx.take_along_axis(r.weights, order, -1), r.scores, g

    ours, ref = run(True), run(False)
    assert mx.array_equal(ours[0], ref[0]).item()
    if domains:
        assert set(np.array(ours[0])[0, 0].tolist()) <= {0, 1, 6, 7}  # code: its experts and the common ones
    for a, b in zip(ours[1:], ref[1:]):
        close(a, b, 1e-5)
    assert mx.abs(ref[3]).max().item() > 0.1


def test_a_batch_of_decoding_rows_attends_in_one_native_node_row_by_row(ext, tmp_path):
    """16 sequences decoding together (B * H = 128 query rows, H = 8 per sequence): MLA's absorbed attention is
    still the one native node (its work is bounded per sequence), its rows shared over the pool, and each row's
    output is exactly what that sequence gets alone."""
    from dh_mlx import ops
    from dh_mlx.backend.cpu.attention import absorbed_reference
    B, H, n, p, S, r, v = 16, 8, 16, 8, 40, 32, 12
    k = mx.random.split(mx.random.key(6), 5)
    qn, qp = mx.random.normal((B, H, 1, n), key=k[0]), mx.random.normal((B, H, 1, p), key=k[1])
    lat, kpe = mx.random.normal((B, 1, S, r), key=k[2]), mx.random.normal((B, 1, S, p), key=k[3])
    w = mx.random.normal((H * (n + v), r), key=k[4]) * 0.2
    mask = mx.arange(S)[None, None, None] >= mx.arange(B)[:, None, None, None]  # (B, 1, 1, S): row b skips b
    attend = ops.registered()["absorbed_attention"]
    out = attend(qn, qp, lat, kpe, w, 0.3, mask)
    mx.export_to_dot(str(tmp_path / "g.dot"), out)
    assert Counter(re.findall(r'label ="?([A-Za-z]+)', (tmp_path / "g.dot").read_text()))["MlaAbsorbed"] == 1
    close(out, absorbed_reference(qn, qp, lat, kpe, w, mask, 2, 0.3, v), 1e-5)
    for b in (0, 7, 15):
        alone = attend(qn[b:b + 1], qp[b:b + 1], lat[b:b + 1], kpe[b:b + 1], w, 0.3, mask[b:b + 1])
        assert mx.array_equal(out[b:b + 1], alone).item()
