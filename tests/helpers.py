"""Shared tiny configs and a random-checkpoint factory for the tests (float32, CPU)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
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


BO, BI = 16, 32  # DeepSeek-V3 uses [128, 128]; tiny shapes need smaller blocks, unequal to tell rows from columns
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BO, BI]}


def to_fp8(w):
    """(e4m3 weight, scale per block, the weight it stands for) of a torch matrix, as DeepSeek's quantizer
    writes them."""
    import torch
    rows, cols = w.shape
    pr, pc = -(-rows // BO) * BO, -(-cols // BI) * BI
    padded = torch.zeros(pr, pc).index_put_((torch.arange(rows)[:, None], torch.arange(cols)), w.float())
    blocks = padded.reshape(pr // BO, BO, pc // BI, BI)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(pr, pc)[:rows, :cols].to(torch.float8_e4m3fn)
    full = scale.repeat_interleave(BO, 0).repeat_interleave(BI, 1)[:rows, :cols]
    return q, scale, q.float() * full


def make_fp8(src: Path, fp8_dir: Path, deq_dir: Path) -> tuple[Path, Path, Path]:
    """(fp8_dir, deq_dir, src): the float directory `src` as DeepSeek-V3 releases it in FP8 (its linears e4m3
    with block scales, shard for shard) and, in `deq_dir`, the float weights that FP8 stands for."""
    import json
    from safetensors.torch import load_file, save_file
    from dh_mlx.checkpoint.layout import safetensors_files
    config = json.loads((src / "config.json").read_text())
    weight_map: dict[str, dict[str, str]] = {"fp8": {}, "deq": {}}
    partial = False
    for d in (fp8_dir, deq_dir):
        d.mkdir(parents=True)
    for f in safetensors_files(src):
        fp8, dequantized = {}, {}
        for k, v in load_file(str(f)).items():
            released = k.endswith(("_proj.weight", "_proj_with_mqa.weight", "indexer.wq_b.weight", "indexer.wk.weight"))
            if released and not k.endswith("indexer.weights_proj.weight") and v.ndim == 2:  # the linears, as released
                q, scale, deq = to_fp8(v)
                fp8[k], fp8[k + "_scale_inv"], dequantized[k] = q, scale, deq
                partial |= bool(v.shape[0] % BO or v.shape[1] % BI)
            else:
                fp8[k] = dequantized[k] = v
        for name, d, weights in (("fp8", fp8_dir, fp8), ("deq", deq_dir, dequantized)):
            save_file(weights, str(d / f.name), metadata={"format": "pt"})
            weight_map[name].update({k: f.name for k in weights})
    assert partial  # partial edge blocks are in play
    for name, d, extra in (("fp8", fp8_dir, {"quantization_config": FP8}), ("deq", deq_dir, {})):
        (d / "config.json").write_text(json.dumps({**config, **extra}))
        if (src / "model.safetensors.index.json").is_file():
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map[name]}))
    return fp8_dir, deq_dir, src


BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
# A template in the DeepSeek style: system text first, then the turns, each reply ended by EOS.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
            "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
            "{% else %}" + ASSISTANT + "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")
TEXTS = ["Hello, world!", "  leading   and trailing  spaces \n\n tabs\tand\r\nnewlines ",
         "naïve café ½ – 中文字符 – かなカナ – emoji 🙂👍🏽", f"a special token {EOS} inside text{USER}", "",
         "1234567 89 3.14159", "don't 'quote' (x+y)*z=[1,2]; a_b-c/d"]


def make_bpe_tokenizer(d: Path, pre: str = "deepseek-v3", vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json as DeepSeek releases ship (BOS/EOS special, User/Assistant added, a chat
    template, eos ids in generation_config.json), with the pre-tokenizer llama.cpp calls `pre`."""
    import json
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from dh_mlx.convert.gguf_vocab import PRE_TOKENIZERS
    tk = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), "isolated") for r in PRE_TOKENIZERS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    corpus = [t * 20 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog " * 30, "def f(x): return x\n" * 30]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tk.add_tokens([USER, ASSISTANT])  # added, not special: they decode to their text
    d.mkdir(parents=True, exist_ok=True)
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": {"__type": "AddedToken", "content": BOS},
        "eos_token": EOS, "chat_template": TEMPLATE}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, vocab_size + 1]}))
    return d


