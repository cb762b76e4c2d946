"""Checkpoint I/O in the Hugging Face DeepSeek-V3 layout: one tensor per expert on disk, stacked in memory.

Each transform between the file layout and our modules is one small function.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .config import ModelConfig, load_config, load_preset, save_config
from .device import available_memory, compute_dtype
from .model import Model
from .params import count_params, weight_bytes

DEFAULT_SHARD_BYTES = 5 * 10**9
# A quantized expert has `scales` and `biases` beside its packed `weight` (mlx-lm's per-expert layout).
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
_PROJS = ("gate_proj", "up_proj", "down_proj")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and what was expected."""


# ---- file layout -> modules ------------------------------------------------------------------------------
def drop_rotary_buffers(w: dict, config: ModelConfig) -> dict:
    return {k: v for k, v in w.items() if not k.endswith("rotary_emb.inv_freq")}


def drop_mtp_embedding_copies(w: dict, config: ModelConfig) -> dict:
    """MTP layers carry a copy of the shared embedding on disk; in memory they use the main one."""
    n = config.num_hidden_layers
    return {k: v for k, v in w.items()
            if not re.fullmatch(rf"model\.layers\.(\d+)\.embed_tokens\.(weight|scales|biases)", k)
            or int(k.split(".")[2]) < n}


def drop_mtp_layers(w: dict, config: ModelConfig) -> dict:
    """Layers past the configured MTP count (a config with MTP off loading a checkpoint with it)."""
    last = config.num_hidden_layers + config.num_nextn_predict_layers
    return {k: v for k, v in w.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < last}


def stack_experts(w: dict, config: ModelConfig) -> dict:
    """`...experts.{e}.{proj}.weight` x E -> `...experts.{proj}.weight` `[E, out, in]`."""
    groups: dict[str, dict[int, mx.array]] = {}
    out = {}
    for k, v in w.items():
        m = _EXPERT.match(k)
        if m:
            groups.setdefault(f"{m[1]}.{m[3]}.{m[4]}", {})[int(m[2])] = v
        else:
            out[k] = v
    for name, per_expert in groups.items():
        E = config.n_routed_experts
        missing = sorted(set(range(E)) - set(per_expert))
        if missing or len(per_expert) != E:
            prefix = name.rsplit(".", 2)[0]
            raise CheckpointError(f"{prefix}: expected experts 0..{E - 1}, missing {missing[:8]}"
                                  f"{'...' if len(missing) > 8 else ''}")
        out[name] = mx.stack([per_expert[e] for e in range(E)])
    return out


def split_fused_experts(w: dict, config: ModelConfig) -> dict:
    """transformers >= 5 in-memory layout (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I])."""
    out = {}
    for k, v in w.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            half = v.shape[1] // 2
            out[k.replace("gate_up_proj", "gate_proj.weight")] = v[:, :half]
            out[k.replace("gate_up_proj", "up_proj.weight")] = v[:, half:]
        elif k.endswith(".mlp.experts.down_proj"):
            out[k + ".weight"] = v
        else:
            out[k] = v
    return out


