"""The same checkpoint directory gives the same logits in ours, transformers and mlx-lm (float32, CPU)."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import load_model, save_model
from helpers import CONFIGS, make_checkpoint, make_config, tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
TOL = 1e-4


def transformers_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def as_deepseek_v2(path, out):
    """transformers' DeepSeek-V3 is sigmoid-only; its DeepSeek-V2 (same tensor names) is the softmax reference."""
    shutil.copytree(path, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"])
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_parity(tmp_path, name):
    ours = make_checkpoint(tmp_path / "ckpt", name)
    ids = tokens()
    path = tmp_path / "ckpt"
    if make_config(name).scoring_func == "softmax":
        path = as_deepseek_v2(path, tmp_path / "v2")
    ref = transformers_logits(path, ids)
    got = np.array(ours(mx.array(ids)))
    assert np.abs(got - ref).max() <= TOL
    assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero tensors


def test_mtp_checkpoint_layout_and_transformers_ignores_it(tmp_path):
    make_checkpoint(tmp_path, num_nextn_predict_layers=1)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        keys = set(f.keys())
    n = make_config().num_hidden_layers
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.0.gate_proj.weight",
                 "mlp.gate.e_score_correction_bias", "self_attn.kv_b_proj.weight"):
        assert f"model.layers.{n}.{name}" in keys
    assert transformers_logits(tmp_path, tokens()).shape == (2, 12, 97)


@pytest.mark.parametrize("name", [n for n in CONFIGS if make_config(n).scoring_func == "sigmoid"])
def test_mlx_lm_parity(tmp_path, name):
    if make_config(name).num_experts_per_tok == 1:
        pytest.skip("mlx-lm skips renormalising a single expert's weight; transformers (the reference) does it")
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    ours = make_checkpoint(tmp_path / "ckpt", name)
    save_model(ours, tmp_path / "no_mtp", mtp=False)  # mlx-lm refuses MTP layers at any index but 61
    ref_model, _ = mlx_lm_utils.load_model(tmp_path / "no_mtp")
    ids = mx.array(tokens())
    assert mx.abs(ours(ids) - ref_model(ids)).max().item() <= TOL


def test_config_saved_by_transformers5_loads(tmp_path):
    """transformers 5 writes `rope_parameters` (and drops the MTP tensors); we must still agree."""
    ours = make_checkpoint(tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf5")
    cfg = json.loads((tmp_path / "hf5" / "config.json").read_text())
    assert "rope_parameters" in cfg and cfg["rope_parameters"]["rope_type"] == "yarn"
    with pytest.warns(UserWarning, match="MTP"):
        reloaded = load_model(tmp_path / "hf5")
    ids = mx.array(tokens())
    assert mx.abs(reloaded(ids) - ours(ids)).max().item() <= TOL


def test_legacy_rope_scaling_config_loads(tmp_path):
    """Older releases write `rope_theta` + `rope_scaling` with `type`: the form we write ourselves."""
    make_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_scaling"]["type"] == "yarn" and "rope_parameters" not in cfg and "rope_theta" in cfg
