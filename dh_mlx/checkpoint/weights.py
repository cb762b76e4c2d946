"""Checkpoint I/O in the Hugging Face DeepSeek-V3 layout: one tensor per expert on disk, stacked in memory.

Each transform between the file layout and our modules is one small function.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .. import backend
from ..config import ModelConfig, load_config, load_preset, preset_names
from .hub import resolve_path
from .shards import DEFAULT_SHARD_BYTES, ShardWriter
from .layout import copy_tokenizer  # noqa: F401  (re-exported: where the commands copy tokenizers from)
from .layout import (CheckpointError, check_tensors, config_for_tensors, dequantize_fp8, dequantized_config,
                     drop_mtp_layers, fp8_blocks, keep_fp32, to_file_layout, to_memory_layout)
from ..device import available_memory, compute_dtype
from ..model import Model
from ..params import count_params, weight_bytes
from ..progress import Task
from ..files import format_bytes
from ..quant import QuantConfig, quantize_like
from .streaming import decode_fp8, lazy_tensors, quantized_weights


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


# ---- reading and writing -----------------------------------------------------------------------------------
def read_weights(path: Path, config: ModelConfig | None = None, dtype: mx.Dtype = mx.float32,
                 keep: Callable[[str], bool] | None = None) -> dict[str, mx.array]:
    """The directory's tensors as stored (those `keep` accepts; none is read before), FP8 block-scaled
    weights, with `config`, dequantized to `dtype` one at a time."""
    weights, dtypes = lazy_tensors(path, keep, config)
    block = None if config is None else fp8_blocks(config, path)
    if block is not None:  # MLX reads F8_E4M3 as its bytes
        def finish(a: mx.array) -> mx.array:
            a = a.astype(dtype)
            mx.eval(a)
            return a

        weights = dequantize_fp8(weights, dtypes, block, decode_fp8, mx, path, finish)
    return weights


def check_values(weights: dict[str, mx.array], where: Path) -> None:
    """Refuse tensors the model cannot compute with: a non-float dtype (packed quantized weights excepted), and
    NaN or infinite values (one evaluation over all tensors); the first offender is named."""
    packed = {k[: -len(".scales")] + ".weight" for k in weights if k.endswith(".scales")}
    for k, v in weights.items():
        if k not in packed and not mx.issubdtype(v.dtype, mx.floating):
            raise CheckpointError(f"{where}: tensor {k} has dtype {str(v.dtype).rsplit('.', 1)[-1]}; the model "
                                  "computes in floating point (float32, bfloat16 or float16)")
    finite = {k: mx.isfinite(v).all() for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}
    mx.eval(list(finite.values()))
    bad = [k for k, ok in finite.items() if not ok.item()]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{where}: tensor {bad[0]} holds NaN or infinite values{more}")


def _check_against_model(weights: dict, model: Model, where: Path) -> None:
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_tensors({k: v.shape for k, v in weights.items()}, expected, where)


def cast_model(model: Model, dtype: mx.Dtype) -> Model:
    model.update(tree_map_with_path(
        lambda p, a: a.astype(mx.float32 if keep_fp32(p) else dtype) if mx.issubdtype(a.dtype, mx.floating)
        else a, model.parameters()))
    return model


def load_bytes(config: ModelConfig, dtype: mx.Dtype, staged: int = 0, qc: QuantConfig | None = None) -> int:
    """Memory loading a model takes: its weights at `dtype` plus `staged` bytes per parameter held besides (e.g.
    1 for FP8 weights being dequantized), or with `qc` its size once quantized on load."""
    c = config
    counts = count_params(c)
    n = counts.total + counts.mtp
    if qc is None:
        return n * (dtype.size + staged)
    # What stays float (kv_b_proj, the routers) at the compute dtype; while a layer's experts are stacked they
    # are held twice; the largest float32 matrix read (the embedding) besides.
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    kept = layers * (c.n_routed_experts or 0) * c.hidden_size
    if c.model_type != "deepseek_v4":  # (V4 has no kv_b_proj; its hyper-connections are small)
        kept += layers * c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
    group = qc.group_size or 32  # chosen per matrix: at most the bytes of the smallest groups
    layer = weight_bytes(n // max(c.num_hidden_layers, 1), qc.bits, group)
    return (weight_bytes(n - kept, qc.bits, group) + kept * max(dtype.size, 4) + 2 * layer
            + 8 * c.vocab_size * c.hidden_size)


def check_fits(config: ModelConfig, dtype: mx.Dtype, what: str, staged: int = 0, qc: QuantConfig | None = None
               ) -> None:
    """Refuse, before allocating, a model whose weights cannot fit in this machine's free memory (`load_bytes`)."""
    counts = count_params(config)
    n = counts.total + counts.mtp
    need = load_bytes(config, dtype, staged, qc)
    have = available_memory()
    if need <= 0.9 * have:
        return
    options = []
    if dtype.size > 2 and n * 2 <= 0.9 * have:
        options.append(f"`dtype=\"bfloat16\"` ({format_bytes(n * 2, 'GiB')}; slow on a CPU)")
    if not what.startswith("preset"):  # a checkpoint on disk can be quantized; a random preset has none to read
        options += [f"`bits={bits}` or a copy quantized once with dh-mlx quantize "
                    f"({format_bytes(weight_bytes(n, bits), 'GiB')})"
                    for bits in (8, 4) if (qc is None or bits < qc.bits) and weight_bytes(n, bits) <= 0.9 * have]

    def preset_bytes(name: str) -> int:
        p = count_params(load_preset(name))
        return (p.total + p.mtp) * dtype.size

    smaller = [p for p in preset_names() if preset_bytes(p) <= 0.9 * have]
    hint = "; ".join(filter(None, [", ".join(options), f"a smaller preset: {', '.join(smaller)}" if smaller
                                   else ""])) or "a machine with more memory"
    form = f"at {qc.bits} bits" if qc is not None else "as " + str(dtype).rsplit(".", 1)[-1]
    raise MemoryError(f"{what}: {n / 1e9:.2f} B parameters need {format_bytes(need, 'GiB')} {form}, "
                      f"but only {format_bytes(have, 'GiB')} is available; would fit: {hint}")


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
    """An untrained model from a config (e.g. a preset), deterministic by `seed`; sets the backend up."""
    backend.setup()
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    dt = compute_dtype(dtype)
    check_fits(config, dt, name)
    model = cast_model(init_weights(Model(config), seed), dt)
    parts = [model.model.embed_tokens, *model.model.layers, model]  # (the rest: norm, head)
    with Task("building random weights", len(parts), "parts") as task:
        for part in parts:
            mx.eval(part.parameters())
            task.advance()
    return model


