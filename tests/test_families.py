"""The DeepSeek family as released since V3: DeepSeek-V3.2 and GLM-5 (sparse attention), GLM-4.7-Flash and
Kimi-K2.5's language model. Random checkpoints that transformers builds and saves in the release layout (bf16
shards with an index): our logits equal transformers' (float32 compute), with prompts longer than index_topk."""

import json

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import load_model
from dh_mlx.config import load_config
from helpers import YARN

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SHAPES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
              qk_nope_head_dim=16, v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
              n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
              max_position_embeddings=512, tie_word_embeddings=False)
# index_topk far below the prompt length, so the selection decides the logits; 16 indexer heads so that no two
# positions tie at a score of exactly 0 (all heads' ReLU at 0) on the top-k boundary
DSA = dict(index_topk=5, index_head_dim=16, index_n_heads=16)
ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in YARN.items() if k != "type"}}
FAMILIES = {
    "deepseek_v32": dict(model_type="deepseek_v32", **DSA),
    "glm_moe_dsa": dict(model_type="glm_moe_dsa", **DSA),  # interleaved RoPE in the indexer
    "glm_moe_dsa_shared": dict(model_type="glm_moe_dsa", indexer_types=["full", "shared", "full"], **DSA),
    "glm4_moe_lite": dict(model_type="glm4_moe_lite", mlp_layer_types=["dense", "sparse", "sparse"]),
    "glm4_moe_lite_half_split": dict(model_type="glm4_moe_lite", rope_interleave=False, n_group=1, topk_group=1),
}


def randomise(model, seed: int = 0):
    """Norm gains, biases (the indexer's LayerNorm), router weights and selection biases away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.6 - 0.3)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.6 - 0.3)
    return model


def release(path, name: str, **edits):
    """A random transformers model of family `name`, saved as bf16 shards with an index (its release layout)."""
    spec = {**SHAPES, "rope_parameters": ROPE, **FAMILIES[name], **edits}
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = randomise(transformers.AutoModelForCausalLM.from_config(config))
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


def reference_logits(path, ids, cls=None):
    model = (cls or transformers.AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def prompt(n: int = 16, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 97, (batch, n))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_release_logits_equal_transformers(tmp_path, name):
    path = release(tmp_path, name)
    ids = prompt()
    want = reference_logits(path, ids)
    ours = load_model(path, dtype="float32")
    got = np.array(ours(mx.array(ids)))
    assert np.abs(got - want).max() <= 1e-4 and np.abs(want).max() > 0.1
    if ours.config.sparse_attention:  # the selection matters: attending to every position gives other logits
        assert ids.shape[1] > ours.config.index_topk
        for layer in ours.layers:
            if "indexer" in layer.self_attn:
                layer.self_attn.indexer.index_topk = 1000
        assert np.abs(np.array(ours(mx.array(ids))) - want).max() > 1e-2


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa_shared"])
def test_cached_decoding_equals_the_full_forward(tmp_path, name):
    """Chunked prefill, then one token at a time (plain and compiled fixed-capacity steps, past 256 positions):
    each step's logits are the full forward's at that position."""
    from dh_mlx.generation.cache import make_cache
    from dh_mlx.generation.steps import compiled_decode_step, decode_step, prefill
    model = load_model(release(tmp_path, name), dtype="float32")
    ids = mx.array(prompt(280, batch=1, seed=1))
    full = np.array(model(ids))[0]
    for compiled in (False, True):
        cache = make_cache(model.config)
        logits, _ = prefill(model, ids[:, :23], cache, step_size=7)
        errors = [np.abs(np.array(logits[0]) - full[22]).max()]
        step = compiled_decode_step(model) if compiled else (lambda t, c: decode_step(model, t, c))
        for t in range(23, ids.shape[1]):
            logits, _ = step(ids[:, t:t + 1], cache)
            errors.append(np.abs(np.array(logits[0]) - full[t]).max())
        assert max(errors) <= 1e-4
        indexed = [c for c in cache if c.index_k is not None]
        assert len(indexed) == sum(model.config.has_indexer(i) for i in range(3)) and indexed[0].offset == 280


def test_kimi_k25_runs_its_language_model_and_names_the_vision_tower(tmp_path):
    """Kimi-K2.5 wraps a DeepSeek-V3 language model (`language_model.` tensors, `text_config`) with a vision
    tower: the text model loads with transformers' logits; the vision tower is left out, by name."""
    from dh_mlx.info import format_info, model_info
    text = {**SHAPES, "model_type": "kimi_k2", "n_group": 1, "topk_group": 1, "rope_parameters": ROPE}
    config = transformers.models.kimi_k25.Kimi_K25Config(
        text_config=text, vision_config=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2), projection_hidden_size=32,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = randomise(transformers.Kimi_K25ForConditionalGeneration(config))
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    ids = prompt()
    want = reference_logits(tmp_path, ids, transformers.Kimi_K25ForConditionalGeneration)
    with pytest.warns(UserWarning, match="vision tower and projector are not supported"):
        ours = load_model(tmp_path, dtype="float32")
    assert np.abs(np.array(ours(mx.array(ids))) - want).max() <= 1e-4
    assert "vision tower      not supported" in format_info(model_info(load_config(tmp_path)), "k25")