def dequantize_kv_b_proj(w: dict, config: ModelConfig) -> dict:
    """A quantized `kv_b_proj` (written by another tool) becomes float: the absorbed path reads its per-head
    matrices directly, so we never keep it packed (dh_mlx.quant never quantizes it)."""
    out = dict(w)
    for k in [k for k in w if k.endswith("self_attn.kv_b_proj.scales")]:
        prefix = k[: -len(".scales")]
        packed, scales, r = out.pop(prefix + ".weight"), out.pop(k), config.kv_lora_rank
        out[prefix + ".weight"] = mx.dequantize(packed, scales, out.pop(prefix + ".biases", None),
                                                group_size=r // scales.shape[-1], bits=packed.shape[-1] * 32 // r)
    return out


LOAD_TRANSFORMS: tuple[Callable[[dict, ModelConfig], dict], ...] = (
    drop_rotary_buffers, drop_mtp_embedding_copies, drop_mtp_layers, split_fused_experts, stack_experts,
    dequantize_kv_b_proj)


# ---- modules -> file layout --------------------------------------------------------------------------------
def unstack_experts(w: dict, config: ModelConfig) -> dict:
    out = {}
    for k, v in w.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$", k)
        if m:
            for e in range(v.shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.{m[3]}"] = v[e]
        else:
            out[k] = v
    return out


def add_mtp_embedding_copies(w: dict, config: ModelConfig) -> dict:
    """vLLM's DeepSeek MTP loader reads the embedding from `model.layers.{n+i}.embed_tokens`."""
    out = dict(w)
    for i in range(config.num_nextn_predict_layers):
        for leaf in ("weight", "scales", "biases"):  # scales/biases when the embedding is quantized
            if f"model.embed_tokens.{leaf}" in w:
                out[f"model.layers.{config.num_hidden_layers + i}.embed_tokens.{leaf}"] = w[f"model.embed_tokens.{leaf}"]
    return out


# ---- reading and writing -----------------------------------------------------------------------------------
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = [path / n for n in names]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: lists shards that do not exist: {', '.join(absent)}")
        return files
    # Only model weights: a directory may also hold adapters.safetensors or a checkpoint's optimizer state.
    single = path / "model.safetensors"
    files = [single] if single.is_file() else sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors (or index) in this directory")
    return files


def read_weights(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in _safetensors_files(path):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # MLX raises RuntimeError/ValueError on truncated or corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return weights


def _check_against_model(weights: dict, model: Model, where: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    def listing(keys):
        return ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
    if missing or unexpected:
        parts = ([f"missing tensors: {listing(missing)}"] if missing else []) + (
            [f"unexpected tensors: {listing(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{where}: does not match its config.json: " + "; ".join(parts))
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(v.shape)}, config.json implies "
                                  f"{tuple(expected[k].shape)}")


def _keep_fp32(path: str) -> bool:
    # The router runs in float32 everywhere (as transformers keeps it); its bias moves in 1e-3 steps.
    return path.endswith("mlp.gate.weight") or path.endswith("e_score_correction_bias")


def cast_model(model: Model, dtype: mx.Dtype) -> Model:
    model.update(tree_map_with_path(
        lambda p, a: a.astype(mx.float32 if _keep_fp32(p) else dtype) if mx.issubdtype(a.dtype, mx.floating)
        else a, model.parameters()))
    return model


def check_fits(config: ModelConfig, dtype: mx.Dtype, what: str) -> None:
    """Refuse, before allocating, a model whose weights cannot fit in this machine's free memory."""
    counts = count_params(config)
    n = counts.total + counts.mtp
    need = n * dtype.size
    have = available_memory()
    if need <= 0.9 * have:
        return
    options = [f"{bits}-bit quantization ({weight_bytes(n, bits) / 2**30:.1f} GiB)" for bits in (8, 4)
               if weight_bytes(n, bits) <= 0.9 * have]
    from .config import preset_names

    def preset_bytes(name: str) -> int:
        p = count_params(load_preset(name))
        return (p.total + p.mtp) * dtype.size

    smaller = [p for p in preset_names() if preset_bytes(p) <= 0.9 * have]
    hint = "; ".join(filter(None, [", ".join(options), f"a smaller preset: {', '.join(smaller)}" if smaller
                                   else ""])) or "a machine with more memory"
    dtype_name = str(dtype).rsplit(".", 1)[-1]
    raise MemoryError(f"{what}: {n / 1e9:.2f} B parameters need {need / 2**30:.1f} GiB as {dtype_name}, "
                      f"but only {have / 2**30:.1f} GiB is available; would fit: {hint}")


def init_weights(model: Model, seed: int = 0) -> Model:
    """Deterministic random init: N(0, initializer_range) for matrices, ones for norms, zeros for biases."""
    std = model.config.initializer_range
    key = mx.random.key(seed)
    flat = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(flat))
    new = []
    for (path, a), k in zip(flat, keys):
        leaf = path.rsplit(".", 1)[-1]
        if "norm" in path.rsplit(".", 2)[-2] and leaf == "weight":
            v = mx.ones(a.shape, a.dtype)
        elif leaf in ("bias", "e_score_correction_bias"):
            v = mx.zeros(a.shape, a.dtype)
        else:
            v = mx.random.normal(a.shape, a.dtype, key=k) * std
        new.append((path, v))
    model.load_weights(new)
    return model


def random_model(config: ModelConfig, *, seed: int = 0, dtype: str | None = None, name: str = "this config"
                 ) -> Model:
    """An untrained model from a config (e.g. a preset), deterministic by `seed`."""
    dt = compute_dtype(dtype)
    check_fits(config, dt, name)
    model = cast_model(init_weights(Model(config), seed), dt)
    mx.eval(model.parameters())
    return model


def resolve_path(path: str | Path) -> Path:
    """A local directory, or a Hugging Face hub repo id fetched with huggingface_hub (cached)."""
    p = Path(path)
    if p.exists():
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                                      "*.model"]))
        except Exception as e:
            raise CheckpointError(f"{path}: not a local directory, and the hub download failed: {e}") from None
    raise CheckpointError(f"{path}: no such model directory")


