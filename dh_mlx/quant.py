"""Quantize a model with MLX affine quantization, chosen per layer by a recipe, and written as mlx-lm writes it.

Recipes (a predicate over module paths):
    uniform  every linear, the token embedding and the stacked routed experts at `bits`
    mixed    the same, but `lm_head`, the embedding and every matrix of the first and last decoder layers get
             8 bits (with `bits=8` they stay in float): the layers whose errors reach every later layer or the
             logits directly

Group size: per matrix, the largest of 128, 64 and 32 that divides its input width (so a 352-wide expert gets 32),
unless one is given (then a matrix whose input width it does not divide stays in float).

Always kept in float: norms, the router (`mlp.gate`, float32 like its selection bias), `e_score_correction_bias`,
linear biases, matrices whose input width no allowed group size divides, the sparse-attention indexer's head
weights (`weights_proj`, float32 as transformers keeps them), and `kv_b_proj`. The latter
because the absorbed (decode) path folds its per-head matrices into the query and the output, and because
mlx-lm re-quantizes it along another axis when it splits it into `embed_q`/`unembed_out`, so a quantized
`kv_b_proj` would give different logits there. It is small (kv_lora_rank x heads x (nope + v)).

The embedding is quantized as mlx-lm quantizes it: on small-vocabulary models it is a large share of the bytes,
and a row lookup dequantizes only the rows it reads.

On disk: config.json gains mlx-lm's block `"quantization": {"group_size": G, "bits": B, "mode": "affine",
PATH: {"group_size": G', "bits": B'}}` (G the most common group size; an entry per module whose group size or bits
differ, PATH mlx-lm's module path: `mlp.switch_mlp.*` for the routed experts) and its copy `quantization_config`;
every quantized matrix has `weight` (packed uint32), `scales` and `biases`, routed experts one triple per expert in
the HF layout (`mlp.experts.{e}.gate_proj.scales`), which mlx-lm stacks into `switch_mlp` when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelConfig
from .model import Model
from .ops import replaceable
from .model.layers import Linear
from .model.moe import QuantizedStackedLinear, StackedLinear

RECIPES = ("uniform", "mixed")
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
AUTO_GROUP_SIZES = (128, 64, 32)  # tried in this order when no group size is given
KEYS = ("quantization", "quantization_config")  # mlx-lm writes both (the second for the HF model tree)
HIGH_BITS = 8
NEVER = ("kv_b_proj", "weights_proj")  # weights_proj: the sparse-attention indexer's head weights (float32)
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedStackedLinear)


@replaceable("quantized_linear")
def quantized_linear(layer: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """`nn.QuantizedLinear`'s product: x @ dequantize(weight).T (+ bias) through `mx.quantized_matmul`."""
    return nn.QuantizedLinear.__call__(layer, x)


