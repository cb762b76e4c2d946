"""Internal consistency of the MLX model: MLA paths, cached decode, checkpoint round trips, routing rules."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dh_mlx import backend, load_model, ops, random_model, save_model
from dh_mlx.backend.cpu import attention
from dh_mlx.backend.cpu import experts as cpu_experts
from dh_mlx.generation.cache import make_cache
from dh_mlx.model.moe import MoEGate
from helpers import CONFIGS, cpu_attention, expert_path, make_checkpoint, make_config, randomise_for_parity, tokens


def model_for(name, **kw):
    return randomise_for_parity(random_model(make_config(name, **kw), seed=3, dtype="float32"), 3)


def set_absorb(model, value):
    for layer in model.layers:
        layer.self_attn.absorb = value


@pytest.mark.parametrize("name", list(CONFIGS))
def test_naive_and_absorbed_mla_agree(name):
    m = model_for(name)
    ids = mx.array(tokens(16))
    set_absorb(m, False)
    naive = m(ids)
    set_absorb(m, True)
    absorbed = m(ids)
    assert mx.abs(naive - absorbed).max().item() <= 1e-4
    assert mx.abs(naive).max().item() > 0.1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_cached_decode_equals_full_forward(name):
    m = model_for(name)
    ids = mx.array(tokens(20))
    full = m(ids)
    cache = make_cache(m.config)
    steps = [m(ids[:, :7], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-4)
    assert cache[0].offset == 20


def test_cache_holds_only_latent_and_rope_key():
    m = model_for("q_lora+groups+yarn+mtp")
    cache = make_cache(m.config)
    m(mx.array(tokens(9, batch=1)), cache=cache)
    c = m.config
    per_token = sum(x.nbytes for x in cache) / 9
    assert per_token == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


@pytest.mark.parametrize("shard_bytes", [5 * 10**9, 40_000])
def test_save_load_round_trip_is_bit_exact(tmp_path, shard_bytes):
    m = model_for("q_lora+groups+yarn+mtp")
    save_model(m, tmp_path, max_shard_bytes=shard_bytes)
    if shard_bytes < 10**6:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    back = load_model(tmp_path)
    a, b = dict(tree_flatten(m.parameters())), dict(tree_flatten(back.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k


def test_random_init_is_deterministic_by_seed():
    c = make_config()
    a, b, other = (random_model(c, seed=s) for s in (5, 5, 6))
    ids = mx.array(tokens())
    assert mx.array_equal(a(ids), b(ids)).item()
    assert not mx.array_equal(a(ids), other(ids)).item()


def test_mtp_input_is_embedding_first():
    """eh_proj acts on concat(enorm(embed), hnorm(hidden)): zeroing its second half removes the hidden input."""
    m = model_for("q_lora+groups+yarn+mtp")
    layer = m.model.mtp_layers[0]
    D = m.config.hidden_size
    w = layer.eh_proj.weight
    layer.eh_proj.weight = mx.concatenate([w[:, :D], mx.zeros_like(w[:, D:])], axis=1)
    nxt = mx.array(tokens(6))
    h1 = mx.random.normal((2, 6, D), key=mx.random.key(1))
    h2 = mx.random.normal((2, 6, D), key=mx.random.key(2))
    a = m.mtp_forward(h1, nxt).logits
    b = m.mtp_forward(h2, nxt).logits
    assert mx.abs(a - b).max().item() == 0.0
    layer.eh_proj.weight = mx.concatenate([mx.zeros_like(w[:, :D]), w[:, D:]], axis=1)
    a = m.mtp_forward(h1, nxt).logits
    b = m.mtp_forward(h2, nxt).logits
    assert mx.abs(a - b).max().item() > 1e-3


def test_selection_bias_picks_experts_but_does_not_weight_them():
    c = make_config("no_q_lora+flat+dense0", num_experts_per_tok=2, routed_scaling_factor=1.0)
    gate = MoEGate(c)
    gate.weight = mx.random.normal(gate.weight.shape, key=mx.random.key(0))
    x = mx.random.normal((5, c.hidden_size), key=mx.random.key(1))
    before = gate(x)
    gate.e_score_correction_bias = mx.array([10.0, 10.0] + [0.0] * 6)  # force experts 0 and 1
    after = gate(x)
    assert sorted(np.array(after.indices).tolist()[0]) == [0, 1]
    scores = np.array(after.scores)
    expect = scores[:, :2] / scores[:, :2].sum(-1, keepdims=True)
    np.testing.assert_allclose(np.sort(np.array(after.weights), -1), np.sort(expect, -1), rtol=1e-6)
    np.testing.assert_allclose(np.array(after.scores), np.array(before.scores))  # scores ignore the bias


def test_group_limited_routing_stays_in_topk_groups():
    c = make_config()  # 8 experts, 4 groups of 2, topk_group 2
    gate = MoEGate(c)
    gate.weight = mx.random.normal(gate.weight.shape, key=mx.random.key(0))
    r = gate(mx.random.normal((200, c.hidden_size), key=mx.random.key(2)))
    groups = np.array(r.indices) // 2
    assert all(len(set(g)) <= 2 for g in groups.tolist())


def test_domain_routing_restricts_and_is_inert_without_ids():
    from dh_mlx.config import DomainRouting
    plain = model_for("q_lora+groups+yarn+mtp")
    dr = DomainRouting(domains=["code", "math", "legal"], experts_per_domain=2)  # experts 6, 7 are common
    routed = model_for("q_lora+groups+yarn+mtp", domain_routing=dr)
    ids = mx.array(tokens(10))
    # Without domain ids (or with -1) the model is exactly DeepSeek-V3.
    assert mx.array_equal(plain(ids), routed(ids)).item()
    assert mx.array_equal(routed(ids), routed(ids, domain_ids=mx.array([-1, -1]))).item()
    out = routed.forward(ids, domain_ids=mx.array([1, 2]))  # batch row 0: math, row 1: legal
    for r in out.routing:
        chosen = np.array(r.indices)
        assert set(chosen[0].flatten()) <= {2, 3, 6, 7}
        assert set(chosen[1].flatten()) <= {4, 5, 6, 7}
    # Per-token ids: a -1 token keeps plain routing while its neighbour is restricted.
    tok_ids = mx.array([[0] * 5 + [-1] * 5, [-1] * 10])
    mixed = routed.forward(ids, domain_ids=tok_ids)
    plain_out = routed.forward(ids)
    assert set(np.array(mixed.routing[0].indices)[0, :5].flatten()) <= {0, 1, 6, 7}
    assert mx.array_equal(mixed.logits[1], plain_out.logits[1]).item()


def test_domain_routing_round_trips_through_config_json(tmp_path):
    from dh_mlx.config import DomainRouting, load_config
    dr = DomainRouting(domains=["code", "math"], experts_per_domain=3)
    make_checkpoint(tmp_path, domain_routing=dr)
    assert load_config(tmp_path).domain_routing == dr


@pytest.mark.parametrize("path", ["blocked", "segments", "native"])
def test_cpu_expert_paths_equal_gathered_rows_in_value_and_gradient(path, monkeypatch):
    from dh_mlx.model.moe import Experts
    c = make_config(n_routed_experts=8, num_experts_per_tok=3)
    ex = Experts(c)
    x = mx.random.normal((150, c.hidden_size), key=mx.random.key(0))
    idx = mx.argpartition(-mx.random.normal((150, 8), key=mx.random.key(1)), kth=2, axis=-1)[:, :3]
    idx = mx.where(idx == 5, 4, idx)  # expert 5 gets no rows: an empty run
    if path == "segments":  # eager, so it must not fall back to the blocked layout
        monkeypatch.setattr(cpu_experts, "run_blocked", lambda *a: pytest.fail("fell back to blocked"))

    def run(p):
        with expert_path(p):
            return ex(x, idx), mx.grad(lambda x: (ex(x, idx) ** 2).sum())(x)

    (y0, g0), (y1, g1) = run("gather"), run(path)
    assert mx.abs(y0 - y1).max().item() <= 1e-4 and mx.abs(g0 - g1).max().item() <= 1e-4
    assert mx.abs(y0).max().item() > 1e-2


def test_native_expert_path_matches_gather_in_weight_gradients_compiled():
    """The C++ segment matmuls (one BLAS call per expert's run of rows): values and every gradient, compiled."""
    from dh_mlx.backend.cpu import native
    from dh_mlx.model.moe import Experts
    assert native.load() is not None, native.status  # the CPU path this project relies on must build here
    c = make_config(n_routed_experts=8, num_experts_per_tok=3)
    ex = Experts(c)
    x = mx.random.normal((70, c.hidden_size), key=mx.random.key(2))
    idx = mx.argpartition(-mx.random.normal((70, 8), key=mx.random.key(3)), kth=2, axis=-1)[:, :3]
    idx = mx.where(idx == 0, 7, idx)  # expert 0 (the first run) gets no rows
    cot = mx.random.normal((70, 3, c.hidden_size), key=mx.random.key(4))
    params = ex.trainable_parameters()

    def run(p):
        def loss(params, x):
            ex.update(params)
            return (ex(x, idx) * cot).sum()
        with expert_path(p):
            out = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)))(params, x)
        ex.update(params)  # the traced call left placeholders in the module
        return out

    (v0, (gp0, gx0)), (v1, (gp1, gx1)) = run("gather"), run("native")
    assert abs(v0.item() - v1.item()) <= 1e-3 * abs(v0.item())
    assert mx.abs(gx0 - gx1).max().item() <= 1e-4
    for name in ("gate_proj", "up_proj", "down_proj"):
        g0, g1 = gp0[name]["weight"], gp1[name]["weight"]
        assert mx.abs(g0 - g1).max().item() <= 1e-4 * max(1.0, mx.abs(g0).max().item()), name
        assert mx.abs(g1[0]).max().item() == 0.0 and mx.abs(g1[1:]).max().item() > 1e-3  # empty run: zero


