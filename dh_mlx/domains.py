"""Domains as parts of a model: `dh-mlx domains extract` (a standalone DeepSeek-V3 holding one domain's experts
and the common ones) and `dh-mlx domains remove` (the model without a domain's experts), by selecting routed
experts: the router's rows, the selection biases and the stacked expert matrices, in every MoE layer (MTP
modules included). Nothing else changes: attention, dense layers, shared experts and embeddings are copied.

Why extraction is exact: a token with domain d already chooses only among d's experts and the common ones
(the domain mask replaces group-limited selection), by sigmoid scores plus the selection bias, and sigmoid
scores of one expert do not depend on the others; the extracted model routes the same way with plain top-k
over exactly those experts (`n_group: 1`). Softmax-routed models (DeepSeek-V2) normalise scores over all
experts, so without renormalised weights (`norm_topk_prob`) their mixing weights change; that is measured,
not claimed.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .config import ModelConfig, DomainRouting
from .model import Model
from .model.moe import MoE


def _regroup(config: ModelConfig, n_experts: int) -> dict:
    """Group-limited routing kept when the groups still divide the experts, else plain top-k."""
    if config.n_group > 1 and n_experts % config.n_group == 0:
        return {}
    return {"n_group": 1, "topk_group": 1}


def select_experts(model: Model, keep: list[int], **config_changes) -> Model:
    """A new float model holding routed experts `keep` (in that order) of every MoE layer of `model`."""
    if model.config.extra.get("quantization"):
        raise ValueError("domains are selected from a float model; dequantize or use the float checkpoint")
    config = model.config.replace(n_routed_experts=len(keep), **config_changes)
    new = Model(config)
    idx = mx.array(keep)
    weights = {}
    from mlx.utils import tree_flatten
    old_moes = {i: l.mlp for i, l in enumerate(model.model.layers) if isinstance(l.mlp, MoE)}
    for k, v in tree_flatten(model.parameters()):
        parts = k.split(".")
        layer = int(parts[2]) if k.startswith("model.layers.") else None
        routed = layer in old_moes and (".mlp.gate." in k or ".mlp.experts." in k)
        weights[k] = v[idx] if routed else v
    new.load_weights(list(weights.items()))
    mx.eval(new.parameters())
    return new


def domain_experts(config: ModelConfig) -> dict[str, list[int]]:
    """Each domain's routed experts, and under "common" those every domain may use."""
    dr = _routing(config)
    k = dr.experts_per_domain
    owned = len(dr.domains) * k
    out = {name: list(range(i * k, (i + 1) * k)) for i, name in enumerate(dr.domains)}
    out["common"] = list(range(owned, config.n_routed_experts))
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
    c = extract_config(model.config, name)
    return select_experts(model, experts[name] + experts["common"], domain_routing=None, n_group=c.n_group,
                          topk_group=c.topk_group)


def remove(model: Model, name: str) -> Model:
    """`model` without domain `name` and its experts; the other domains keep theirs (renumbered) and route as
    before with their ids. Group-limited routing of id-less tokens stays when the groups still divide the
    experts, else it becomes plain top-k."""
    dr = _routing(model.config)
    dr.domain_id(name)
    if len(dr.domains) == 1:
        raise ValueError(f"{name!r} is the model's only domain; without it use `domains extract` on nothing: "
                         "drop the domain_routing block instead")
    experts = domain_experts(model.config)
    keep = [e for d in dr.domains if d != name for e in experts[d]] + experts["common"]
    routing = DomainRouting([d for d in dr.domains if d != name], dr.experts_per_domain)
    return select_experts(model, keep, domain_routing=routing, **_regroup(model.config, len(keep)))


def _run(op, model_dir: str | Path, name: str, out: str | Path, force: bool) -> Model:
    from .checkpoint.weights import copy_tokenizer, load_model, resolve_path, save_model
    from .outputs import check_output_dir
    src = resolve_path(model_dir)
    check_output_dir(out, inputs=[src], force=force)
    model = op(load_model(src, dtype="float32"), name)
    save_model(model, out)
    copy_tokenizer(src, Path(out))
    return model


def extract_domain(model: str | Path, name: str, out: str | Path, *, force: bool = False) -> Model:
    """`dh-mlx domains extract`: write domain `name` of the model directory `model` as a standalone
    DeepSeek-V3 directory `out` (tokenizer copied)."""
    return _run(extract, model, name, out, force)


def remove_domain(model: str | Path, name: str, out: str | Path, *, force: bool = False) -> Model:
    """`dh-mlx domains remove`: write the model directory `model` without domain `name` into `out`."""
    return _run(remove, model, name, out, force)