def with_mtp_module(model: Model, seed: int = 0) -> Model:
    """`model`, or when it has no MTP module a copy with one: a random block (as `init_weights` draws it) whose
    output head and its norm start as the main model's (DeepSeek-V3 shares them)."""
    if model.config.num_nextn_predict_layers:
        return model
    if model.config.extra.get("quantization"):
        raise ValueError("adding an MTP module needs a float model, not a quantized one")
    dtype = model.model.norm.weight.dtype
    new = cast_model(init_weights(Model(model.config.replace(num_nextn_predict_layers=1)), seed), dtype)
    new.load_weights(tree_flatten(model.parameters()), strict=False)
    head = new.model.mtp_layers[0].shared_head
    head.head.weight = new.lm_head.weight if "lm_head" in new else new.model.embed_tokens.weight
    head.norm.weight = new.model.norm.weight
    mx.eval(new.parameters())
    return new


def memory_check(dtype: str | None, what: str, qc: QuantConfig | None = None) -> Callable[[Path], None]:
    """check_fits for the model directory (or a hub repo's JSON files) it is given, at the size after
    quantizing on load when `qc`; a quantized model's size is not params x dtype (it was measured when
    written), so that one passes."""
    def check(d: Path) -> None:
        config = load_config(d)
        if config.extra.get("quantization") is None:
            check_fits(config, compute_dtype(dtype), what, staged=1 if fp8_blocks(config, d) else 0, qc=qc)
    return check


class Absent(nn.Module):
    """Where a module another pipeline rank holds would be (no parameters; never called)."""