def experts_and_routing(n: int, k: int, seed: int):
    """A random `Experts` over 8 experts and a routing of n tokens to k of them."""
    from dh_mlx.model.moe import Experts
    c = make_config(n_routed_experts=8, num_experts_per_tok=k)
    x = mx.random.normal((n, c.hidden_size), key=mx.random.key(seed))
    idx = mx.argpartition(-mx.random.normal((n, 8), key=mx.random.key(seed + 1)), kth=k - 1, axis=-1)[:, :k]
    return Experts(c), x, idx


def test_segments_path_falls_back_to_blocked_under_compile():
    ex, x, idx = experts_and_routing(200, 2, 0)
    with expert_path("segments"):
        eager = ex(x, idx)
        compiled = mx.compile(lambda x, i: ex(x, i))(x, idx)  # routing-dependent shapes cannot be traced
    with expert_path("blocked"):
        assert mx.abs(compiled - ex(x, idx)).max().item() <= 1e-5
    assert mx.abs(compiled - eager).max().item() <= 1e-4
    with pytest.raises(ValueError, match="experts path"):
        expert_path("fastest")


def test_absorbed_path_honours_document_masks():
    from dh_mlx.train.loss import document_mask
    m = model_for("q_lora+groups+yarn+mtp")
    ids = mx.array(tokens(12))
    mask = document_mask(mx.array([[0] * 5 + [1] * 7, [0] * 12]))
    set_absorb(m, False)
    naive = m(ids, mask=mask)
    set_absorb(m, True)
    absorbed = m(ids, mask=mask)
    assert mx.abs(naive - absorbed).max().item() <= 1e-4
    set_absorb(m, None)
    assert mx.abs(naive[0, 5:] - m(ids[:1, 5:])[0]).max().item() <= 1e-4  # doc 2 sees only itself