@replaceable("quantized_embedding")
def quantized_embedding(layer: nn.QuantizedEmbedding, ids: mx.array) -> mx.array:
    """`nn.QuantizedEmbedding`'s lookup: the rows of `ids`, dequantized."""
    return nn.QuantizedEmbedding.__call__(layer, ids)


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` (same parameters and files) through the replaceable `quantized_linear`."""

    def __call__(self, x: mx.array) -> mx.array:
        return quantized_linear(self, x)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` (same parameters and files) through the replaceable operations: the lookup, and as
    a tied output head the quantized linear (what `nn.QuantizedEmbedding.as_linear` computes)."""

    def __call__(self, ids: mx.array) -> mx.array:
        return quantized_embedding(self, ids)

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_linear(self, x)


def _use_replaceable_linear(model: nn.Module) -> None:
    """mlx's QuantizedLinear and QuantizedEmbedding layers become ours (same parameters), which go through the
    seam."""
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = QuantizedLinear
        elif type(m) is nn.QuantizedEmbedding:
            m.__class__ = QuantizedEmbedding


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int | None = None  # None: per matrix, the largest of AUTO_GROUP_SIZES dividing its input width
    recipe: str = "uniform"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"quantization option 'bits' must be one of {BITS}, got {self.bits!r}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantization option 'group_size' must be one of {GROUP_SIZES} (or unset: chosen per "
                             f"matrix), got {self.group_size!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"quantization option 'recipe' must be one of {RECIPES}, got {self.recipe!r}")

    def group_for(self, in_dims: int) -> int | None:
        """The group size of a matrix with input width `in_dims`, or None: no allowed one divides it."""
        sizes = AUTO_GROUP_SIZES if self.group_size is None else (self.group_size,)
        return next((g for g in sizes if in_dims % g == 0), None)


def _sensitive(path: str, config: ModelConfig) -> bool:
    """What the mixed recipe gives more bits: the head, the embedding, the first and last decoder layers."""
    if path in ("lm_head", "model.embed_tokens"):
        return True
    parts = path.split(".")
    return (len(parts) > 2 and parts[1] == "layers"
            and int(parts[2]) in (0, config.num_hidden_layers - 1))


def quant_predicate(config: ModelConfig, qc: QuantConfig) -> Callable[[str, nn.Module], bool | dict]:
    """`nn.quantize` predicate of a recipe: False (keep float) or the module's {"group_size", "bits"}."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized") or path.rsplit(".", 1)[-1] in NEVER:
            return False
        group = qc.group_for(module.weight.shape[-1])
        if group is None:
            return False
        if qc.recipe == "mixed" and _sensitive(path, config):
            return {"group_size": group, "bits": HIGH_BITS} if qc.bits < HIGH_BITS else False
        return {"group_size": group, "bits": qc.bits}

    return predicate


def mlx_lm_path(path: str) -> str:
    """mlx-lm's name for one of our module paths (the routed experts are its `switch_mlp`)."""
    return path.replace(".mlp.experts.", ".mlp.switch_mlp.")


def quant_block(plan: dict[str, bool | dict], bits: int) -> dict:
    """mlx-lm's `quantization` block for a plan (module path -> the predicate's answer): the most common group
    size at the top (the larger on a tie), an entry per module whose group size or bits differ."""
    chosen = [p for p in plan.values() if isinstance(p, dict)]
    counts = {g: sum(p["group_size"] == g for p in chosen) for g in AUTO_GROUP_SIZES}
    top = max(AUTO_GROUP_SIZES, key=lambda g: counts[g]) if chosen else AUTO_GROUP_SIZES[-1]
    block: dict = {"group_size": top, "bits": bits, "mode": "affine"}
    block.update({mlx_lm_path(path): p for path, p in plan.items()
                  if isinstance(p, dict) and (p["group_size"], p["bits"]) != (top, bits)})
    return block


def kept_float(plan: dict[str, bool | dict], shapes: dict[str, tuple]) -> list[str]:
    """The matrices a plan leaves in float, by name inside a layer with their count, e.g. 'mlp.gate x11'."""
    names: dict[str, int] = {}
    for path, p in plan.items():
        if p is False and len(shapes.get(path, ())) >= 2:
            parts = path.split(".")
            name = ".".join(parts[3:]) if parts[:2] == ["model", "layers"] else path
            names[name] = names.get(name, 0) + 1
    return [f"{n} x{c}" if c > 1 else n for n, c in sorted(names.items())]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for _, m in model.named_modules())


def _set_block(model: Model, block: dict | None) -> None:
    d = {k: v for k, v in model.config.to_dict().items() if k not in KEYS}
    if block is not None:
        d.update({k: block for k in KEYS})
    model.config = type(model.config).from_dict(d)  # (ModelConfig, or DeepSeek-V4's V4Config)