def load_model(path: str | Path, *, dtype: str | None = None) -> Model:
    """Read a model directory (config.json + safetensors, HF DeepSeek-V3 names) or a hub repo id."""
    path = resolve_path(path)
    config = load_config(path)
    dt = compute_dtype(dtype)
    quantization = config.extra.get("quantization")  # mlx-lm's block: {"group_size", "bits", per-layer overrides}
    if quantization is None:  # (a quantized model's size is not params x dtype; it was measured when written)
        check_fits(config, dt, str(path))
    weights = read_weights(path)
    n = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{n}.") for k in weights):
        # e.g. saved by transformers, which keeps num_nextn_predict_layers but drops the MTP tensors
        warnings.warn(f"{path}: config.json declares {config.num_nextn_predict_layers} MTP layer(s) but the "
                      "checkpoint has none; loading without MTP")
        config = config.replace(num_nextn_predict_layers=0)
    for transform in LOAD_TRANSFORMS:
        weights = transform(weights, config)
    model = Model(config)
    if quantization is not None:
        from .quant import quantize_like
        quantize_like(model, quantization, weights)
    _check_against_model(weights, model, path)
    model.load_weights(list(weights.items()))
    cast_model(model, dt)
    mx.eval(model.parameters())
    return model


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")  # same suffix (mx.save_safetensors insists); readers skip dotfiles
    write(str(tmp))
    os.replace(tmp, path)


def save_model(model: Model, path: str | Path, *, mtp: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               dtype: str | None = None) -> None:
    """Write `model` as an HF DeepSeek-V3 directory. `mtp=False` writes an MTP-free copy (for mlx-lm)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    weights = dict(tree_flatten(model.parameters()))
    if not mtp and config.num_nextn_predict_layers:
        config = config.replace(num_nextn_predict_layers=0)
        weights = drop_mtp_layers(weights, config)
    weights = add_mtp_embedding_copies(unstack_experts(weights, config), config)
    if dtype:
        target = compute_dtype(dtype)
        weights = {k: v.astype(mx.float32 if _keep_fp32(k) else target) if mx.issubdtype(v.dtype, mx.floating)
                   else v for k, v in weights.items()}  # packed quantized weights stay uint32
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for k in sorted(weights, key=_natural_key):
        if shards[-1] and size + weights[k].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = weights[k]
        size += weights[k].nbytes
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        _atomic_write(path / "model.safetensors",
                      lambda f: mx.save_safetensors(f, shards[0], metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_write(path / name, lambda f, s=shard: mx.save_safetensors(f, s, metadata={"format": "pt"}))
            weight_map.update({k: name for k in shard})
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
        _atomic_write(path / "model.safetensors.index.json",
                      lambda f: Path(f).write_text(json.dumps(index, indent=2) + "\n"))
    _atomic_write(path / "config.json", lambda f: save_config(config, Path(f).parent, name=Path(f).name))


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
