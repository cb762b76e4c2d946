"""Reading a DeepSeek-V4 model directory (release or transformers layout, float or FP8 with V4's block scales)
into dh_mlx.model.v4_model.V4Model, with the MTP modules the release ships."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config_v4 import V4Config
from ..model.v4_model import V4Model
from .layout import CheckpointError, check_tensors, dequantize_fp8, fp8_blocks, stack_experts
from .streaming import decode_fp8, lazy_tensors
from .v4_layout import e8m0_scales, keep_fp32

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


def load_v4_model(path: Path, config: V4Config, dtype: mx.Dtype) -> V4Model:
    """The directory's tensors (renamed, FP8 dequantized one at a time, experts stacked) in a V4Model at
    `dtype`; what transformers keeps in float32 stays float32, the hash tables int32."""
    if config.extra.get("quantization") is not None:
        raise CheckpointError(f"{path}: an MLX-quantized deepseek_v4 model; dh-mlx reads V4's float and FP8 "
                              "checkpoints")
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
    model = V4Model(mtp_config(config, weights, path))
    check_tensors({k: v.shape for k, v in weights.items()},
                  {k: v.shape for k, v in tree_flatten(model.parameters())}, path)
    weights = {k: v.astype(mx.int32) if k.endswith("tid2eid") else
               v.astype(mx.float32 if keep_fp32(k) else dtype) for k, v in weights.items()}
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
