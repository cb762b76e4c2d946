"""LoRA: low-rank adapters on linears and on the stacked routed experts; apply, fuse, and adapter files in
mlx-lm's format (`adapters.safetensors` + `adapter_config.json`).

Legend: E routed experts, r rank, in/out a matrix's input/output width.

    linear:  y = W x + scale * B A dropout(x)            A [in, r], B [r, out]   (stored as mlx-lm stores them)
    experts: y_e = W_e x + scale * B_e A_e dropout(x)    A [E, r, in], B [E, out, r], applied with gather_mm
                                                          on the same expert indices as W, so an expert's
                                                          adapter only sees (and only gets gradients from) the
                                                          tokens routed to it
    scale = alpha / rank; B starts at zero, so an untrained adapter leaves the model unchanged.

Adapter tensors are named as mlx-lm names them (`model.layers.3.self_attn.q_a_proj.lora_a`), routed experts
under mlx-lm's `mlp.switch_mlp` (ours: `mlp.experts`), so `mlx_lm.load(base, adapter_path=DIR)` loads them. It
cannot load a `kv_b_proj` adapter: mlx-lm splits that matrix into `embed_q`/`unembed_out` when it loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ATTENTION, DENSE_MLP, TARGETS, LoRAConfig, ModelConfig  # noqa: F401  (re-exported)
from .files import write_atomic
from .model import Model
from .model.layers import Linear
from .model.moe import Adapter, Projection, QuantizedStackedLinear, StackedLinear, dropout, project

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PROJS = ("gate_proj", "up_proj", "down_proj")
# Our module path inside a layer <-> mlx-lm's (only the routed experts differ).
_OURS_TO_MLX_LM = {f"mlp.experts.{p}": f"mlp.switch_mlp.{p}" for p in _PROJS}
_MLX_LM_TO_OURS = {v: k for k, v in _OURS_TO_MLX_LM.items()}


def default_targets(config: ModelConfig) -> list[str]:
    """Attention's query, latent and output projections and the shared experts (every format can load them)."""
    if config.model_type == "deepseek_v4":  # its key/value and the output's second (full-width) projection
        return ["q_a_proj", "q_b_proj", "kv_proj", "o_b_proj", "shared_experts"]
    q = ["q_proj"] if config.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
    return q + ["kv_a_proj_with_mqa", "o_proj"] + (["shared_experts"] if config.n_shared_experts else [])


def module_keys(config: ModelConfig, lc: LoRAConfig) -> list[str]:
    """Module paths inside a decoder layer (ours) that get adapters."""
    targets = default_targets(config) if lc.targets is None else lc.targets
    if "q_proj" in targets and config.q_lora_rank is not None:
        raise ValueError("LoRA option 'targets': this model has q_lora_rank set, so its query is q_a_proj and "
                         "q_b_proj, not q_proj")
    if {"q_a_proj", "q_b_proj"} & set(targets) and config.q_lora_rank is None:
        raise ValueError("LoRA option 'targets': this model has no q_lora_rank, so its query is q_proj")
    keys = []
    for t in targets:
        if t in ATTENTION:
            keys.append(f"self_attn.{t}")
        elif t == "shared_experts":
            keys += [f"mlp.shared_experts.{p}" for p in _PROJS]
        else:
            keys.append(f"mlp.{t}")
    if lc.experts and config.has_moe:
        keys += [f"mlp.experts.{p}" for p in _PROJS]
    return keys


# ---- layers -------------------------------------------------------------------------------------------------
def _dims(base: nn.Module) -> tuple[int, int]:
    """(in, out) of a float or quantized linear / stacked linear."""
    out_dims = base.weight.shape[-2]
    if isinstance(base, (nn.QuantizedLinear, QuantizedStackedLinear)):
        return base.scales.shape[-1] * base.group_size, out_dims
    return base.weight.shape[-1], out_dims


def _dequantized(base: nn.Module) -> mx.array:
    if isinstance(base, QuantizedStackedLinear):
        return base.dequantized_weight()
    if isinstance(base, nn.QuantizedLinear):
        return mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits, mode=base.mode)
    return base.weight