def test_an_fp8_v32_release_loads_as_the_weights_it_stands_for(tmp_path):
    """V3.2 ships FP8 blocks, the indexer's wq_b and wk included (weights_proj in bf16)."""
    from helpers import make_fp8
    fp8, deq, _ = make_fp8(release(tmp_path / "bf16", "deepseek_v32"), tmp_path / "fp8", tmp_path / "deq")
    header = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.self_attn.indexer.wq_b.weight_scale_inv" in header
    ids = mx.array(prompt())
    a, b = load_model(fp8, dtype="float32")(ids), load_model(deq, dtype="float32")(ids)
    assert mx.abs(a - b).max().item() <= 1e-5


def test_info_counts_the_indexer_and_its_key_cache(tmp_path):
    from mlx.utils import tree_flatten
    from dh_mlx.info import model_info
    from dh_mlx.params import count_params
    model = load_model(release(tmp_path, "glm_moe_dsa_shared"), dtype="float32")
    c = model.config
    assert count_params(c).total == sum(v.size for _, v in tree_flatten(model.parameters()))
    info = model_info(c)
    # per layer the latent and the RoPE key (32 + 8), and in the two layers with an indexer its key (16)
    assert info["kv_bytes_per_token"] == 2 * (3 * (32 + 8) + 2 * 16) and info["indexer_kv_bytes_per_token"] == 64
    assert info["sparse_attention"] == {"index_topk": 5, "index_n_heads": 16, "index_head_dim": 16,
                                        "layers_with_indexer": 2}


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa", "glm4_moe_lite"])
def test_convert_mlx_loads_in_mlx_lm_with_our_logits(tmp_path, name):
    """`convert mlx` (4-bit): mlx-lm's deepseek_v32 / glm_moe_dsa / glm4_moe_lite load the directory and give our
    logits (mlx-lm's glm4_moe_lite normalises the query and latent with rms_norm_eps, transformers with 1e-6:
    a few 1e-5 apart on these weights)."""
    from pathlib import Path
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from dh_mlx.convert.mlx import quantize
    quantize(release(tmp_path / "src", name), tmp_path / "mlx", bits=4, group_size=32, dtype="float32", mtp=False)
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["model_type"] == FAMILIES[name]["model_type"] and config["quantization"]["bits"] == 4
    ours = load_model(tmp_path / "mlx", dtype="float32")
    theirs, _ = mlx_lm_utils.load_model(Path(tmp_path / "mlx"))
    ids = mx.array(prompt())
    assert mx.abs(ours(ids) - theirs(ids)).max().item() <= 1e-4


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa_shared", "glm4_moe_lite"])
def test_convert_hf_round_trip(tmp_path, name):
    """`convert hf` writes the family under its own model_type: transformers loads it with our logits, and so
    do we."""
    from dh_mlx.convert import export_hf
    src = release(tmp_path / "src", name)
    export_hf(src, tmp_path / "hf", dtype="float32")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == FAMILIES[name]["model_type"]
    ids = prompt()
    ours = np.array(load_model(src, dtype="float32")(mx.array(ids)))
    assert np.abs(ours - reference_logits(tmp_path / "hf", ids)).max() <= 1e-4
    assert np.array_equal(ours, np.array(load_model(tmp_path / "hf", dtype="float32")(mx.array(ids))))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa_shared"])
