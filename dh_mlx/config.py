"""Model configuration: the Hugging Face DeepSeek-V3 `config.json`, validated, plus our domain-routing block.

Key names are exactly those of HF's `DeepseekV3Config`, so a `config.json` written here loads unchanged in
transformers, vLLM and mlx-lm, and one written by them (transformers 4 `rope_theta`/`rope_scaling` or
transformers 5 `rope_parameters`) loads here. Keys we do not model are kept in `extra` and written back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import families
from .files import read_json, write_atomic

_PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = _PACKAGE_DIR.parent


def _bundled(name: str) -> Path:
    """A folder of the repository's top level that the wheel also ships: inside the package when installed
    (`dh_mlx/_bundled/NAME`, put there by setup.py), at the top of the checkout otherwise."""
    inside = _PACKAGE_DIR / "_bundled" / name
    return inside if inside.is_dir() else REPO_DIR / name


PARAMETERS_DIR = _bundled("parameters")  # size presets
DATA_DIR = _bundled("data")  # bundled sample corpus and its tokenizer
DEFAULT_PRESET = "tiny"

_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
_SCORING = ("sigmoid", "softmax")
_ROPE_TYPES = ("default", "yarn")
# The HF layouts this model is (dh_mlx.families: what each changes); anything else is refused.
MODEL_TYPES = families.MODEL_TYPES
# DeepSeek-V2 routes by softmax with greedy top-k and unnormalised weights unless its config says otherwise.
_V2_DEFAULTS = {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
                "routed_scaling_factor": 1.0}
# Keys a config.json must give: the shapes (a missing one would silently take our default).
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# Hard upper bounds, checked before anything loops over or allocates by a size (a hostile config cannot hang us).
LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
          "num_hidden_layers": 1024, "num_attention_heads": 1024, "kv_lora_rank": 1 << 16, "q_lora_rank": 1 << 16,
          "qk_rope_head_dim": 4096, "qk_nope_head_dim": 4096, "v_head_dim": 4096, "n_routed_experts": 1 << 14,
          "n_shared_experts": 1 << 10, "num_experts_per_tok": 1 << 10, "n_group": 1 << 10, "topk_group": 1 << 10,
          "moe_layer_freq": 1024, "first_k_dense_replace": 1024, "num_nextn_predict_layers": 64,
          "max_position_embeddings": 1 << 24}
_BOOLS = ("norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings")
# Keys we write ourselves or derive; never carried through `extra`.
_DERIVED = ("rope_parameters", "architectures", "head_dim", "qk_head_dim", "num_mtp_layers")
# Fields of some families only: written only when set.
_OPTIONAL = ("index_topk", "index_head_dim", "index_n_heads", "indexer_types", "mlp_layer_types")


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"config field '{name}' must be {allowed}, got {value!r}")


@dataclass
class DomainRouting:
    """Domain-ID routing (our extension; absent means plain DeepSeek-V3).

    Domain `d` owns routed experts `[d*experts_per_domain, (d+1)*experts_per_domain)`; experts past
    `len(domains)*experts_per_domain` are common to every domain. A token given domain id `d` may only be
    routed to its domain's experts and the common ones (the domain mask replaces group-limited selection);
    a token with id -1 (or no `domain_ids` at all) is routed exactly as DeepSeek-V3 routes it.
    """

    domains: list[str]
    experts_per_domain: int
    # Domains added to a trained model (`dh-mlx domains add`): each owns experts_per_domain experts after the
    # common ones, used only by tokens with its id; tokens without one route among the others as before.
    added: list[str] = dataclasses.field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Every domain, in id order: the original ones, then the added."""
        return self.domains + self.added

    def base_experts(self, n_routed_experts: int) -> int:
        """The experts before the added domains' (those a token without a domain id may use)."""
        return n_routed_experts - len(self.added) * self.experts_per_domain

    def validate(self, n_routed_experts: int, top_k: int) -> None:
        _require(isinstance(self.domains, list) and len(self.domains) > 0
                 and all(isinstance(d, str) and d for d in self.domains),
                 "domain_routing.domains", "a non-empty list of names", self.domains)
        _require(len(set(self.domains)) == len(self.domains), "domain_routing.domains", "unique names",
                 self.domains)
        _require(isinstance(self.added, list) and all(isinstance(d, str) and d for d in self.added)
                 and len(set(self.names)) == len(self.names), "domain_routing.added",
                 "a list of names, none of them in domains", self.added)
        k = self.experts_per_domain
        _require(isinstance(k, int) and k >= 1, "domain_routing.experts_per_domain", "an integer >= 1", k)
        n_routed_experts = self.base_experts(n_routed_experts)
        owned = len(self.domains) * k
        _require(owned <= n_routed_experts, "domain_routing.experts_per_domain",
                 f"at most n_routed_experts / len(domains) = {n_routed_experts // len(self.domains)}", k)
        _require(k + n_routed_experts - owned >= top_k, "domain_routing.experts_per_domain",
                 f"large enough that each domain can choose num_experts_per_tok={top_k} experts "
                 f"(its own plus {n_routed_experts - owned} common)", k)

    def table(self, n_routed_experts: int) -> list[list[bool]]:
        """The experts a token may choose from, by its domain id d: row 0 for d = -1 (no id: the base experts,
        within the router's best groups), row d + 1 for domain d (its own block and the common experts,
        whatever the groups). The one rule the MLX router, its CPU kernel and the PyTorch twin apply."""
        base = self.base_experts(n_routed_experts)
        return [[e < base for e in range(n_routed_experts)]] + self.allowed(n_routed_experts)

    def allowed(self, n_routed_experts: int) -> list[list[bool]]:
        """Row d: which experts domain d may use (its own block and the common ones)."""
        k, owned, base = self.experts_per_domain, len(self.domains) * self.experts_per_domain, \
            self.base_experts(n_routed_experts)
        common = [owned <= e < base for e in range(n_routed_experts)]
        starts = [d * k for d in range(len(self.domains))] + [base + i * k for i in range(len(self.added))]
        return [[s <= e < s + k or common[e] for e in range(n_routed_experts)] for s in starts]

    def domain_id(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"unknown domain {name!r}; this model's domains are {', '.join(self.names)}")
        return self.names.index(name)


