"""Shared tiny configs and a random-checkpoint factory for the tests (float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from dh_mlx import ModelConfig, random_model, save_model

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.7}
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
            first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=512, rope_scaling=YARN,
            num_nextn_predict_layers=1)

# The configuration space the parity tests sweep (name -> overrides of BASE).
CONFIGS = {
    "q_lora+groups+yarn+mtp": {},
    "no_q_lora+flat+dense0": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                                  rope_scaling=None, num_nextn_predict_layers=0, num_experts_per_tok=3),
    "dense_first2+k1": dict(first_k_dense_replace=2, num_hidden_layers=4, num_experts_per_tok=1,
                            routed_scaling_factor=1.0),
    "softmax_greedy": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, n_group=1,
                           topk_group=1),
    "softmax_group_limited": dict(scoring_func="softmax", topk_method="group_limited_greedy",
                                  norm_topk_prob=False),
}


def make_config(name: str = "q_lora+groups+yarn+mtp", **overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **CONFIGS[name], **overrides})


def randomise_for_parity(model, seed: int = 0):
    """Non-trivial router biases and norm gains, so bias/eps/weight mistakes show up in the logits."""
    rng = np.random.default_rng(seed)
    new = []
    for path, a in tree_flatten(model.parameters()):
        if path.endswith("e_score_correction_bias"):
            new.append((path, mx.array(rng.uniform(-0.3, 0.3, a.shape).astype(np.float32))))
        elif "norm" in path and path.endswith("weight"):
            new.append((path, mx.array(rng.uniform(0.5, 1.5, a.shape).astype(np.float32))))
        elif path.endswith("mlp.gate.weight"):
            new.append((path, mx.array(rng.normal(0, 0.5, a.shape).astype(np.float32))))
    model.load_weights(new, strict=False)
    mx.eval(model.parameters())
    return model


def make_checkpoint(tmp: Path, name: str = "q_lora+groups+yarn+mtp", seed: int = 0, **overrides):
    model = randomise_for_parity(random_model(make_config(name, **overrides), seed=seed, dtype="float32"), seed)
    save_model(model, tmp)
    return model


def tokens(n: int = 12, vocab: int = 97, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, n))


def model_with_tokenizer(root: Path, name: str = "m") -> Path:
    """`root/name`: a random checkpoint with a 400-piece tokenizer trained on a small corpus (`root/data.jsonl`)."""
    import shutil

    from dh_mlx.train.tokenizer import train_tokenizer
    from test_tokenizer import corpus_lines
    (root / "data.jsonl").write_text("\n".join(corpus_lines(200)) + "\n")
    tok = train_tokenizer(root / "data.jsonl", root / "tok", vocab_size=400)
    make_checkpoint(root / name, vocab_size=tok.vocab_size)
    for f in (root / "tok").iterdir():
        shutil.copyfile(f, root / name / f.name)
    return root / name


def expert_path(path: str | None):
    """A block in which the routed experts always run through the CPU backend's `path` (None: as chosen)."""
    from contextlib import nullcontext

    from dh_mlx import ops
    from dh_mlx.backend.cpu import experts
    return nullcontext() if path is None else ops.using(**experts.forced(path))


def cpu_attention():
    """The CPU backend's attention functions, over the streams `backend.setup()` made."""
    from dh_mlx import backend
    from dh_mlx.backend.cpu import attention
    return attention.make(backend.setup().streams)


def force_expert_path(monkeypatch, path: str) -> None:
    """`expert_path(path)` for the rest of a test (undone at its end)."""
    from dh_mlx import ops
    from dh_mlx.backend.cpu import experts
    for name, impl in experts.forced(path).items():
        if impl is None:
            monkeypatch.delitem(ops._registered, name, raising=False)
        else:
            monkeypatch.setitem(ops._registered, name, impl)