def test_lora_and_qlora_lower_the_loss(tmp_path, name):
    """LoRA on the float release and QLoRA (`--bits 4` as it loads) on a sparse-attention model, gradient
    checkpointing on for the shared-selection one."""
    from dh_mlx.checkpoint.weights import copy_tokenizer
    from dh_mlx.train.lora_run import lora
    from helpers import model_with_tokenizer
    (tmp_path / "tok").mkdir()
    tok_dir = model_with_tokenizer(tmp_path / "tok")
    src = release(tmp_path / "src", name, vocab_size=400, index_topk=12)
    copy_tokenizer(tok_dir, src)
    for bits in (None, 4):
        result = lora(model=src, data=tmp_path / "tok" / "data.jsonl", out=tmp_path / f"run{bits}", rank=4,
                      steps=12, batch_size=4, seq_len=32, eval_every=12, lr=1e-2, progress=False, bits=bits,
                      group_size=32, grad_checkpointing=name.endswith("shared"))
        assert result.val_loss < result.val_loss_before - 0.05


def test_generate_with_bits_and_mtp_on_a_v32_model(tmp_path):
    """A V3.2 model with its MTP layer (an indexer of its own): `--bits 4` generation runs, and MTP
    speculative decoding gives the same greedy tokens as plain decoding, past index_topk positions."""
    from dh_mlx import random_model, save_model
    from dh_mlx.config import ModelConfig
    from dh_mlx.generation import generate_tokens
    from dh_mlx.generation.speculative import DraftPolicy
    from helpers import BASE
    config = ModelConfig(**{**BASE, "model_type": "deepseek_v32", **DSA})
    save_model(random_model(config, seed=3, dtype="float32"), tmp_path)
    model = load_model(tmp_path, dtype="float32")
    assert "indexer" in model.model.mtp_layers[0].self_attn
    ids = prompt(20, batch=1)[0].tolist()
    plain = list(generate_tokens(model, ids, max_tokens=24, mtp=False))
    drafted = list(generate_tokens(model, ids, max_tokens=24, mtp=DraftPolicy(adaptive=False)))
    assert plain == drafted and len(plain) == 24
    quantized = load_model(tmp_path, bits=4, group_size=32)
    assert len(list(generate_tokens(quantized, ids, max_tokens=8))) == 8


_V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
           num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
           routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
           qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
           num_nextn_predict_layers=1, max_position_embeddings=163840)
_GLM = dict(vocab_size=154880, n_shared_experts=1, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=256,
            qk_nope_head_dim=192, n_group=1, topk_group=1, num_nextn_predict_layers=1, max_position_embeddings=202752)