class _Dropout(nn.Module):
    """Dropout whose random key is module state: the compiled training step carries it from step to step
    (a plain `nn.Dropout` inside our compiled step would reuse one mask)."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p = p
        self._key = mx.random.key(seed)

    def key(self) -> mx.array | None:
        """The mask key for one call (the state advances), or None when dropout is off."""
        if not self.training or self.p == 0:
            return None
        key, self._key = mx.random.split(self._key)
        return key

    def __call__(self, x: mx.array) -> mx.array:
        return dropout(x, self.p, self.key())


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        in_dims, out_dims = _dims(base)
        self.linear = base
        self.scale = scale
        self.dropout = _Dropout(dropout, seed)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=mx.random.key(seed))
        self.lora_b = mx.zeros((rank, out_dims))

    def delta(self) -> mx.array:
        """scale * (A B)^T: the [out, in] matrix the adapter adds to the weight."""
        return (self.scale * (self.lora_a @ self.lora_b)).T

    @property
    def weight(self) -> mx.array:
        # The absorbed MLA path reads kv_b_proj's matrix directly; give it the adapted one.
        w = _dequantized(self.linear)
        return w + self.delta().astype(w.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b  # (..., r) -> (..., out)
        return self.linear(x) + (self.scale * z).astype(x.dtype)

    def fused(self, keep_quantized: bool = False) -> nn.Module:
        base = self.linear
        w = self.weight
        out = Linear(w.shape[1], w.shape[0], bias="bias" in base)
        out.weight = w
        if "bias" in base:
            out.bias = base.bias
        if keep_quantized and isinstance(base, nn.QuantizedLinear):
            out = nn.QuantizedLinear.from_linear(out, base.group_size, base.bits, mode=base.mode)
        return out


class LoRAStackedLinear(nn.Module):
    """Per-expert adapters on a (quantized) `StackedLinear`, gathered with the base's own expert indices."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        in_dims, out_dims = _dims(base)
        E = base.weight.shape[0]
        self.linear = base
        self.scale = scale
        self.dropout = _Dropout(dropout, seed)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (E, rank, in_dims), key=mx.random.key(seed))
        self.lora_b = mx.zeros((E, out_dims, rank))

    def projection(self) -> Projection:
        """The base's arrays with this adapter's (and one call's dropout key)."""
        adapter = Adapter(self.lora_a, self.lora_b, self.scale, self.dropout.p, self.dropout.key())
        return replace(self.linear.projection(), adapter=adapter)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # x (..., rows, in) against expert indices (...): the base's gather, and the adapter's twice through r dims
        return project(x, self.projection(), indices, sorted_indices)

    def fused(self, keep_quantized: bool = False) -> nn.Module:
        w = _dequantized(self.linear)
        out = StackedLinear(1, 1, 1)
        out.weight = w + (self.scale * (self.lora_b @ self.lora_a)).astype(w.dtype)  # [E, out, in]
        if keep_quantized and isinstance(self.linear, QuantizedStackedLinear):
            out = out.to_quantized(self.linear.group_size, self.linear.bits, self.linear.mode)
        return out


LORA_TYPES = (LoRALinear, LoRAStackedLinear)


# ---- applying, counting, fusing -------------------------------------------------------------------------------
def adapted_layers(model: Model, num_layers: int | None) -> list[int]:
    n = model.config.num_hidden_layers
    return list(range(max(n - (num_layers or n), 0), n))


def apply_lora(model: Model, lc: LoRAConfig, *, seed: int = 0) -> list[str]:
    """Freeze `model` and wrap the chosen matrices of its last `lc.num_layers` layers with adapters (the only
    trainable parameters afterwards). Returns the wrapped module paths."""
    if any(isinstance(m, LORA_TYPES) for _, m in model.named_modules()):
        raise ValueError("this model already has LoRA adapters")
    keys = module_keys(model.config, lc)
    model.freeze()
    wrapped, used = [], set()
    for i in adapted_layers(model, lc.num_layers):
        layer = model.model.layers[i]
        present = dict(layer.named_modules())
        swaps = []
        for k in keys:
            if k not in present:
                continue
            cls = LoRAStackedLinear if k.startswith("mlp.experts.") else LoRALinear
            swaps.append((k, cls(present[k], lc.rank, lc.scale, lc.dropout, seed=seed + len(wrapped))))
            wrapped.append(f"model.layers.{i}.{k}")
            used.add(k)
        if swaps:
            layer.update_modules(tree_unflatten(swaps))
    missing = [k for k in keys if k not in used]
    if missing:
        raise ValueError(f"LoRA option 'targets': {', '.join(missing)} match no module in the adapted layers "
                         f"{adapted_layers(model, lc.num_layers)}")
    return wrapped


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters; a quantized matrix counts its unpacked values, not its scales)."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, m in model.named_modules():
        bits = getattr(m, "bits", None)  # set on quantized modules only
        for k, v in m.items():
            if not isinstance(v, mx.array) or k.startswith("_") or (bits and k in ("scales", "biases")):
                continue
            total += v.size * 32 // bits if bits and k == "weight" else v.size
    return trainable, total


