"""The PyTorch twin gives the MLX model's numbers on the same checkpoint directory (float32, CPU)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dh_mlx import load_model as mlx_load_model
from helpers import CONFIGS, make_checkpoint, make_config, tokens

torch = pytest.importorskip("torch")
twin = pytest.importorskip("dh_mlx.torch")
TOL = 1e-4
DOMAINS = {"domains": ["code", "math", "law"], "experts_per_domain": 2}


def pair(tmp_path, name="q_lora+groups+yarn+mtp", **overrides):
    ours = make_checkpoint(tmp_path, name, **overrides)
    return ours, twin.load_model(tmp_path, device="cpu")


def run(model, ids, **kw):
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_mlx_on_every_path(tmp_path, name):
    ours, tm = pair(tmp_path, name)
    ids = tokens(40)  # 80 tokens: the sorted expert kernels, not only the gathered one
    ref = np.array(ours(mx.array(ids)))
    assert np.abs(ref).max() > 0.1
    for impl in ("auto", "gather", "loop", "grouped"):
        tm.set_experts_impl(impl)
        for absorb in (False, True):
            tm.set_absorb(absorb)
            assert np.abs(run(tm, ids) - ref).max() <= TOL, (impl, absorb)


@pytest.mark.parametrize("overrides", [dict(rope_interleave=False), dict(tie_word_embeddings=True),
                                       dict(rope_scaling=None, q_lora_rank=None)])
def test_logits_equal_mlx_for_rope_and_head_variants(tmp_path, overrides):
    ours, tm = pair(tmp_path, **overrides)
    ids = tokens(16)
    assert np.abs(run(tm, ids) - np.array(ours(mx.array(ids)))).max() <= TOL


def test_mtp_equals_mlx(tmp_path):
    ours, tm = pair(tmp_path)
    ids = tokens(16)
    o = ours.forward(mx.array(ids))
    ref = ours.mtp_forward(o.hidden[:, :-1], mx.array(ids[:, 1:]))
    with torch.no_grad():
        t = tm.forward_full(torch.tensor(ids))
        got = tm.mtp_forward(t.hidden[:, :-1], torch.tensor(ids[:, 1:]))
    assert np.abs(got.logits.numpy() - np.array(ref.logits)).max() <= TOL
    assert np.abs(got.hidden.numpy() - np.array(ref.hidden)).max() <= TOL
    assert np.abs(t.hidden.numpy() - np.array(o.hidden)).max() <= TOL


@pytest.mark.parametrize("shape", ["per_sequence", "per_token"])
def test_domain_routing_restricts_experts_as_mlx_does(tmp_path, shape):
    ours, tm = pair(tmp_path, domain_routing=DOMAINS)
    ids = tokens(20, batch=3)
    dom = np.array([0, -1, 2]) if shape == "per_sequence" else np.random.default_rng(1).integers(-1, 3, (3, 20))
    ref = ours.forward(mx.array(ids), domain_ids=mx.array(dom))
    with torch.no_grad():
        got = tm.forward_full(torch.tensor(ids), domain_ids=torch.tensor(dom))
    assert np.abs(got.logits.numpy() - np.array(ref.logits)).max() <= TOL
    allowed = np.array([[True] * 8] + make_config(domain_routing=DOMAINS).domain_routing.allowed(8))
    per_token = np.broadcast_to(dom if dom.ndim == 2 else dom[:, None], ids.shape)
    for r_mlx, r_twin in zip(ref.routing, got.routing, strict=True):
        chosen = np.sort(r_twin.indices.numpy(), axis=-1)
        assert (chosen == np.sort(np.array(r_mlx.indices), axis=-1)).all()
        assert np.take_along_axis(allowed[per_token + 1], chosen, axis=-1).all()


def test_prefill_then_cached_decode_equals_full_forward(tmp_path):
    _, tm = pair(tmp_path)
    ids = torch.tensor(tokens(20))
    with torch.no_grad():
        full = tm(ids)
        cache = twin.make_cache(tm.config)
        steps = [tm(ids[:, :7], cache=cache)] + [tm(ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= TOL
    c = tm.config
    assert cache[0].offset == 20 and cache[0].nbytes == 2 * 20 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_cached_greedy_generation_equals_uncached_argmax_rollout(tmp_path):
    _, tm = pair(tmp_path)
    prompt = torch.tensor(tokens(6))
    got = twin.generate_greedy(tm, prompt, 12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, tm(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq[:, 6:])
    assert torch.equal(twin.generate_greedy(tm, prompt[0], 12), seq[0, 6:])


@pytest.mark.parametrize("shard_bytes", [5 * 10**9, 40_000])
def test_twin_save_then_mlx_load_is_bit_exact(tmp_path, shard_bytes):
    ours, tm = pair(tmp_path / "a")
    twin.save_model(tm, tmp_path / "b", max_shard_bytes=shard_bytes)
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file() == (shard_bytes < 10**6)
    back = mlx_load_model(tmp_path / "b", dtype="float32")
    assert back.config == ours.config
    mine, theirs = dict(tree_flatten(back.parameters())), dict(tree_flatten(ours.parameters()))
    assert mine.keys() == theirs.keys()
    for k, v in theirs.items():
        assert np.array_equal(np.array(mine[k]), np.array(v)), k


def test_mtp_free_copy_and_a_missing_tensor_is_named(tmp_path):
    ours, tm = pair(tmp_path / "a")
    twin.save_model(tm, tmp_path / "b", mtp=False)
    back = twin.load_model(tmp_path / "b", device="cpu")
    assert back.config.num_nextn_predict_layers == 0 and len(back.model.layers) == tm.config.num_hidden_layers
    ids = tokens(8)
    assert np.abs(run(back, ids) - np.array(ours(mx.array(ids)))).max() <= TOL
    from safetensors.torch import load_file, save_file
    w = load_file(tmp_path / "b" / "model.safetensors")
    del w["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(w, tmp_path / "b" / "model.safetensors")
    with pytest.raises(twin.CheckpointError, match=r"experts 0\.\.7, missing \[3\]"):
        twin.load_model(tmp_path / "b", device="cpu")


def test_bfloat16_load_keeps_the_router_in_float32(tmp_path):
    make_checkpoint(tmp_path)
    tm = twin.load_model(tmp_path, device="cpu", dtype="bfloat16")
    gate = tm.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert tm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(tm(torch.tensor(tokens(8))).float()).all()


@pytest.mark.slow
def test_export_round_trip_gives_the_same_logits_and_tensors(tmp_path):
    _, tm = pair(tmp_path / "ckpt")
    twin.export_model(tm, tmp_path / "m.pt2", torch.tensor(tokens(16)))
    program = torch.export.load(str(tmp_path / "m.pt2"))
    for n, batch in ((5, 3), (33, 2)):  # other shapes than the example: batch and length are dynamic
        ids = torch.tensor(tokens(n, batch=batch, seed=n))
        with torch.no_grad():
            assert (program.module()(ids) - tm(ids)).abs().max().item() <= TOL
    from safetensors.numpy import load_file
    disk = load_file(tmp_path / "ckpt" / "model.safetensors")
    exported = twin.state_dict_from_export(tmp_path / "m.pt2")
    assert exported.keys() == disk.keys()
    assert all(np.array_equal(exported[k].numpy(), disk[k]) for k in disk)
    assert twin.config_from_export(tmp_path / "m.pt2") == tm.config


def test_balance_loss_matches_the_formula():
    """DeepSeek-V3 eqs. 17-20 per row over its valid tokens only (loss mask 1), then averaged over the rows."""
    rng = np.random.default_rng(0)
    B, T, E, K = 2, 5, 8, 2
    scores = rng.uniform(0.1, 1, (B, T, E)).astype(np.float32)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(B * T)]).reshape(B, T, K)
    valid = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    r = twin.Routing(torch.tensor(idx), torch.ones(B, T, K), torch.tensor(scores))
    want = 0.0
    for b in range(B):
        keep = valid[b] > 0
        f = E / (K * keep.sum()) * np.bincount(idx[b][keep].ravel(), minlength=E)
        P = (scores[b][keep] / scores[b][keep].sum(-1, keepdims=True)).mean(0)
        want += (f * P).sum() / B
    assert twin.balance_loss([r, r], torch.tensor(valid), E, K).item() == pytest.approx(2 * want, rel=1e-5)


def test_training_step_updates_weights_and_moves_biases_by_gamma(tmp_path):
    _, tm = pair(tmp_path)
    cfg = twin.TrainConfig(lr=1e-3)
    opt = twin.make_optimizer(tm, cfg)
    biases = [m.gate.e_score_correction_bias for m in tm.moe_layers()]
    assert len(biases) == 3  # two main-stack MoE layers and the MTP module's
    assert not any(b is p for b in biases for p in opt.param_groups[0]["params"])
    before = [b.clone() for b in biases]
    w0 = tm.model.embed_tokens.weight.detach().clone()
    ids = tokens(25)
    B, T = ids.shape[0], ids.shape[1] - 1
    batch = twin.Batch.from_numpy((ids[:, :-1], ids[:, 1:], np.ones((B, T), np.float32), np.zeros((B, T), np.int32),
                                   np.full((B, T), -1, np.int32)))
    with torch.no_grad():
        terms = twin.loss_terms(tm, batch, mtp_lambda=0.3, balance_alpha=1e-4)
    assert terms.loads.shape == (3, 8) and terms.loads.sum().item() == (2 * T + T - 1) * B * 2  # every token, k = 2
    stats = twin.train_step(tm, opt, batch, cfg)
    assert all(np.isfinite(v) for v in stats.values()) and stats["mtp"] > 0 and stats["balance"] > 0
    assert stats["loss"] == pytest.approx(stats["ce"] + 0.3 * stats["mtp"] + stats["balance"], rel=1e-6)
    assert not torch.equal(w0, tm.model.embed_tokens.weight)
    for b_new, b_old, load in zip(biases, before, terms.loads, strict=True):
        step = torch.sign(load.mean() - load)
        assert torch.equal(b_new, b_old + 1e-3 * step)  # the routing before the step decided the update
        assert ((b_new - b_old).abs() - 1e-3 * step.abs()).abs().max().item() < 1e-7
    with pytest.raises(ValueError, match="alf_gamma"):
        twin.TrainConfig(alf_gamma=-1.0)
    with pytest.raises(ValueError, match="mtp_distill"):
        twin.make_optimizer(tm, twin.TrainConfig(mtp_distill=True))