@pytest.mark.skipif(backend.setup().streams is None, reason="one core or a GPU: attention is never split")
def test_attention_split_over_two_streams_equals_one_call(monkeypatch):
    monkeypatch.setattr(attention, "SPLIT_MIN_SCORES", 1)  # split every call
    cpu = cpu_attention()
    rng = np.random.default_rng(0)
    r = lambda *shape: mx.array(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    q, k, v = r(2, 4, 24, 16), r(2, 4, 40, 16), r(2, 4, 40, 8)
    masks = ["causal", None, mx.array(rng.random((1, 1, 24, 40)) > 0.3), r(2, 4, 24, 40)]
    for mask in masks:  # split over heads (axis 1) with per-head keys and values
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
        np.testing.assert_allclose(np.array(cpu["_sdpa"](q, k, v, 0.3, mask)), np.array(want), atol=1e-6)
    q, latent, pe = r(1, 1, 30, 16), r(1, 1, 40, 16), r(1, 1, 30, 40)  # absorbed: rows split, one latent head
    want = mx.fast.scaled_dot_product_attention(q, latent, latent, scale=0.3, mask=pe)
    np.testing.assert_allclose(np.array(cpu["_sdpa"](q, latent, latent, 0.3, pe, axis=2)), np.array(want),
                               atol=1e-6)


@pytest.mark.skipif(backend.setup().streams is None, reason="one core or a GPU: attention is never split")
def test_causal_attention_in_query_blocks_equals_one_call(monkeypatch):
    monkeypatch.setattr(attention, "SPLIT_MIN_SCORES", 1)
    cpu = cpu_attention()
    rng = np.random.default_rng(1)
    for L in (8, 13, 40):  # blocks of unequal size when 4 does not divide L
        q, k = (mx.array(rng.standard_normal((2, 3, L, 16), dtype=np.float32)) for _ in range(2))
        v = mx.array(rng.standard_normal((2, 3, L, 8), dtype=np.float32))
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
        np.testing.assert_allclose(np.array(cpu["_causal_sdpa"](q, k, v, 0.25)), np.array(want), atol=1e-6)


def test_config_declaring_mtp_that_the_tensors_lack_loads_without_it():
    """transformers keeps num_nextn_predict_layers when it saves, but drops the MTP tensors."""
    from dh_mlx.checkpoint.layout import config_for_tensors
    c = make_config()  # 3 layers, 1 MTP layer
    with pytest.warns(UserWarning, match="declares 1 MTP layer"):
        assert config_for_tensors(c, {"model.layers.2.mlp.gate.weight": 0}, "ckpt").num_nextn_predict_layers == 0
    assert config_for_tensors(c, {"model.layers.3.eh_proj.weight": 0}, "ckpt") is c


def test_swiglu_value_and_gradient_match_silu_times_up():
    """swiglu's hand-written gradient (spelled to fuse under mx.compile) against MLX's own, eager and compiled,
    including large |gate| where the sigmoid saturates."""
    import mlx.nn as nn
    from dh_mlx.backend.cpu.layers import swiglu

    rng = np.random.default_rng(0)
    saturated = [-120.0, -30.0, 0.0, 30.0, 120.0]
    gate = mx.array(np.concatenate([rng.standard_normal(200) * 4, saturated]).astype(np.float32))
    up, cot = (mx.array(rng.standard_normal(205).astype(np.float32)) for _ in range(2))
    ref_out, ref_grads = mx.vjp(lambda g, u: nn.silu(g) * u, [gate, up], [cot])
    for fn in (lambda g, u, c: mx.vjp(swiglu, [g, u], [c]), mx.compile(lambda g, u, c: mx.vjp(swiglu, [g, u], [c]))):
        out, grads = fn(gate, up, cot)
        np.testing.assert_allclose(np.array(out[0]), np.array(ref_out[0]), rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, ref_grads):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_gradient_matches_mlx_and_is_row_major(bias):
    """`layers.Linear` (hand-written gradient) against `nn.Linear` with MLX's own, eager and compiled, for a
    batched input; its weight gradient must come out row-major (MLX's is a transposed view, which the
    optimizer's fused update would have to copy)."""
    import mlx.nn as nn
    from dh_mlx.model.layers import Linear
    assert "linear" in ops.registered()  # the CPU backend's row-major gradient

    rng = np.random.default_rng(1)
    ours, ref = Linear(24, 40, bias=bias), nn.Linear(24, 40, bias=bias)
    ref.update(ours.parameters())
    x = mx.array(rng.standard_normal((3, 7, 24)).astype(np.float32))
    cot = mx.array(rng.standard_normal((3, 7, 40)).astype(np.float32))
    ref_value, ref_grads = nn.value_and_grad(ref, lambda x: (ref(x) * cot).sum())(x)
    vg = nn.value_and_grad(ours, lambda x: (ours(x) * cot).sum())
    for fn in (vg, mx.compile(vg, inputs=ours.state, outputs=ours.state)):
        value, grads = fn(x)
        np.testing.assert_allclose(value.item(), ref_value.item(), rtol=1e-5)
        for k in ref_grads:
            np.testing.assert_allclose(np.array(grads[k]), np.array(ref_grads[k]), rtol=1e-5, atol=1e-5, err_msg=k)
        mx.eval(grads)
        assert memoryview(grads["weight"]).strides == (24 * 4, 4)
    dx_ours = mx.grad(lambda x: (ours(x) * cot).sum())(x)
    dx_ref = mx.grad(lambda x: (ref(x) * cot).sum())(x)
    np.testing.assert_allclose(np.array(dx_ours), np.array(dx_ref), rtol=1e-5, atol=1e-5)
    assert memoryview(ref_grads["weight"]).strides != (24 * 4, 4)  # MLX's own: a transposed view


def test_without_native_kernels_the_cpu_experts_fall_back_to_pure_mlx(monkeypatch):
    """No compiler or a nanobind that does not match MLX: `native.load()` is None and the default expert path
    (per-expert matmuls eager, blocked layout compiled) gives the same values; DH_MLX_NATIVE=off says so."""
    import os
    import subprocess
    import sys
    from dh_mlx.backend.cpu import native
    ex, x, idx = experts_and_routing(200, 2, 5)
    with expert_path("gather"):
        want = ex(x, idx)
    monkeypatch.setattr(native, "load", lambda: None)
    monkeypatch.setattr(cpu_experts, "run_native", lambda *a: pytest.fail("used the native kernels"))
    assert mx.abs(ex(x, idx) - want).max().item() <= 1e-4
    assert mx.abs(mx.compile(lambda x: ex(x, idx))(x) - want).max().item() <= 1e-4
    with expert_path("native"), pytest.raises(ValueError, match="native kernels"):
        ex(x, idx)
    out = subprocess.run([sys.executable, "-c", "from dh_mlx.backend.cpu import native; print(native.load(), native.status)"],
                         env=dict(os.environ, DH_MLX_NATIVE="off"), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None disabled by DH_MLX_NATIVE"
