"""Reading a DeepSeek-V4 model directory (release or transformers layout, float or FP8 with V4's block scales,
or MLX-quantized as `dh-mlx quantize` writes it) into dh_mlx.model.v4_model.V4Model, with the MTP modules the
release ships; quantizing one as it is read (V4QuantizedStream: the V4 hooks of checkpoint/streaming.py)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config_v4 import V4Config
from ..model.v4_model import V4Model
from ..quant import QuantConfig, kept_float, quantize_like
from ..device import compute_dtype
from .layout import (CheckpointError, check_tensors, dequantize_fp8, dequantized_config, fp8_blocks, stack_experts,
                     unstack_experts)
from .shards import DEFAULT_SHARD_BYTES, ShardWriter
from .streaming import QuantizedStream, decode_fp8, lazy_tensors, quantized_weights
from .v4_layout import e8m0_scales, keep_fp32, release_name

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def fp8_format(config: V4Config, where: Path) -> tuple[int, int] | None:
    """FP8 block size when the release is FP8 (scales float or UE8M0); FP4 experts are refused by name."""
    qc = config.extra.get("quantization_config") or {}
    expert = qc.get("expert_dtype", config.extra.get("expert_dtype"))
    if expert not in (None, "fp8", "bf16", "bfloat16"):
        raise CheckpointError(f"{where}: quantization_config.expert_dtype {expert!r}: V4's FP4 experts are not "
                              "supported; dh-mlx reads its float and FP8 weights")
    return fp8_blocks(config, where)


def mtp_config(config: V4Config, weights: dict, where: Path) -> V4Config:
    """`config` with the MTP modules the checkpoint ships: all it declares, or none (transformers saves none)."""
    n, k = config.num_hidden_layers, config.num_nextn_predict_layers
    present = {int(m[1]) - n for name in weights if (m := _LAYER.match(name)) and int(m[1]) >= n}
    if k and not present:
        warnings.warn(f"{where}: config.json declares {k} MTP module(s) but the checkpoint has none (mtp.*); "
                      "loading without MTP")
    if not present:
        return config.replace(num_nextn_predict_layers=0)
    missing = sorted(set(range(k)) - present)
    if missing:
        raise CheckpointError(f"{where}: config.json declares {k} MTP modules (num_nextn_predict_layers) but the "
                              f"checkpoint has no tensors of mtp.{missing[0]}")
    return config


class V4QuantizedStream(QuantizedStream):
    """QuantizedStream over a V4 directory: V4's names, FP8 scales and modules; the output keeps transformers'
    module names (what load_v4_model reads back), one tensor per expert, the hash tables as int32."""

    def _fp8_blocks(self, config: V4Config) -> tuple[int, int] | None:
        return fp8_format(config, self.path)

    def _other_dtype_ok(self, name: str, dtype: str) -> bool:
        return ((name.endswith("tid2eid") and dtype in ("I64", "I32"))
                or (self.block is not None and name.endswith("_scale_inv") and dtype in ("F8_E8M0", "U8")))

    def _source_config(self, config: V4Config) -> V4Config:
        return mtp_config(config, self.lazy, self.path)

    def _model(self, config: V4Config) -> V4Model:
        return V4Model(config)

    def _float(self, w: dict[str, mx.array]) -> dict[str, mx.array]:
        return super()._float(e8m0_scales(w, self.dtypes, mx))

    def _kept_float(self, model: nn.Module, modules: dict) -> list[str]:
        """The matrices left in float: modules the plan skips (the routers, the indexer's head weights, ...)
        and V4's matrices that are no linear's (hyper-connection mixings, compressor position biases)."""
        other = {p: a.shape for p, a in tree_flatten(model.parameters())
                 if a.ndim >= 2 and not p.endswith(".weight") and mx.issubdtype(a.dtype, mx.floating)}
        return sorted(super()._kept_float(model, modules) + kept_float(dict.fromkeys(other, False), other))

    def memory_layout(self, w: dict[str, mx.array], config: V4Config) -> dict[str, mx.array]:
        """Experts stacked, MTP modules past those kept (`mtp=False`) left out."""
        last = config.num_hidden_layers + config.num_nextn_predict_layers
        w = {k: v for k, v in w.items() if not ((m := _LAYER.match(k)) and int(m[1]) >= last)}
        return stack_experts(w, config, mx.stack)

    def _file_layout(self, w: dict[str, mx.array]) -> dict[str, mx.array]:
        return w

    def _keep_fp32(self, name: str) -> bool:
        return keep_fp32(name)


def _read(path: Path, config: V4Config, dtype: mx.Dtype) -> tuple[V4Config, dict[str, mx.array]]:
    """(config with the MTP modules present, the tensors renamed, FP8 dequantized one at a time, experts
    stacked)."""
    block = fp8_format(config, path)
    weights, dtypes = lazy_tensors(path, config=config)
    weights = e8m0_scales(weights, dtypes, mx)
    if block is not None:
        def finish(a: mx.array) -> mx.array:
            a = a.astype(dtype)
            mx.eval(a)
            return a
        weights = dequantize_fp8(weights, dtypes, block, decode_fp8, mx, path, finish)
    raw = [k for k, v in weights.items() if v.dtype == mx.uint8]
    if raw:
        raise CheckpointError(f"{path}: tensor {raw[0]} holds FP8 bytes without block scales")
    weights = stack_experts(weights, config, mx.stack)
    return mtp_config(config, weights, path), weights


def load_v4_model(path: Path, config: V4Config, dtype: mx.Dtype, qc: QuantConfig | None = None) -> V4Model:
    """The directory's tensors in a V4Model at `dtype` (with `qc`, quantized as they are read, one layer at a
    time); what transformers keeps in float32 stays float32, the hash tables int32, packed weights packed."""
    if qc is not None:
        config, weights = quantized_weights(path, config, qc, dtype, V4QuantizedStream)
    else:
        config, weights = _read(path, config, dtype)
    model = V4Model(config)
    quantization = config.extra.get("quantization")  # written by `dh-mlx quantize` (mlx-lm's block)
    if quantization is not None:
        try:
            quantize_like(model, quantization, weights)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    check_tensors({k: v.shape for k, v in weights.items()},
                  {k: v.shape for k, v in tree_flatten(model.parameters())}, path)
    weights = {k: v.astype(mx.int32) if k.endswith("tid2eid") else
               v.astype(mx.float32 if keep_fp32(k) else dtype) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in weights.items()}
    finite = {k: mx.isfinite(v).all() for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}
    mx.eval(list(finite.values()))
    bad = [k for k, ok in finite.items() if not ok.item()]
    if bad:
        raise CheckpointError(f"{path}: tensor {bad[0]} holds NaN or infinite values")
    tables = [k for k in weights if k.endswith("tid2eid")]
    for k in tables:
        t = weights[k]
        if t.size and (mx.min(t).item() < 0 or mx.max(t).item() >= config.n_routed_experts):
            raise CheckpointError(f"{path}: tensor {k} names experts outside 0..{config.n_routed_experts - 1}")
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def save_v4_model(model: V4Model, path: Path, *, mtp: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  dtype: str | None = None) -> None:
    """Write a float V4 model in the release layout transformers' DeepseekV4ForCausalLM loads (its names, one
    tensor per expert, the hash tables int64 as it saves them), the MTP modules under DeepSeek's `mtp.*`
    (`mtp=False`: left out). What transformers keeps in float32 stays float32. A quantized model is written
    as `dh-mlx quantize` writes it (transformers' module names, packed weights with scales and biases)."""
    config = dequantized_config(model.config)  # FP8 weights were read as float
    packed = config.extra.get("quantization") is not None
    if not packed:
        config = config.replace(extra={k: v for k, v in config.extra.items() if k != "quantization_config"})
    weights = dict(tree_flatten(model.parameters()))
    if not mtp and config.num_nextn_predict_layers:
        last = config.num_hidden_layers
        weights = {k: v for k, v in weights.items() if not ((m := _LAYER.match(k)) and int(m[1]) >= last)}
        config = config.replace(num_nextn_predict_layers=0)
    target = compute_dtype(dtype) if dtype else None
    out = {}
    for k, v in unstack_experts(weights, config).items():
        if k.endswith("tid2eid"):
            v = v.astype(mx.int32 if packed else mx.int64)
        elif target is not None and mx.issubdtype(v.dtype, mx.floating):
            v = v.astype(mx.float32 if keep_fp32(k) else target)
        out[k if packed else release_name(k, config.num_hidden_layers)] = v
    writer = ShardWriter(path, max_shard_bytes)
    writer.add(out)
    writer.finish(config)
