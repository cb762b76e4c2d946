"""`dh-mlx domains add`: a new domain trained into a model, DEMix-style, without changing any existing weight.

`domains.add_experts` appends the domain's experts (copies of the common ones) to every MoE layer; here each
grown matrix is held as its old rows (frozen) and its new rows (trained), joined when the layer runs, so the
training loop of `dh-mlx train` updates the new experts and their router rows alone: AdamW never sees, and
weight decay never touches, an old value. Every record of the data is trained as the new domain (its id
selects the new experts and the common ones); ALF stays off, so the selection biases keep their values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint.layout import stored_dtype
from ..checkpoint.weights import copy_tokenizer, load_model, resolve_path, save_model
from ..domains import add_experts
from ..model import Model
from ..model.moe import MoE, MoEGate, StackedLinear
from .config import TrainConfig
from .setup import start_run
from .evaluate import evaluate
from .trainer import RunResult, train_loop


class _Grown:
    """`weight` as the frozen old rows and the trained new ones, joined on use."""

    @property
    def weight(self) -> mx.array:
        return mx.concatenate([self.old, self.new], axis=0)


class GrownStackedLinear(_Grown, StackedLinear):
    pass


class GrownGate(_Grown, MoEGate):
    pass


GROWN = {StackedLinear: GrownStackedLinear, MoEGate: GrownGate}


def _grown_modules(model: Model):
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):
            e = layer.mlp.experts
            yield from (layer.mlp.gate, e.gate_proj, e.up_proj, e.down_proj)


def split(model: Model, n_old: int) -> None:
    """Every grown matrix as old rows (frozen) + new rows (the only trainable parameters of `model`)."""
    grown = list(_grown_modules(model))
    for m in grown:
        w = m["weight"]
        del m["weight"]
        m.__class__ = GROWN[type(m)]
        m.old, m.new = w[:n_old], w[n_old:]
    model.freeze()  # after the split: `old` is frozen like every other parameter
    for m in grown:
        m.unfreeze(keys=["new"], recurse=False)


def merged(model: Model) -> Model:
    """A plain copy of a split model (old and new rows joined), for saving."""
    flat = dict(tree_flatten(model.parameters()))
    weights = {k: v for k, v in flat.items() if not k.endswith((".old", ".new"))}
    for k in [k for k in flat if k.endswith(".old")]:
        weights[k[:-4] + ".weight"] = mx.concatenate([flat[k], flat[k[:-4] + ".new"]], axis=0)
    plain = Model(model.config)
    plain.load_weights(list(weights.items()))
    mx.eval(plain.parameters())
    return plain


@dataclass
class AddResult:
    run: RunResult
    before: float | None  # the new domain's validation loss before training (its experts the common copies)
    after: float | None


def add_domain(*, model: str | Path, name: str, data: str | Path, out: str | Path, resume: bool = False,
               force: bool = False, progress: bool = True, **options) -> AddResult:
    """Add domain `name` to the model directory `model`, trained on `data`, into the run directory `out`
    (a loadable model directory); `options` are `TrainConfig` fields (default 200 steps)."""
    base = resolve_path(model)
    cfg = TrainConfig(**{"alf_gamma": 0.0, "domain_dropout": 0.0, **options})
    if cfg.alf_gamma or cfg.domain_dropout:
        raise ValueError("domains add keeps the selection biases and trains every row as the new domain: "
                         "alf_gamma and domain_dropout must be 0")
    run = start_run(out, tokenizer=base, inputs=[data], resume=resume, force=force)
    out, w = run.out, run.w
    old = load_model(base, dtype="float32")
    m = add_experts(old, name)
    n_old = old.config.n_routed_experts
    del old
    dataset = run.open_data(data, cfg, m.config.domain_routing.names, as_domain=name)
    split(m, n_old)
    has_val = len(dataset.valid) > 0
    before = evaluate(m, dataset, cfg, w=w).loss if has_val and not resume else None

    stored = stored_dtype(base)

    def export(d: Path) -> None:
        save_model(merged(m), d, dtype=stored)  # the base's dtype: old values round-trip exactly
        copy_tokenizer(base, d)

    run = train_loop(m, dataset, cfg, out, export=export, resume=resume, force=force, progress=progress, w=w)
    return AddResult(run, before, evaluate(m, dataset, cfg, w=w).loss if has_val else None)
