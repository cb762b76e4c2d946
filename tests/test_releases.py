"""Checkpoints in the layouts the DeepSeek-family releases are published in (config keys as released, sharded
bf16 safetensors with an index): our logits equal transformers' (float32 compute)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import load_model
from helpers import CASES, release, tokens

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("case", list(CASES))
def test_release_layouts_give_transformers_logits(tmp_path, case):
    path = release(tmp_path, **CASES[case])
    ids = tokens()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    ours = load_model(path, dtype="float32")
    if case == "v2_lite":  # the keys it leaves out mean transformers' DeepseekV2Config defaults
        c = ours.config
        assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor, c.n_group) == (
            "softmax", "greedy", False, 1.0, 1)
    assert np.abs(np.array(ours(mx.array(ids))) - want).max() <= 1e-4


def test_a_v2_release_exports_as_v2_so_transformers_still_routes_by_softmax(tmp_path):
    from dh_mlx.convert import export_hf
    path = release(tmp_path / "src", **CASES["v2_lite"])
    export_hf(path, tmp_path / "hf", dtype="float32")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and config["architectures"] == ["DeepseekV2ForCausalLM"]
    ids = tokens()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.array(load_model(path, dtype="float32")(mx.array(ids))) - want).max() <= 1e-4


@pytest.mark.slow
def test_qlora_on_a_v3_release_lowers_its_loss(tmp_path):
    """A V3 release (bf16 shards as published) quantized to 4 bits, then LoRA adapters trained on it."""
    from dh_mlx.convert.mlx import quantize
    from dh_mlx.checkpoint.weights import copy_tokenizer
    from dh_mlx.train.lora_run import lora
    from helpers import model_with_tokenizer
    (tmp_path / "tok").mkdir()
    tok_dir = model_with_tokenizer(tmp_path / "tok")
    path = release(tmp_path / "src", **{**CASES["v3_bf16"], "overrides": {"vocab_size": 400}})
    copy_tokenizer(tok_dir, path)
    quantize(path, tmp_path / "q4", bits=4, group_size=32)
    result = lora(model=tmp_path / "q4", data=tmp_path / "tok" / "data.jsonl", out=tmp_path / "run", rank=4,
                  steps=12, batch_size=4, seq_len=32, eval_every=12, lr=1e-2, progress=False)
    assert result.val_loss < result.val_loss_before - 0.05


@pytest.mark.slow
def test_lora_and_qlora_straight_from_an_fp8_release_lower_its_loss(tmp_path):
    """FP8 blocks (as V3/R1 ship) read by `dh-mlx lora`: dequantized (LoRA) or quantized to 4 bits as they
    load (`--bits 4`, QLoRA without a quantized copy on disk)."""
    from dh_mlx.checkpoint.weights import copy_tokenizer
    from dh_mlx.train.lora_run import lora
    from helpers import make_fp8, model_with_tokenizer
    (tmp_path / "tok").mkdir()
    tok_dir = model_with_tokenizer(tmp_path / "tok")
    wide = dict(vocab_size=400, hidden_size=64, moe_intermediate_size=64, kv_lora_rank=64)
    bf16 = release(tmp_path / "bf16", **{**CASES["v3_bf16"], "overrides": wide})
    fp8 = make_fp8(bf16, tmp_path / "fp8", tmp_path / "deq")[0]
    copy_tokenizer(tok_dir, fp8)
    import dh_mlx.train.lora_run as lora_run
    from dh_mlx.quant import is_quantized
    loaded = []
    real = lora_run.load_model
    lora_run.load_model = lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1]
    for bits in (None, 4):
        result = lora(model=fp8, data=tmp_path / "tok" / "data.jsonl", out=tmp_path / f"run{bits}", rank=4,
                      steps=12, batch_size=4, seq_len=32, eval_every=12, lr=1e-2, progress=False, bits=bits,
                      group_size=32)
        assert result.val_loss < result.val_loss_before - 0.05
        config = json.loads((tmp_path / f"run{bits}" / "adapter_config.json").read_text())
        assert config.get("base_bits") == bits and is_quantized(loaded[-1]) == bool(bits)
    lora_run.load_model = real


def test_a_kimi_k2_layout_is_deepseek_v3_under_its_own_name(tmp_path):
    """Kimi-K2 (`model_type: kimi_k2`, DeepSeek-V3's architecture, one expert group) loads as the V3 model it
    is, whose logits equal transformers' (above), and is written back as deepseek_v3."""
    from dh_mlx.convert import export_hf
    overrides = dict(n_group=1, topk_group=1)
    kimi = release(tmp_path / "kimi", **{**CASES["v3_bf16"], "model_type": "kimi_k2", "overrides": overrides})
    v3 = release(tmp_path / "v3", **{**CASES["v3_bf16"], "overrides": overrides})
    ids = mx.array(tokens())
    assert mx.array_equal(load_model(kimi)(ids), load_model(v3)(ids)).item()
    export_hf(kimi, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "deepseek_v3"