# The release shapes (their config.json keys), with what README's release table says of them.
RELEASES = {
    "DeepSeek-V3.2-Exp, V3.2": ({**_V3, "model_type": "deepseek_v32", "index_topk": 2048, "index_head_dim": 128,
                                 "index_n_heads": 64}, "672 B", "359 GiB"),
    "GLM-5": ({**_GLM, "model_type": "glm_moe_dsa", "hidden_size": 6144, "intermediate_size": 12288,
               "moe_intermediate_size": 2048, "num_hidden_layers": 78, "num_attention_heads": 64, "q_lora_rank": 2048,
               "n_routed_experts": 256, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "index_topk": 2048,
               "index_head_dim": 128, "index_n_heads": 32}, "744 B", "395 GiB"),
    "GLM-4.7-Flash": ({**_GLM, "model_type": "glm4_moe_lite", "hidden_size": 2048, "intermediate_size": 10240,
                       "moe_intermediate_size": 1536, "num_hidden_layers": 47, "num_attention_heads": 20,
                       "q_lora_rank": 768, "n_routed_experts": 64, "num_experts_per_tok": 4,
                       "first_k_dense_replace": 1}, "30 B", "16.2 GiB"),
    "Kimi-K2.5": ({"model_type": "kimi_k25", "tie_word_embeddings": False, "vision_config": {"hidden_size": 1152},
                   "text_config": {**_V3, "model_type": "kimi_k2", "vocab_size": 163840, "num_attention_heads": 64,
                                   "n_routed_experts": 384, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                                   "num_nextn_predict_layers": 0}}, "1.03 T", "538 GiB"),
}


@pytest.mark.parametrize("name", list(RELEASES))
def test_the_readme_release_table_is_dh_mlx_info_of_the_release_shapes(tmp_path, name):
    """The parameters and 4-bit size README gives each release are `dh-mlx info`'s for its shapes; the memory
    guard refuses the release here, before a weight is read, naming what it needs."""
    from pathlib import Path
    from dh_mlx.config import REPO_DIR
    from dh_mlx.info import model_info
    d, total, four_bit = RELEASES[name]
    (tmp_path / "config.json").write_text(json.dumps(d))
    info = model_info(load_config(tmp_path))
    n = info["total_params"]
    assert (f"{n / 1e12:.2f} T" if n >= 1e12 else f"{n / 1e9:.0f} B") == total
    assert f"{info['weight_bytes']['4-bit'] / 2**30:.{1 if four_bit.startswith('16') else 0}f} GiB" == four_bit
    row = [line for line in Path(REPO_DIR / "README.md").read_text().splitlines() if line.startswith(f"| {name}")]
    assert len(row) == 1 and f"{total}" in row[0] and f"| {four_bit} |" in row[0]
    with pytest.raises(MemoryError, match=rf"{(n + info['mtp_params']) / 1e9:.2f} B parameters need"):
        load_model(tmp_path)


def test_the_indexer_is_in_the_parameter_count():
    from dh_mlx.config import ModelConfig
    from dh_mlx.params import count_params
    d = RELEASES["DeepSeek-V3.2-Exp, V3.2"][0]
    v32, v3 = ModelConfig.from_dict(d), ModelConfig.from_dict({**d, "model_type": "deepseek_v3"})
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64  # wq_b, wk, k_norm, weights_proj
    assert count_params(v32).total - count_params(v3).total == 61 * per_layer
    assert count_params(v32).mtp - count_params(v3).mtp == per_layer  # the MTP layer has its own indexer


def test_the_cpu_backend_gives_the_reference_path_s_numbers(tmp_path):
    """The CPU implementations (attention under the selection mask, absorbed decode over the gathered positions,
    rope on the indexer's rotary dims) equal the plain-MLX reference operations on a sparse-attention model."""
    from dh_mlx import ops
    from dh_mlx.generation.cache import make_cache
    from dh_mlx.generation.steps import decode_step, prefill
    model = load_model(release(tmp_path, "deepseek_v32"), dtype="float32")
    assert ops.registered()  # the backend is on
    ids = mx.array(prompt(40, batch=2, seed=2))

    def run():
        cache = make_cache(model.config)
        prefill(model, ids[:, :30], cache, step_size=11)
        steps = [decode_step(model, ids[:, t:t + 1], cache)[0] for t in range(30, 40)]
        return np.array(model(ids)), np.array(mx.stack(steps))

    fast = run()
    with ops.reference_only():
        reference = run()
    for a, b in zip(fast, reference):
        assert np.abs(a - b).max() <= 1e-5
    assert np.abs(fast[1] - fast[0][:, 30:].transpose(1, 0, 2)).max() <= 1e-4  # batch-2 gather path too
