"""Domains as parts of a model, by selecting routed experts: one domain's experts and the common ones as a
standalone DeepSeek-V3 (`extract`), the model without a domain's experts (`remove`), a new domain's experts
appended (`add_experts`, trained by `train.domain_add`). What is selected: the router's rows, the selection
biases and the stacked expert matrices, in every MoE layer (MTP modules included). Nothing else changes:
attention, dense layers, shared experts and embeddings are copied.

Why extraction is exact: a token with domain d already chooses only among d's experts and the common ones
(the domain mask replaces group-limited selection), by sigmoid scores plus the selection bias, and sigmoid
scores of one expert do not depend on the others; the extracted model routes the same way with plain top-k
over exactly those experts (`n_group: 1`). Softmax-routed models (DeepSeek-V2) normalise scores over all
experts, so without renormalised weights (`norm_topk_prob`) their mixing weights change; that is measured,
not claimed.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelConfig, DomainRouting
from .model import Model
from .model.moe import MoE


def _regroup(config: ModelConfig, n_experts: int) -> dict:
    """Group-limited routing kept when the groups still divide the experts, else plain top-k."""
    if config.n_group > 1 and n_experts % config.n_group == 0 and n_experts // config.n_group >= 2:
        return {}
    return {"n_group": 1, "topk_group": 1}


def select_experts(model: Model, keep: list[int], config: ModelConfig) -> Model:
    """A new float model of `config` (with `n_routed_experts == len(keep)`) holding routed experts `keep` (in
    that order) of every MoE layer of `model`, everything else copied."""
    if model.config.extra.get("quantization"):
        raise ValueError("domains are selected from a float model; dequantize or use the float checkpoint")
    new = Model(config)
    idx = mx.array(keep)
    weights = {}
    moe_layers = {i for i, l in enumerate(model.model.layers) if isinstance(l.mlp, MoE)}
    for k, v in tree_flatten(model.parameters()):
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        routed = layer in moe_layers and (".mlp.gate." in k or ".mlp.experts." in k)
        weights[k] = v[idx] if routed else v
    new.load_weights(list(weights.items()))
    mx.eval(new.parameters())
    return new


def domain_experts(config: ModelConfig) -> dict[str, list[int]]:
    """Each domain's routed experts (added domains' after the common ones), and under "common" those every
    domain may use."""
    dr = _routing(config)
    k, base = dr.experts_per_domain, dr.base_experts(config.n_routed_experts)
    owned = len(dr.domains) * k
    out = {name: list(range(i * k, (i + 1) * k)) for i, name in enumerate(dr.domains)}
    out.update({name: list(range(base + i * k, base + (i + 1) * k)) for i, name in enumerate(dr.added)})
    out["common"] = list(range(owned, base))
    return out


def _routing(config: ModelConfig) -> DomainRouting:
    if config.domain_routing is None:
        raise ValueError("this model has no domain_routing block in its config.json (no domains to select)")
    return config.domain_routing


def extract_config(config: ModelConfig, name: str) -> ModelConfig:
    """The standalone model of domain `name`: its experts and the common ones, plain DeepSeek-V3 routing."""
    _routing(config).domain_id(name)
    experts = domain_experts(config)
    return config.replace(n_routed_experts=len(experts[name]) + len(experts["common"]), domain_routing=None,
                          n_group=1, topk_group=1)


def extract(model: Model, name: str) -> Model:
    """`model`'s domain `name` as a plain DeepSeek-V3: with no domain id it computes what `model` computes
    with that domain's id."""
    experts = domain_experts(model.config)
    return select_experts(model, experts[name] + experts["common"], extract_config(model.config, name))


def remove(model: Model, name: str) -> Model:
    """`model` without domain `name` and its experts; the other domains keep theirs (renumbered) and route as
    before with their ids. Group-limited routing of id-less tokens stays when the groups still divide the
    experts, else it becomes plain top-k (removing an added domain changes nothing else)."""
    dr = _routing(model.config)
    dr.domain_id(name)
    if len(dr.domains) == 1 and name in dr.domains:
        raise ValueError(f"{name!r} is the model's only original domain; drop the domain_routing block instead")
    experts = domain_experts(model.config)
    base = [d for d in dr.domains if d != name]
    added = [d for d in dr.added if d != name]
    keep = [e for d in base for e in experts[d]] + experts["common"] + [e for d in added for e in experts[d]]
    routing = DomainRouting(base, dr.experts_per_domain, added)
    n_base = len(keep) - len(added) * dr.experts_per_domain
    return select_experts(model, keep, model.config.replace(n_routed_experts=len(keep), domain_routing=routing,
                                                            **_regroup(model.config, n_base)))


def add_experts(model: Model, name: str) -> Model:
    """`model` with domain `name` added: `experts_per_domain` new experts after all others in every MoE
    layer, started as copies of the common experts (their router rows and selection biases too), used only
    by tokens with the new id; every existing weight unchanged, and tokens without an id, or with another
    domain's, route exactly as before."""
    dr = _routing(model.config)
    if name in dr.names:
        raise ValueError(f"domain {name!r} is already one of this model's: {', '.join(dr.names)}")
    if model.config.scoring_func != "sigmoid":
        raise ValueError("domains add needs sigmoid routing (DeepSeek-V3's): softmax scores of the old experts "
                         "would change with every expert added")
    experts = domain_experts(model.config)
    source = experts["common"] or experts[dr.names[0]]
    E = model.config.n_routed_experts
    keep = list(range(E)) + [source[i % len(source)] for i in range(dr.experts_per_domain)]
    routing = DomainRouting(dr.domains, dr.experts_per_domain, dr.added + [name])
    return select_experts(model, keep, model.config.replace(n_routed_experts=len(keep), domain_routing=routing))