def fuse_lora(model: Model, *, keep_quantized: bool = False) -> Model:
    """Merge every adapter into its matrix; a quantized base is dequantized first (all of it, so the result is a
    plain float model) unless `keep_quantized`, which re-quantizes each adapted matrix with its own settings."""
    swaps = [(path, m.fused(keep_quantized)) for path, m in model.named_modules() if isinstance(m, LORA_TYPES)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    if not keep_quantized:
        from .quant import dequantize_model, is_quantized
        if is_quantized(model):
            dequantize_model(model)
    mx.eval(model.parameters())
    return model


# ---- adapter files ---------------------------------------------------------------------------------------------
def _to_file_name(path: str) -> str:
    for ours, theirs in _OURS_TO_MLX_LM.items():
        path = path.replace(f".{ours}.", f".{theirs}.")
    return path


def _from_file_name(name: str) -> str:
    for theirs, ours in _MLX_LM_TO_OURS.items():
        name = name.replace(f".{theirs}.", f".{ours}.")
    return name


def adapter_weights(model: Model) -> dict[str, mx.array]:
    """Adapter tensors under mlx-lm's names."""
    return {_to_file_name(k): v for k, v in tree_flatten(model.parameters())
            if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def lora_parameters(config: ModelConfig, lc: LoRAConfig) -> dict:
    """mlx-lm's `lora_parameters` block: rank, scale, dropout and the adapted module keys under its names."""
    keys = [_OURS_TO_MLX_LM.get(k, k) for k in module_keys(config, lc)]
    return {"rank": lc.rank, "scale": lc.scale, "dropout": lc.dropout, "keys": keys}


def save_adapters(model: Model, directory: str | Path, lc: LoRAConfig, *, extra: dict | None = None) -> None:
    """Write `adapters.safetensors` and `adapter_config.json` (mlx-lm's fields plus ours)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    n_layers = len(adapted_layers(model, lc.num_layers))
    config = {"fine_tune_type": "lora", "num_layers": n_layers, "lora_parameters": lora_parameters(model.config, lc),
              "alpha": lc.alpha, "targets": list(lc.targets) if lc.targets is not None else None,
              "experts": lc.experts, **(extra or {})}
    weights = adapter_weights(model)
    write_atomic(d / ADAPTERS, lambda f: mx.save_safetensors(f, weights, metadata={"format": "mlx"}))
    write_atomic(d / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


def read_adapter_config(adapter_dir: str | Path) -> tuple[dict, dict[str, mx.array]]:
    d = Path(adapter_dir)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTERS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ValueError(f"{d}: not an adapter directory (no {p.name})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise ValueError(f"{cfg_path}: fine_tune_type {cfg.get('fine_tune_type')!r} is not supported (only 'lora')")
    if not isinstance(cfg.get("lora_parameters"), dict) or "rank" not in cfg["lora_parameters"]:
        raise ValueError(f"{cfg_path}: needs a 'lora_parameters' object with 'rank' and 'scale'")
    return cfg, mx.load(str(w_path))


def load_adapters(model: Model, adapter_dir: str | Path) -> Model:
    """Apply the adapters in `adapter_dir` (ours or mlx-lm's) to `model`, unfused, for inference (no dropout)."""
    cfg, weights = read_adapter_config(adapter_dir)
    lp = cfg["lora_parameters"]
    keys = lp.get("keys")
    if keys is None:  # mlx-lm's default (every linear): take them from the tensor names
        keys = sorted({n.split(".", 3)[3].rsplit(".", 1)[0] for n in weights})
    ours = [_MLX_LM_TO_OURS.get(k, k) for k in keys]
    rank = int(lp["rank"])
    scale = float(lp["scale"]) if "scale" in lp else float(cfg.get("alpha", 2 * rank)) / rank
    n_layers = cfg.get("num_layers")
    n_layers = None if n_layers is None or n_layers < 0 else n_layers
    model.freeze()
    for i in adapted_layers(model, n_layers):
        layer = model.model.layers[i]
        present = dict(layer.named_modules())
        swaps = [(k, (LoRAStackedLinear if k.startswith("mlp.experts.") else LoRALinear)(present[k], rank, scale))
                 for k in ours if k in present]
        if swaps:
            layer.update_modules(tree_unflatten(swaps))
    expected = {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    got = {_from_file_name(k): v for k, v in weights.items()}
    where = Path(adapter_dir) / ADAPTERS
    unknown = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    if unknown or missing:
        raise ValueError(f"{where}: does not match this model: "
                         + "; ".join(filter(None, [unknown and f"unexpected {', '.join(unknown[:6])}",
                                                   missing and f"missing {', '.join(missing[:6])}"])))
    for k, v in got.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, this model needs {tuple(expected[k].shape)}")
    model.load_weights(list(got.items()), strict=False)
    mx.eval(model.parameters())
    return model