# ---- shared by several test files ---------------------------------------------------------------------
LAUNCH = Path(sys.executable).parent / "mlx.launch"


def corpus_lines(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the of model token expert router latent attention cache layer value query key".split()
    lines = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + ".\n"
        elif kind == 1:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            text = f"def f{i}(x):\n    return x + {a} * {b}\n"
        else:
            text = f"{rng.randint(1, 99)} + {rng.randint(1, 99)} = ? Café, naïve résumé.\t½\n"
        lines.append(json.dumps({"domain": ["general", "code", "math"][kind], "text": text}))
    return lines


def write_corpus(path, n=120):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "x", "y", "=", "+"], 30))
            f.write(json.dumps({"domain": ["code", "math"][i % 2], "text": words}) + "\n")


def write_records(path, n: int = 30, seed: int = 0) -> None:
    """Plain text, prompt/completion and chat records, short enough that rows hold several; some with a domain
    (code, math or legal)."""
    rng = random.Random(seed)
    pool = "the of model token expert router latent attention cache layer value query key".split()

    def words(lo, hi):
        return " ".join(rng.choice(pool) for _ in range(rng.randint(lo, hi)))

    lines = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            r = {"text": words(2, 5) + "."}
        elif kind == 1:
            r = {"prompt": f"{words(1, 3)}?", "completion": f" {words(1, 3)}."}
        else:
            r = {"messages": [{"role": "system", "content": words(1, 1)}, {"role": "user", "content": words(1, 2)},
                              {"role": "assistant", "content": words(1, 2)}, {"role": "user", "content": words(1, 1)},
                              {"role": "assistant", "content": words(1, 2)}]}
        domain = [None, "code", "math", None, "legal"][i % 5]
        if domain:
            r["domain"] = domain
        lines.append(json.dumps(r))
    path.write_text("\n".join(lines) + "\n")


def fixed_batch(cfg, B=4, T=16, seed=0):
    from dh_mlx.train.loss import Batch
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, (B, T + 1))
    return Batch(mx.array(toks[:, :-1]), mx.array(toks[:, 1:]), mx.ones((B, T)), mx.zeros((B, T), mx.int32),
                 mx.full((B, T), -1, mx.int32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release(tmp_path, name, *, model_type, overrides, drop=(), **config_edits):
    """A random model saved as bf16 shards with an index, its config.json rewritten as a release writes it."""
    model = randomise_for_parity(random_model(make_config(name, **overrides), seed=5, dtype="float32"), 5)
    save_model(model, tmp_path, dtype="bfloat16", max_shard_bytes=200_000)
    cfg = json.loads((tmp_path / "config.json").read_text())
    arch = {"deepseek_v2": "DeepseekV2ForCausalLM"}.get(model_type, "DeepseekV3ForCausalLM")  # kimi_k2 too
    cfg.update(model_type=model_type, architectures=[arch], aux_loss_alpha=0.001, seq_aux=True, **config_edits)
    for key in drop:
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    return tmp_path


CASES = {
    # V2-Lite: no q_lora, softmax (its config states no scoring_func), greedy top-k, no groups (null), yarn "type"
    "v2_lite": dict(name="softmax_greedy", model_type="deepseek_v2",
                    overrides=dict(q_lora_rank=None, norm_topk_prob=False, routed_scaling_factor=1.0),
                    drop=("scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor"),
                    n_group=None, topk_group=None),
    # V2 / V2.5: q_lora, softmax, group-limited greedy routing
    "v2": dict(name="softmax_group_limited", model_type="deepseek_v2", overrides={}, drop=("scoring_func",)),
    # V3 / R1 / Moonlight in bf16: sigmoid, noaux_tc with groups, an MTP module
    "v3_bf16": dict(name="q_lora+groups+yarn+mtp", model_type="deepseek_v3", overrides={}),
}


def cli(*args, stdin=None, env=None, timeout=300, text=True):
    """Runs `dh-mlx ARGS` in a fresh interpreter, as a user's shell would."""
    return subprocess.run([sys.executable, "-m", "dh_mlx.cli", *args], input=stdin, capture_output=True, text=text,
                          timeout=timeout, env={**os.environ, **env} if env else None)
