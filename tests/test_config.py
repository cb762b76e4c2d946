"""Config validation, key round trips, presets and parameter arithmetic."""

import json

import pytest
from mlx.utils import tree_flatten

from dh_mlx import Model, ModelConfig, load_preset
from dh_mlx.config import load_config, preset_names
from dh_mlx.params import count_params, kv_bytes_per_token


@pytest.mark.parametrize("field,value,needle", [
    ("scoring_func", "relu", "scoring_func"),
    ("topk_method", "topk", "topk_method"),
    ("n_group", 3, "n_group"),
    ("topk_group", 8, "topk_group"),
    ("num_experts_per_tok", 40, "num_experts_per_tok"),
    ("hidden_size", 0, "hidden_size"),
    ("q_lora_rank", -4, "q_lora_rank"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim"),
    ("num_key_value_heads", 2, "num_key_value_heads"),
    ("rope_scaling", {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}, "rope_scaling.factor"),
    ("rope_scaling", {"type": "dynamic"}, "rope_scaling.rope_type"),
    ("domain_routing", {"domains": ["a", "b"], "experts_per_domain": 9}, "experts_per_domain"),
    ("domain_routing", {"domains": ["a", "a"], "experts_per_domain": 1}, "unique"),
    ("first_k_dense_replace", 99, "first_k_dense_replace"),
])
def test_invalid_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**{"n_routed_experts": 16, "n_group": 4, "topk_group": 2, field: value})


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    d = ModelConfig().to_dict()
    d["my_custom_flag"] = {"x": 1}
    d["torch_dtype"] = "bfloat16"
    c = ModelConfig.from_dict(d)
    assert c.extra == {"my_custom_flag": {"x": 1}, "torch_dtype": "bfloat16"}
    out = c.to_dict()
    assert out["my_custom_flag"] == {"x": 1} and out["model_type"] == "deepseek_v3"


def test_transformers5_rope_parameters_are_understood():
    c = ModelConfig.from_dict({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e4, "factor": 4.0,
                                                   "original_max_position_embeddings": 128}, "num_mtp_layers": 2})
    assert c.rope_theta == 5e4 and c.rope_type == "yarn" and c.rope_scaling["factor"] == 4.0
    assert c.num_nextn_predict_layers == 2
    plain = ModelConfig.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="config.json: no such file"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{\n  'bad': 1\n}")
    with pytest.raises(ValueError, match=r"config.json:2: invalid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**ModelConfig().to_dict(), "scoring_func": "tanh"}))
    with pytest.raises(ValueError, match="config.json: config field 'scoring_func'"):
        load_config(tmp_path)


SIZES = {"1b": 1e9, "5b": 5e9, "30b": 30e9, "500b": 500e9}


def test_presets_match_their_names():
    assert {"tiny", *SIZES} <= set(preset_names())
    for name, size in SIZES.items():
        c = load_preset(name)
        p = count_params(c)
        assert 0.9 * size <= p.total <= 1.1 * size, (name, p.total)
        assert c.max_position_embeddings >= 131072 and c.rope_type == "yarn"
    five = load_preset("5b")
    assert five.n_routed_experts == 64 and 1.0e9 <= count_params(five).active <= 1.4e9
    for name in preset_names():
        c = load_preset(name)
        assert c.num_nextn_predict_layers == 1 and c.domain_routing is not None
        assert len(c.domain_routing.domains) == 10 and {"code", "math", "legal"} <= set(c.domain_routing.domains)
    assert load_preset("tiny").hidden_size == 512  # the seed's 512-hidden default profile


def test_counts_equal_instantiated_arrays_for_tiny():
    c = load_preset("tiny")
    model = Model(c)  # lazily initialised arrays: shapes only, nothing computed
    flat = dict(tree_flatten(model.parameters()))
    n = c.num_hidden_layers
    main = sum(v.size for k, v in flat.items() if not any(k.startswith(f"model.layers.{n + i}.")
                                                          for i in range(c.num_nextn_predict_layers)))
    p = count_params(c)
    assert main == p.total
    assert sum(v.size for v in flat.values()) == p.total + p.mtp
    # active = total minus the routed experts a token does not use
    moe_layers = sum(c.is_moe_layer(i) for i in range(n))
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    assert p.total - p.active == moe_layers * per_expert * (c.n_routed_experts - c.num_experts_per_tok)


def test_kv_bytes_formula():
    c = load_preset("5b")
    assert kv_bytes_per_token(c, 2) == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_has_an_mla_head_vllm_serves(name):
    """vLLM's MLA kernels take heads (kv_lora_rank + qk_rope_head_dim) of 576, 512 and 320 (CPU), 576 (FlashMLA)."""
    from dh_mlx.convert.hf import VLLM_MLA_HEADS
    c = load_preset(name)
    assert c.kv_lora_rank + c.qk_rope_head_dim in VLLM_MLA_HEADS