@dataclass
class ModelConfig:
    """DeepSeek-V3 hyper-parameters under their HF `config.json` names."""

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    moe_intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 16
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 128
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    qk_nope_head_dim: int = 64
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 2
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    domain_routing: DomainRouting | None = None
    model_type: str = "deepseek_v3"  # the family (dh_mlx.families)
    mlp_layer_types: list[str] | None = None  # "dense"/"sparse" per layer; None: first_k_dense_replace's rule
    index_topk: int | None = None  # DeepSeek Sparse Attention: positions each query attends to
    index_head_dim: int | None = None
    index_n_heads: int | None = None
    indexer_types: list[str] | None = None  # "full" (own indexer) / "shared" (the previous selection); None: full
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _require(self.model_type in MODEL_TYPES, "model_type", f"one of {', '.join(MODEL_TYPES)}", self.model_type)
        for name in _BOOLS:
            v = getattr(self, name)
            _require(isinstance(v, bool), name, "true or false", v)
        for name, top in LIMITS.items():
            v = getattr(self, name)
            _require(v is None or not isinstance(v, int) or isinstance(v, bool) or v <= top, name,
                     f"at most {top}", v)
        _require(self.domain_routing is None or isinstance(self.domain_routing, (dict, DomainRouting)),
                 "domain_routing", "an object or null", self.domain_routing)
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            _require(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), name,
                     "null or an integer >= 0", v)
        eos = self.eos_token_id
        _require(eos is None or all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                    for i in (eos if isinstance(eos, list) else [eos])), "eos_token_id",
                 "null, an integer >= 0 or a list of them", eos)
        if isinstance(self.domain_routing, dict):
            unknown = set(self.domain_routing) - {"domains", "experts_per_domain", "added"}
            _require(not unknown, "domain_routing", "an object with keys domains, experts_per_domain (, added)",
                     sorted(unknown))
            try:
                self.domain_routing = DomainRouting(**self.domain_routing)
            except TypeError as e:
                raise ValueError(f"config field 'domain_routing' is incomplete: {e}") from None
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings", "moe_layer_freq", "num_experts_per_tok", "n_group",
                     "topk_group"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "an integer >= 1", v)
        for name in ("qk_nope_head_dim", "first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "an integer >= 0", v)
        for name in ("q_lora_rank", "n_shared_experts", "n_routed_experts", "moe_intermediate_size"):
            v = getattr(self, name)
            _require(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), name,
                     "null or an integer >= 1", v)
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "even", self.qk_rope_head_dim)
        _require(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
                 f"equal to num_attention_heads ({self.num_attention_heads}) under MLA", self.num_key_value_heads)
        _require(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
                 f"at most num_hidden_layers ({self.num_hidden_layers})", self.first_k_dense_replace)
        _require(self.hidden_act == "silu", "hidden_act", "'silu'", self.hidden_act)
        _require(self.scoring_func in _SCORING, "scoring_func", f"one of {_SCORING}", self.scoring_func)
        _require(self.topk_method in _TOPK_METHODS, "topk_method", f"one of {_TOPK_METHODS}", self.topk_method)
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v), name,
                     "a positive number", v)
        if self.has_moe:
            # Group-limited routing covers the experts a token without a domain may use (added domains aside).
            E = self.n_routed_experts if self.domain_routing is None \
                else self.domain_routing.base_experts(self.n_routed_experts)
            _require(self.moe_intermediate_size is not None, "moe_intermediate_size",
                     "an integer >= 1 when n_routed_experts is set", None)
            _require(E % self.n_group == 0, "n_group", f"a divisor of n_routed_experts ({E})", self.n_group)
            _require(self.topk_group <= self.n_group, "topk_group", f"at most n_group ({self.n_group})",
                     self.topk_group)
            per_group = E // self.n_group
            _require(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                     f"at most topk_group * experts per group ({self.topk_group * per_group})",
                     self.num_experts_per_tok)
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                _require(per_group >= 2, "n_group", "small enough that each group has >= 2 experts (noaux_tc "
                         "scores a group by its top-2 experts)", self.n_group)
            if self.domain_routing is not None:
                self.domain_routing.validate(self.n_routed_experts, self.num_experts_per_tok)
        else:
            _require(self.domain_routing is None, "domain_routing", "null for a model without routed experts",
                     self.domain_routing)
        families.check_schedules(self)
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            _require(isinstance(rs, dict), "rope_scaling", "an object or null", rs)
            kind = rs.get("rope_type", rs.get("type", "default"))
            _require(kind in _ROPE_TYPES, "rope_scaling.rope_type", f"one of {_ROPE_TYPES}", kind)
            for key, v in rs.items():  # NaN or infinite values would make every logit NaN
                _require(not isinstance(v, float) or math.isfinite(v), f"rope_scaling.{key}", "a finite number", v)
            if kind == "yarn":
                f = rs.get("factor")
                _require(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 1, "rope_scaling.factor",
                         "a number >= 1", f)
                for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                    v = rs.get(key)
                    _require(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                             f"rope_scaling.{key}", "null or a finite number >= 0", v)
                o = rs.get("original_max_position_embeddings")
                _require(isinstance(o, int) and o >= 1, "rope_scaling.original_max_position_embeddings",
                         "an integer >= 1", o)

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        return self.n_routed_experts is not None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """`mlp_layer_types` when given (MTP layers are MoE), else DeepSeek's rule: layers from
        `first_k_dense_replace` on, every `moe_layer_freq`-th, are MoE."""
        if self.mlp_layer_types is not None:
            return self.has_moe and (layer_idx >= self.num_hidden_layers
                                     or self.mlp_layer_types[layer_idx] == "sparse")
        return (self.has_moe and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def sparse_attention(self) -> bool:
        """DeepSeek Sparse Attention (V3.2, GLM-5): a lightning indexer chooses the positions each query sees."""
        return self.model_type in families.SPARSE_ATTENTION

    def has_indexer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` runs an indexer of its own (MTP layers do), not reusing the one before."""
        return self.sparse_attention and (self.indexer_types is None or layer_idx >= self.num_hidden_layers
                                          or self.indexer_types[layer_idx] == "full")

    @property
    def indexer_rope_interleave(self) -> bool:
        """V3.2's indexer rotates half-split pairs, GLM-5's interleaved ones (as transformers computes them)."""
        return self.model_type == "glm_moe_dsa"

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default"))

    # ---- (de)serialisation ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = False) -> "ModelConfig":
        """From a `config.json` dict; `strict` (a file from outside) also requires the shape keys."""
        d = families.normalize(d)
        kind = d.get("model_type", "deepseek_v3")
        if strict:
            missing = [k for k in REQUIRED if k not in d]
            if missing:
                raise ValueError(f"config field '{missing[0]}' is missing (a config.json must state every shape: "
                                 f"{', '.join(REQUIRED)})")
        for key in ("quantization", "quantization_config"):
            _require(d.get(key) is None or isinstance(d[key], dict), key, "an object", d.get(key))
        if kind == "deepseek_v2":  # what transformers' DeepseekV2Config means by an absent key
            for key, value in _V2_DEFAULTS.items():
                d.setdefault(key, value)
        for key in ("n_group", "topk_group"):  # releases write null for "no expert groups"
            if key in d and d[key] is None:
                d[key] = 1
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict) and rp:  # transformers >= 5 folds rope_theta into rope_parameters
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = rp
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _DERIVED}
        extra.update(d.get("extra", {}) or {})
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dict: HF DeepSeek-V3 keys (what transformers, vLLM and mlx-lm read) + extras."""
        # Softmax routing is DeepSeek-V2's: transformers' and vLLM's DeepSeek-V3 always score by sigmoid.
        kind = families.written_type(self.model_type, self.scoring_func == "softmax" and self.topk_method != "noaux_tc")
        out: dict[str, Any] = {"architectures": [families.ARCHITECTURES[kind]], "model_type": kind}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "model_type"):
                continue
            v = getattr(self, f.name)
            if f.name in _OPTIONAL and v is None:
                continue
            if f.name == "domain_routing":
                if v is None:
                    continue
                v = {k: x for k, x in dataclasses.asdict(v).items() if k != "added" or x}  # plain V3 keys unless added
            out[f.name] = v
        # HF's config does not store scoring_func/topk_method defaults; we always write them explicitly.
        for k, v in self.extra.items():
            out.setdefault(k, v)
        if kind in families.KEPT:  # transformers 5's key too (mlx-lm's glm_moe_dsa requires it)
            out["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                      **{k: v for k, v in (self.rope_scaling or {}).items() if k != "type"}}
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def preset_names() -> list[str]:
    return sorted(p.stem for p in PARAMETERS_DIR.glob("*.json"))


def load_config(path: str | Path) -> ModelConfig:
    """Read a `config.json` (or a model directory holding one), raising ValueError naming the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        d = read_json(p, "config")
    except FileNotFoundError:
        raise ValueError(f"{p}: no such file (a model directory needs a config.json)") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read: {e.strerror}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(d).__name__}")
    try:
        if d.get("model_type") == "deepseek_v4":  # its own architecture (config_v4.py)
            from .config_v4 import V4Config
            return V4Config.from_dict(d, strict=True)
        return ModelConfig.from_dict(d, strict=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{p}: {e}") from None


def load_preset(name: str) -> ModelConfig:
    """A size preset from `parameters/NAME.json` (`tiny`, `1b`, `5b`, `30b`, `500b`)."""
    p = PARAMETERS_DIR / f"{name}.json"
    if not p.is_file():
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return load_config(p)


def resolve_config(params: str | None, path: str | Path | None, *, arg: str = "config") -> ModelConfig:
    """A preset by name, or a config.json (file or model directory); the default preset when neither is given."""
    if params and path:
        raise ValueError(f"give either `params` or `{arg}`, not both")
    return load_config(path) if path else load_preset(params or DEFAULT_PRESET)


def save_config(config: ModelConfig, directory: str | Path, name: str = "config.json") -> None:
    write_atomic(Path(directory) / name, json.dumps(config.to_dict(), indent=2) + "\n")


# ---- LoRA adapters -------------------------------------------------------------------------------------
ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
             "kv_proj", "o_a_proj", "o_b_proj")  # (the last three: DeepSeek-V4's)
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")  # the dense layers' MLP
TARGETS = ATTENTION + ("shared_experts",) + DENSE_MLP


@dataclass
class LoRAConfig:
    """Which matrices get adapters and how large. `targets` None: the defaults of `default_targets`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] | None = None
    num_layers: int | None = None  # the last N decoder layers of the main stack; None: all
    experts: bool = True  # per-expert adapters on the routed experts

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA option 'rank' must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"LoRA option 'alpha' must be a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA option 'dropout' must be in [0, 1), got {self.dropout!r}")
        if self.num_layers is not None and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise ValueError(f"LoRA option 'num_layers' must be an integer >= 1 (or unset for all), "
                             f"got {self.num_layers!r}")
        if self.targets is not None:
            self.targets = list(self.targets)
            bad = [t for t in self.targets if t not in TARGETS]
            if bad:
                raise ValueError(f"LoRA option 'targets': unknown {', '.join(map(repr, bad))}; choose from "
                                 f"{', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