def quantize_model(model: Model, qc: QuantConfig) -> dict:
    """Quantize `model` in place by the recipe of `qc`; returns the `quantization` block (also put in its config)."""
    if is_quantized(model):
        raise ValueError("this model is already quantized; quantize its float checkpoint instead")
    chosen = quant_predicate(model.config, qc)
    plan: dict[str, bool | dict] = {}

    def record(path: str, module: nn.Module) -> bool | dict:
        plan[path] = chosen(path, module)
        return plan[path]

    nn.quantize(model, qc.group_size or AUTO_GROUP_SIZES[0], qc.bits, class_predicate=record)
    block = quant_block(plan, qc.bits)
    _use_replaceable_linear(model)
    _set_block(model, block)
    mx.eval(model.parameters())
    return block


def packed_format(path: str, shape: tuple[int, ...], weights: dict[str, mx.array]) -> tuple[int, int]:
    """(group size, bits) that the packed `path.weight`, `.scales` and `.biases` imply for a float matrix of
    `shape`; ValueError naming the tensor when they do not describe one (a kernel would divide by zero)."""
    w, scales, biases = (weights.get(f"{path}.{k}") for k in ("weight", "scales", "biases"))
    rows, cols = tuple(shape[:-1]), shape[-1]
    if w is None or biases is None or w.dtype != mx.uint32:
        raise ValueError(f"tensor {path}.weight: a quantized matrix needs a uint32 weight, scales and biases")
    ok = tuple(scales.shape) == tuple(biases.shape) and tuple(scales.shape[:-1]) == rows == tuple(w.shape[:-1])
    groups = scales.shape[-1] if ok else 0
    group = cols // groups if groups and cols % groups == 0 else 0
    bits = w.shape[-1] * 32 // cols if w.shape[-1] * 32 % cols == 0 else 0
    if not (ok and group in (32, 64, 128) and bits in (2, 3, 4, 5, 6, 8)):
        raise ValueError(f"tensor {path}.scales {tuple(scales.shape)} / .biases {tuple(biases.shape)} / .weight "
                         f"{tuple(w.shape)}: not an MLX-quantized {tuple(shape)} matrix (group size 32, 64 or 128; "
                         "2, 3, 4, 5, 6 or 8 bits)")
    return group, bits


def quantize_like(model: Model, block: dict, weights: dict[str, mx.array]) -> None:
    """Loading: quantize exactly the modules that have `scales` on disk, with the group size and bits their
    shapes imply (as mlx-lm infers them), so per-layer entries of the block need not name our paths."""
    mode = block.get("mode", "affine")
    if mode != "affine":
        raise ValueError(f"config field 'quantization.mode' must be 'affine', got {mode!r}")

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        group, bits = packed_format(path, module.weight.shape, weights)
        return {"group_size": group, "bits": bits, "mode": mode}

    nn.quantize(model, block["group_size"], block["bits"], class_predicate=predicate)
    _use_replaceable_linear(model)


def dequantize_model(model: Model) -> Model:
    """Every quantized module back to float (the values it stands for); drops the block from the config."""
    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, QuantizedStackedLinear):
            new = StackedLinear(1, 1, 1)
            new.weight = m.dequantized_weight()
        elif isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, mode=m.mode)
            if isinstance(m, nn.QuantizedEmbedding):
                new = nn.Embedding(*w.shape)
            else:
                new = Linear(w.shape[1], w.shape[0], bias="bias" in m)
                if "bias" in m:
                    new.bias = m.bias
            new.weight = w
        else:
            continue
        swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    _set_block(model, None)
    mx.eval(model.parameters())
    return model


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits (packed values, scales and biases) per parameter of the float model, as mlx-lm reports it."""
    quantized = {p: m for p, m in model.named_modules() if isinstance(m, QUANTIZED)}
    n_bits = n_params = 0
    for path, a in tree_flatten(model.parameters()):
        n_bits += a.nbytes * 8
        owner, leaf = path.rsplit(".", 1)
        if owner not in quantized:
            n_params += a.size
        elif leaf == "weight":
            n_params += a.size * 32 // quantized[owner].bits
    return n_bits / max(n_params, 1)
