"""DeepSeek-V4's configuration (`model_type: deepseek_v4`, V4-Flash and V4-Pro): transformers' DeepseekV4Config
keys, validated, with the release's older keys folded in as transformers folds them.

V4 is not DeepSeek-V3 with changes: attention is multi-query (one 512-wide key that is also the value) over a
sliding window plus compressed entries (CSA: every `compress_rates[csa]` tokens, chosen per query by a lightning
indexer; HCA: every `compress_rates[hca]` tokens, all visible), the residual is `hc_mult` streams mixed by
hyper-connections, and the first MoE layers route by a token-id table. Keys we do not model are kept in `extra`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_TYPES = ("hash_moe", "moe")
_RATIO_TO_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
_SCORING = ("sqrtsoftplus", "softmax", "sigmoid")
_DERIVED = ("architectures", "model_type", "qk_rope_head_dim", "intermediate_size")
# Upper bounds checked before anything is built from a size (a hostile config.json cannot make us allocate).
LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "moe_intermediate_size": 1 << 20, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "head_dim": 4096, "q_lora_rank": 1 << 16, "num_experts_per_tok": 1 << 10,
          "n_routed_experts": 1 << 14, "hc_mult": 64, "hc_sinkhorn_iters": 1000, "sliding_window": 1 << 20,
          "o_groups": 1024, "o_lora_rank": 1 << 16, "index_n_heads": 1024, "index_head_dim": 4096,
          "index_topk": 1 << 20, "max_position_embeddings": 1 << 24}
REQUIRED = ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "hc_mult")


def _error(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"config field '{name}' must be {allowed}, got {value!r}")


@dataclass
class V4Config:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    layer_types: list[str] | None = None
    compress_rates: dict | None = None
    compress_rope_theta: float = 160000.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: list[str] | None = None
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    mtp_layer_types: list[str] | None = None  # the MTP modules' attention (DeepSeek's: sliding window only)
    mtp_mlp_layer_types: list[str] | None = None
    rms_norm_eps: float = 1e-6
    partial_rotary_factor: float | None = None
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "deepseek_v4"
    sparse_attention = False  # (V3.2's indexer over the latent cache; V4's indexer is over compressed entries)
    domain_routing = None
    has_moe = True  # every layer

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        for name, top in LIMITS.items():
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top):
                raise _error(name, f"an integer from 1 to {top}", v)
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise _error(name, "true or false", getattr(self, name))
        if self.num_key_value_heads != 1:
            raise _error("num_key_value_heads", "1 (V4 attends through one shared key/value head)",
                         self.num_key_value_heads)
        if self.scoring_func not in _SCORING:
            raise _error("scoring_func", f"one of {_SCORING}", self.scoring_func)
        if self.num_experts_per_tok > self.n_routed_experts:
            raise _error("num_experts_per_tok", f"at most n_routed_experts ({self.n_routed_experts})",
                         self.num_experts_per_tok)
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise _error("o_groups", "a divisor of num_attention_heads * head_dim", self.o_groups)
        for name in ("rms_norm_eps", "hc_eps", "rope_theta", "compress_rope_theta", "routed_scaling_factor",
                     "swiglu_limit"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)):
                raise _error(name, "a positive number", v)
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(self.compress_rates or {})}
        if not all(isinstance(r, int) and r >= 1 for r in rates.values()):
            raise _error("compress_rates", "an object of integers >= 1", self.compress_rates)
        self.compress_rates = rates
        if self.layer_types is None:  # transformers' default: V4-Pro's 2 x HCA, then CSA / HCA alternating
            self.layer_types = (["heavily_compressed_attention"] * min(n, 2)
                                + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                                   for i in range(max(n - 2, 0))])
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)
        k = self.num_nextn_predict_layers
        if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= 16):
            raise _error("num_nextn_predict_layers", "an integer from 0 to 16", k)
        for name, allowed, default in (("layer_types", LAYER_TYPES, "sliding_attention"),
                                       ("mlp_layer_types", MLP_TYPES, "moe")):
            v = getattr(self, name)
            if not (isinstance(v, list) and len(v) >= n and all(t in allowed for t in v[:n])):
                raise _error(name, f"a list of {n} entries from {allowed}", v)
            # the MTP modules': given, or the entries past the main stack's (DeepSeek's compress_ratios lists
            # the MTP layer's too), else DeepSeek's choice (a sliding-window, top-k routed block)
            mtp = getattr(self, "mtp_" + name)
            mtp = list(v[n:]) if mtp is None else mtp
            if not (isinstance(mtp, list) and all(t in allowed for t in mtp)):
                raise _error("mtp_" + name, f"a list of entries from {allowed}", mtp)
            setattr(self, "mtp_" + name, (mtp + [default] * k)[:k])
            setattr(self, name, list(v[:n]))
        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = 64 / 512
        rd = self.qk_rope_head_dim
        if not (0 < rd <= self.head_dim and rd % 2 == 0) or rd > self.index_head_dim:
            raise _error("partial_rotary_factor", f"a fraction of head_dim ({self.head_dim}) giving an even number "
                         f"of rotary dims, at most index_head_dim", self.partial_rotary_factor)
        self.rope_parameters = self._rope_parameters()

    def _rope_parameters(self) -> dict:
        """{"main": sliding layers' rope, "compress": the compressed layers' (YaRN without its cos/sin factor)}."""
        rp = dict(self.rope_parameters or {})
        if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            return {"main": dict(rp["main"]), "compress": dict(rp["compress"])}
        scaling = {k: v for k, v in rp.items() if k not in ("main", "compress", "rope_theta")}
        compress = {**scaling, "rope_theta": self.compress_rope_theta}
        kind = compress.pop("type", None) or compress.get("rope_type", "default")
        compress["rope_type"] = kind
        if kind == "yarn":
            compress.setdefault("attention_factor", 1.0)  # the V4 reference does not scale cos/sin
        elif kind != "default":
            raise _error("rope_parameters.rope_type", "'default' or 'yarn'", kind)
        return {"main": {"rope_type": "default", "rope_theta": self.rope_theta}, "compress": compress}

    # ---- derived --------------------------------------------------------------------------------------------
    @property
    def qk_rope_head_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_type(self, layer_idx: int) -> str:
        """The attention of layer `layer_idx`; past the main stack, of MTP module layer_idx - num_hidden_layers."""
        n = self.num_hidden_layers
        return self.layer_types[layer_idx] if layer_idx < n else self.mtp_layer_types[layer_idx - n]

    def mlp_layer_type(self, layer_idx: int) -> str:
        n = self.num_hidden_layers
        return self.mlp_layer_types[layer_idx] if layer_idx < n else self.mtp_mlp_layer_types[layer_idx - n]

    def compress_rate(self, layer_idx: int) -> int:
        """Source tokens per compressed entry (0: a sliding-window layer only)."""
        kind = self.layer_type(layer_idx)
        return 0 if kind == "sliding_attention" else self.compress_rates[kind]

    def rope_config(self, kind: str) -> Any:
        """What dh_mlx.rope.rope_parameters reads, for the "main" or "compress" rope."""
        p = self.rope_parameters[kind]
        scaling = None if p["rope_type"] == "default" else {k: v for k, v in p.items() if k != "rope_theta"}
        return _Rope(self.qk_rope_head_dim, float(p["rope_theta"]), p["rope_type"], scaling)

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = False) -> "V4Config":
        d = dict(d)
        if strict:
            missing = [k for k in REQUIRED if k not in d]
            if missing:
                raise ValueError(f"config field '{missing[0]}' is missing (a config.json must state every shape: "
                                 f"{', '.join(REQUIRED)})")
        # the release's keys, as transformers folds them
        ratios = d.pop("compress_ratios", None)
        if d.get("layer_types") is None and isinstance(ratios, list):
            if not all(r in _RATIO_TO_TYPE for r in ratios):
                raise _error("compress_ratios", f"a list of {sorted(_RATIO_TO_TYPE)}", ratios)
            d["layer_types"] = [_RATIO_TO_TYPE[r] for r in ratios]
        rates = dict(d.get("compress_rates") or {})
        for key, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                          ("compress_rate_hca", "heavily_compressed_attention")):
            if key in d:
                rates[kind] = d.pop(key)
        d["compress_rates"] = rates or None
        hashed = d.pop("num_hash_layers", None)
        if d.get("mlp_layer_types") is None and isinstance(hashed, int) and isinstance(d.get("num_hidden_layers"), int):
            n = d["num_hidden_layers"]
            d["mlp_layer_types"] = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
        rope_dim = d.pop("qk_rope_head_dim", None)
        if d.get("partial_rotary_factor") is None and isinstance(rope_dim, int) and d.get("head_dim"):
            d["partial_rotary_factor"] = rope_dim / d["head_dim"]
        if d.get("rope_parameters") is None and isinstance(d.get("rope_scaling"), dict):
            d["rope_parameters"] = d.pop("rope_scaling")
        if isinstance(d.get("rope_parameters"), dict) and "rope_theta" in d["rope_parameters"] \
                and "main" not in d["rope_parameters"]:
            d.setdefault("rope_theta", d["rope_parameters"]["rope_theta"])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _DERIVED}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
               **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}}
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    def replace(self, **changes: Any) -> "V4Config":
        return V4Config.from_dict({**self.to_dict(), **changes})


def refuse(config: Any, what: str) -> None:
    """A one-line refusal of `what` (a command or operation of the DeepSeek-V3 family) for a V4 config."""
    if getattr(config, "model_type", None) == "deepseek_v4":
        raise ValueError(f"{what} does not take deepseek_v4 models (dh-mlx runs them: generate, chat, info, "
                         "quantize / convert mlx, quantized on load, convert hf, lora, fuse)")


@dataclass(frozen=True)
class _Rope:
    qk_rope_head_dim: int
    rope_theta: float
    rope_type: str
    rope_scaling: dict | None