def owned_by(layers: range, config: ModelConfig) -> Callable[[str], bool]:
    """Which tensors a pipeline rank holding decoder `layers` reads: theirs, the embedding on the first rank
    (and on the last when the head is tied to it), the final norm and head on the last; no MTP layers."""
    n = config.num_hidden_layers

    def keep(name: str) -> bool:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            return int(m[1]) in layers
        if name.startswith("model.embed_tokens."):
            return layers.start == 0 or (config.tie_word_embeddings and layers.stop == n)
        return layers.stop == n
    return keep


def _prune(model: Model, keep: Callable[[str], bool]) -> None:
    m = model.model
    for i in range(len(m.layers)):
        if not keep(f"model.layers.{i}.x"):
            m.layers[i] = Absent()
    for owner, name in ((m, "embed_tokens"), (m, "norm"), (model, "lm_head")):
        prefix = "" if owner is model else "model."
        if name in owner and not keep(f"{prefix}{name}.weight"):
            setattr(owner, name, Absent())


def load_model(path: str | Path, *, dtype: str | None = None, bits: int | None = None, group_size: int | None = None,
               recipe: str = "uniform", layers: range | None = None) -> Model:
    """Read a model directory (config.json + safetensors, HF DeepSeek-V3 names) or a hub repo id; sets the
    backend up (`backend.setup()`), as `dh_mlx.load` does. With `bits`, a float (or FP8) checkpoint is
    quantized as it is read, one layer at a time (as `dh-mlx quantize` would write it), so only the
    quantized model has to fit in memory. With `layers` (a pipeline rank's), only those decoder layers and
    what `owned_by` adds are read; the other modules are `Absent`."""
    backend.setup()
    dt = compute_dtype(dtype)
    qc = QuantConfig(bits, group_size, recipe) if bits else None
    if qc is not None and layers is not None:
        raise ValueError("quantizing (`bits`) a pipeline rank's layers as they load: quantize the model first "
                         "(dh-mlx quantize), then run the quantized copy in the pipeline")
    # (a pipeline rank holds only its layers: the whole model need not fit)
    path = resolve_path(path, before_download=memory_check(dtype, str(path), qc) if layers is None else None)
    config = load_config(path)
    keep = None
    v4 = config.model_type == "deepseek_v4"  # its own architecture and layout (v4_weights.py)
    if v4 and layers is not None:
        raise ValueError(f"{path}: deepseek_v4 loads whole: no pipeline")
    if layers is None:
        memory_check(dtype, str(path), qc)(path)
    if v4:
        from .v4_weights import load_v4_model
        return load_v4_model(path, config, dt, qc)
    if layers is not None:
        config = config.replace(num_nextn_predict_layers=0)
        keep = owned_by(layers, config)
    if qc is not None:
        config, weights = quantized_weights(path, config, qc, dt)
    else:
        weights = read_weights(path, config, dt, keep)
        check_values(weights, path)
        config = dequantized_config(config)  # FP8 weights are float now
        config = config_for_tensors(config, weights, path) if keep is None else config
        weights = dequantize_kv_b_proj(to_memory_layout(weights, config, mx.stack), config)
    model = Model(config)  # unevaluated: the modules pruned away never take memory
    if keep is not None:
        _prune(model, keep)
    quantization = config.extra.get("quantization")  # mlx-lm's block: {"group_size", "bits", per-layer overrides}
    if quantization is not None:
        try:
            quantize_like(model, quantization, weights)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    _check_against_model(weights, model, path)
    model.load_weights(list(weights.items()))
    cast_model(model, dt)
    mx.eval(model.parameters())
    return model


def save_model(model: Model, path: str | Path, *, mtp: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               dtype: str | None = None) -> None:
    """Write `model` as an HF DeepSeek-V3 directory. `mtp=False` writes an MTP-free copy (for mlx-lm)."""
    config = model.config
    weights = dict(tree_flatten(model.parameters()))
    if not mtp and config.num_nextn_predict_layers:
        config = config.replace(num_nextn_predict_layers=0)
        weights = drop_mtp_layers(weights, config)
    weights = to_file_layout(weights, config)
    if dtype:
        target = compute_dtype(dtype)
        weights = {k: v.astype(mx.float32 if keep_fp32(k) else target) if mx.issubdtype(v.dtype, mx.floating)
                   else v for k, v in weights.items()}  # packed quantized weights stay uint32
    writer = ShardWriter(path, max_shard_bytes)
    writer.add(weights)
    writer.finish(config)
