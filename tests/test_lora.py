"""LoRA: fused equals unfused, only adapters train, expert adapters learn only from routed tokens, mlx-lm reads
our adapter files with the same logits, QLoRA on a quantized base, and resume."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dh_mlx import load_model, save_model
from dh_mlx.train.config import TrainConfig
from dh_mlx.lora import (LoRAConfig, LoRAStackedLinear, apply_lora, fuse_lora, load_adapters,
                               save_adapters)
from dh_mlx.train.trainer import build_steps, make_optimizer
from helpers import fixed_batch, force_expert_path, make_checkpoint, tokens, write_corpus

TOL = 1e-4
ALL = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "shared_experts", "gate_proj",
       "up_proj", "down_proj"]


def randomise_adapters(model, seed=0):
    """Non-zero B (a fresh adapter is the identity), so every comparison below tests something."""
    rng = np.random.default_rng(seed)
    model.load_weights([(k, mx.array(rng.normal(0, 0.2, v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.trainable_parameters())], strict=False)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    make_checkpoint(d / "mtp")
    model = load_model(d / "mtp")
    save_model(model, d / "plain", mtp=False)  # mlx-lm loads MTP layers only at index 61
    return d


def test_fused_equals_unfused_and_cached_decode_sees_the_adapters(base_dir, tmp_path, monkeypatch):
    model = load_model(base_dir / "mtp")
    ids = mx.array(tokens())
    force_expert_path(monkeypatch, "gather")  # adapted experts cannot take the one-node decode kernel
    base = model(ids)
    apply_lora(model, LoRAConfig(rank=4, targets=ALL))
    assert mx.array_equal(model(ids), base).item()  # B = 0: the adapters start as the identity
    unfused = randomise_adapters(model)(ids)
    assert mx.abs(unfused - base).max().item() > 0.1
    # the absorbed (decode) path reads kv_b_proj's adapted matrix
    for layer in model.model.layers:
        layer.self_attn.absorb = True
    assert mx.abs(model(ids) - unfused).max().item() <= TOL
    for layer in model.model.layers:
        layer.self_attn.absorb = None
    save_adapters(model, tmp_path / "ad", LoRAConfig(rank=4, targets=ALL))
    fuse_lora(model)
    assert not any(isinstance(m, LoRAStackedLinear) for _, m in model.named_modules())
    assert mx.abs(model(ids) - unfused).max().item() <= TOL
    from dh_mlx.train.lora_run import fuse
    fused = fuse(model=base_dir / "mtp", adapter=tmp_path / "ad", out=tmp_path / "fused")
    assert mx.abs(load_model(tmp_path / "fused")(ids) - unfused).max().item() <= TOL
    assert fused.config.num_nextn_predict_layers == 1


def test_a_step_changes_only_the_adapters(base_dir):
    model = load_model(base_dir / "plain")
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    apply_lora(model, LoRAConfig(rank=4, dropout=0.1))
    cfg = TrainConfig(steps=2, lr=1e-2, warmup_steps=0, alf_gamma=0.0, balance_alpha=0.0)
    fns = build_steps(model, make_optimizer(cfg), cfg)
    dropout = model.layers[1].self_attn.o_proj.dropout
    keys = []
    for _ in range(2):
        mx.eval(fns.step(*fixed_batch(model.config)), fns.state)
        keys.append(np.array(dropout._key))
    assert not np.array_equal(*keys)  # the compiled step draws a new dropout mask each step
    after = dict(tree_flatten(model.parameters()))
    lora = {k for k in after if k.endswith(("lora_a", "lora_b"))}
    assert lora and all(np.abs(np.array(after[k])).max() > 0 for k in lora if k.endswith("lora_b"))
    for k, v in before.items():  # base weights now live under `.linear.` inside the adapted modules
        now = after.get(k, after.get(k.replace(".weight", ".linear.weight")))
        assert np.array_equal(np.array(now), v), k


@pytest.mark.parametrize("blocked", [False, True])
def test_expert_adapters_get_gradients_only_from_routed_tokens(base_dir, blocked, monkeypatch):
    model = load_model(base_dir / "plain")
    apply_lora(model, LoRAConfig(rank=4, targets=[]))
    randomise_adapters(model)
    force_expert_path(monkeypatch, "blocked" if blocked else "gather")
    E = model.config.n_routed_experts
    ids = mx.array(tokens(n=3, batch=1))  # 3 tokens x 2 experts: some experts go unchosen in every layer
    chosen = [set(np.array(r.indices).ravel().tolist()) for r in model.forward(ids).routing]
    assert any(len(c) < E for c in chosen)
    grads = nn.value_and_grad(model, lambda m: m(ids).sum())(model)[1]
    moe_layers = [i for i, l in enumerate(model.layers) if hasattr(l.mlp, "experts")]
    for layer_idx, used in zip(moe_layers, chosen):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            g = grads["model"]["layers"][layer_idx]["mlp"]["experts"][proj]
            for name in ("lora_a", "lora_b"):
                norms = np.abs(np.array(g[name])).reshape(E, -1).max(axis=1)  # per expert
                for e in range(E):
                    assert (norms[e] > 0) == (e in used), (layer_idx, proj, name, e)


def test_mlx_lm_reads_our_adapters_with_the_same_logits(base_dir, tmp_path):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    model = load_model(base_dir / "plain")
    lc = LoRAConfig(rank=4, num_layers=2, targets=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj",
                                                    "shared_experts"])
    apply_lora(model, lc)
    randomise_adapters(model)
    save_adapters(model, tmp_path / "ad", lc)
    theirs, _ = mlx_lm_utils.load_model(base_dir / "plain")
    mlx_lm_utils.load_adapters(theirs, str(tmp_path / "ad"))
    ids = mx.array(tokens(n=40))  # enough (token, expert) pairs for mlx-lm's sorted gather too
    ours = model(ids)
    assert mx.abs(ours - theirs(ids)).max().item() <= TOL
    again = load_adapters(load_model(base_dir / "plain"), tmp_path / "ad")  # and back into ours
    assert mx.abs(again(ids) - ours).max().item() <= TOL
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 2 and "mlp.switch_mlp.up_proj" in cfg["lora_parameters"]["keys"]


def test_qlora_trains_on_a_quantized_base_and_fuses_to_float(base_dir, tmp_path):
    from dh_mlx.quant import QuantConfig, is_quantized, quantize_model
    model = load_model(base_dir / "plain")
    quantize_model(model, QuantConfig(bits=4, group_size=32))
    save_model(model, tmp_path / "q4")
    model = load_model(tmp_path / "q4")
    apply_lora(model, LoRAConfig(rank=4))
    cfg = TrainConfig(steps=3, lr=1e-2, warmup_steps=0, alf_gamma=0.0)
    fns = build_steps(model, make_optimizer(cfg), cfg)
    for _ in range(3):
        out = fns.step(*fixed_batch(model.config))
        mx.eval(out, fns.state)
    assert np.isfinite(out[0].item())
    ids = mx.array(tokens())
    unfused = model(ids)
    save_adapters(model, tmp_path / "ad", LoRAConfig(rank=4))
    fuse_lora(model)
    assert not is_quantized(model) and "quantization" not in model.config.extra
    assert mx.abs(model(ids) - unfused).max().item() <= TOL
    from dh_mlx.train.lora_run import fuse
    kept = fuse(model=tmp_path / "q4", adapter=tmp_path / "ad", out=tmp_path / "kept", keep_quantized=True)
    assert is_quantized(kept) and is_quantized(load_model(tmp_path / "kept"))
    assert mx.abs(load_model(tmp_path / "kept")(ids) - unfused).max().item() < 0.2  # re-quantized: close, not equal


@pytest.mark.slow
def test_lora_run_resumes_to_the_same_adapters_and_refuses_other_settings(tmp_path):
    from dh_mlx.config import DomainRouting
    from dh_mlx.train.tokenizer import train_tokenizer
    from dh_mlx.train.lora_run import lora
    from dh_mlx.checkpoint.weights import copy_tokenizer
    write_corpus(tmp_path / "data.jsonl")
    train_tokenizer(tmp_path / "data.jsonl", tmp_path / "tok", vocab_size=300)
    make_checkpoint(tmp_path / "base", vocab_size=300,
                    domain_routing=DomainRouting(domains=["code", "math"], experts_per_domain=2))
    copy_tokenizer(tmp_path / "tok", tmp_path / "base")
    common = dict(model=tmp_path / "base", data=tmp_path / "data.jsonl", rank=4, steps=4, batch_size=2,
                  seq_len=16, eval_every=2, save_every=100, warmup_steps=1, progress=False, lr=1e-2)
    full = lora(out=tmp_path / "full", **common)
    assert 0 < full.share < 0.2 and full.val_loss_before is not None and np.isfinite(full.val_loss)
    part = lora(out=tmp_path / "part", stop_after=2, **common)
    assert part.run.interrupted and part.run.step == 2
    with pytest.raises(ValueError, match="rank"):
        lora(out=tmp_path / "part", resume=True, **{**common, "rank": 8})
    resumed = lora(out=tmp_path / "part", resume=True, **common)
    assert resumed.run.step == 4
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "part" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["scale"] == 4.0 and cfg["train_config"]["alf_gamma"] == 0.0


def test_bad_options_and_mismatched_adapters_are_refused(base_dir, tmp_path):
    with pytest.raises(ValueError, match="'rank'"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="'targets'"):
        LoRAConfig(targets=["v_proj"])
    model = load_model(base_dir / "plain")
    with pytest.raises(ValueError, match="q_a_proj"):
        apply_lora(model, LoRAConfig(targets=["q_proj"]))
    model = load_model(base_dir / "plain")
    apply_lora(model, LoRAConfig(rank=4))
    save_adapters(model, tmp_path / "ad", LoRAConfig(rank=4))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 2
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_adapters(load_model(base_dir / "plain"), tmp_path / "ad")
