"""The DeepSeek-family layouts a `config.json` may name, and what each changes in DeepSeek-V3's (plain dicts).

- `deepseek_v2`: softmax routing defaults; written back as itself when it routes by softmax, else as V3.
- `kimi_k2`: nothing (one expert group); written back as `deepseek_v3`.
- `kimi_k25`: a multimodal wrapper, the text model's config under `text_config` and its tensors under
  `language_model.`; written back as `deepseek_v3` (the text model; the vision tower is not supported).
- `glm4_moe_lite`: dense/MoE layers by `mlp_layer_types`; kept.
- `deepseek_v32`: a lightning indexer per layer (`index_*`), DeepSeek Sparse Attention; kept.
- `glm_moe_dsa`: V3.2's indexer with interleaved RoPE, and layers reusing the previous layer's selection
  (`indexer_types`); kept.

Each family's defaults for keys its config.json may leave out are transformers' (the numerical reference).
"""

from __future__ import annotations

from typing import Any

MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2", "kimi_k25", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa")
SPARSE_ATTENTION = ("deepseek_v32", "glm_moe_dsa")  # DeepSeek Sparse Attention: a lightning indexer per layer
KEPT = ("glm4_moe_lite", "deepseek_v32", "glm_moe_dsa")  # written back under their own model_type
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                 "glm4_moe_lite": "Glm4MoeLiteForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
                 "glm_moe_dsa": "GlmMoeDsaForCausalLM"}
# A multimodal wrapper: the key prefix of its language model's tensors (what follows is DeepSeek-V3's names).
TEXT_PREFIX = {"kimi_k25": "language_model."}
_DEFAULTS = {  # transformers' config-class defaults for keys a release may leave out
    "deepseek_v32": {"index_topk": 2048, "index_head_dim": 128, "index_n_heads": 64, "first_k_dense_replace": 3},
    "glm_moe_dsa": {"index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32, "first_k_dense_replace": 3,
                    "rms_norm_eps": 1e-5},
    "glm4_moe_lite": {"rms_norm_eps": 1e-5},
}


def _error(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"config field '{name}' must be {allowed}, got {value!r}")


def normalize(d: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict of any family as ModelConfig's keys: the text model of a multimodal wrapper lifted to
    the top, the family's defaults filled in, its per-layer schedules spelled out as transformers derives them."""
    kind = d.get("model_type", "deepseek_v3")
    if kind == "deepseek_v4":
        raise ValueError("config field 'model_type': deepseek_v4 is DeepSeek-V4's own architecture "
                         "(config_v4.V4Config, which load_config reads), not a DeepSeek-V3 family member")
    if kind not in MODEL_TYPES:  # (deepseek_v4 is read by config_v4)
        raise _error("model_type", f"one of {', '.join(MODEL_TYPES + ('deepseek_v4',))}", kind)
    d = dict(d)
    if kind == "kimi_k25":
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise _error("text_config", "an object (the language model's config)", text)
        top = {k: d[k] for k in ("tie_word_embeddings", "quantization_config", "quantization") if k in d}
        d = {**text, **top, "model_type": "kimi_k25"}  # the vision tower's keys are not kept
    for key, value in _DEFAULTS.get(kind, {}).items():
        d.setdefault(key, value)
    n = d.get("num_hidden_layers")
    if kind in SPARSE_ATTENTION:
        d["rope_interleave"] = True  # transformers' V3.2 and GLM-5 attention always interleave
    if kind == "glm4_moe_lite" and d.get("mlp_layer_types") is None and isinstance(n, int):
        d["mlp_layer_types"] = ["dense"] + ["sparse"] * (n - 1)  # transformers' default: first layer dense
    if kind == "glm_moe_dsa" and d.get("indexer_types") is None and isinstance(n, int) and 0 < n <= 1024:
        pattern = d.get("index_topk_pattern")
        if isinstance(pattern, str):
            d["indexer_types"] = [{"F": "full", "S": "shared"}.get(c, c) for c in pattern]
        elif isinstance(pattern, list):
            d["indexer_types"] = pattern
        else:
            freq, offset = max(d.get("index_topk_freq", 1), 1), d.get("index_skip_topk_offset", 2)
            d["indexer_types"] = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    return d


def written_type(model_type: str, softmax_routing: bool) -> str:
    """The model_type a config is written back under (what transformers, vLLM and mlx-lm know it by)."""
    if model_type in KEPT:
        return model_type
    return "deepseek_v2" if softmax_routing else "deepseek_v3"


def check_schedules(c: Any) -> None:
    """`mlp_layer_types` and `indexer_types` (lists over the main stack), and the indexer's shapes."""
    n = c.num_hidden_layers
    for name, allowed in (("mlp_layer_types", ("dense", "sparse")), ("indexer_types", ("full", "shared"))):
        v = getattr(c, name)
        if v is not None and not (isinstance(v, list) and len(v) == n and all(t in allowed for t in v)):
            raise _error(name, f"a list of {n} entries, each {' or '.join(allowed)}", v)
    if c.mlp_layer_types is not None and "sparse" in c.mlp_layer_types and c.n_routed_experts is None:
        raise _error("mlp_layer_types", "all 'dense' for a model without routed experts", c.mlp_layer_types)
    if c.model_type not in SPARSE_ATTENTION:
        return
    for name in ("index_topk", "index_head_dim", "index_n_heads"):
        v = getattr(c, name)
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 20):
            raise _error(name, "an integer >= 1", v)
    if c.index_head_dim < c.qk_rope_head_dim:
        raise _error("index_head_dim", f"at least qk_rope_head_dim ({c.qk_rope_head_dim}; its first dims take "
                     "RoPE)", c.index_head_dim)
    if c.q_lora_rank is None:
        raise _error("q_lora_rank", "an integer (the indexer's queries start from the query latent)", None)
    if c.indexer_types is not None and c.indexer_types[0] != "full":
        raise _error("indexer_types", "a list whose first entry is 'full' (a shared layer reuses an earlier "
                     "layer's selection)", c.indexer_types)
