"""Our in-memory tensors -> llama.cpp `deepseek2` tensors: one function per transform, then the encoding.

Legend: H heads, n qk_nope_head_dim, p qk_rope_head_dim, v v_head_dim, r kv_lora_rank, D hidden.
"""

from __future__ import annotations

from typing import Callable

import gguf
import numpy as np

from ..config import ModelConfig
from ..rope import rope_parameters
from .errors import ConvertError
from .names import rename

Weights = dict[str, np.ndarray]  # our in-memory names (routed experts stacked) or GGUF names -> float32


def _rope_rows(name: str, config: ModelConfig) -> np.ndarray | None:
    """Indices of the output rows that become q_pe / k_pe (the two projections feeding RoPE), else None."""
    H, n, p, r = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                  config.kv_lora_rank)
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        return (np.arange(H)[:, None] * (n + p) + n + np.arange(p)).ravel()  # (H*p,)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return r + np.arange(p)  # (p,)
    return None


def interleave_rope(w: Weights, config: ModelConfig) -> Weights:
    """llama.cpp rotates adjacent pairs (DeepSeek's layout). A half-split (`rope_interleave: false`) model gets
    its q_pe/k_pe rows permuted so that pair (2i, 2i+1) holds dims (i, i+p/2): same rotation, same scores."""
    if config.rope_interleave:
        return w
    p = config.qk_rope_head_dim
    order = np.stack([np.arange(p // 2), np.arange(p // 2) + p // 2], axis=1).ravel()  # (p,) 0, p/2, 1, ...
    out = dict(w)
    for name, a in w.items():
        if (rows := _rope_rows(name, config)) is not None:
            rows = rows.reshape(-1, p)  # (heads or 1, p)
            a = a.copy()
            a[rows.ravel()] = a[rows[:, order].ravel()]
            out[name] = a
    return out


def fold_rope_magnitude(w: Weights, config: ModelConfig) -> Weights:
    """YaRN scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim); llama.cpp's deepseek2
    assumes that ratio is 1. RoPE is linear, so the factor moves exactly into the q_pe and k_pe rows."""
    _, magnitude, _ = rope_parameters(config)
    if magnitude == 1.0:
        return w
    out = dict(w)
    for name, a in w.items():
        if (rows := _rope_rows(name, config)) is not None:
            a = a.copy()
            a[rows] *= np.float32(magnitude)
            out[name] = a
    return out


def drop_mtp(w: Weights, config: ModelConfig) -> Weights:
    n = config.num_hidden_layers
    return {k: v for k, v in w.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}


def to_gguf_names(w: Weights, config: ModelConfig) -> Weights:
    out = {}
    for name, a in w.items():
        target = rename(name, "stacked", "gguf")
        if target is None:
            raise ConvertError(f"tensor {name}: no llama.cpp deepseek2 counterpart in dh_mlx.convert.names")
        out[target] = a
    return out


def split_kv_b(w: Weights, config: ModelConfig) -> Weights:
    """`attn_kv_b` [H*(n+v), r] -> `attn_k_b` [H, r, n] (transposed per head, for absorbing into q) and
    `attn_v_b` [H, v, r]: llama.cpp's MLA attends in the latent space and needs the two halves apart."""
    H, n, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    out = {}
    for name, a in w.items():
        if name.endswith(".attn_kv_b.weight"):
            kv = a.reshape(H, n + v, -1)  # (H, n+v, r)
            out[name.replace("attn_kv_b", "attn_k_b")] = np.ascontiguousarray(kv[:, :n].transpose(0, 2, 1))
            out[name.replace("attn_kv_b", "attn_v_b")] = np.ascontiguousarray(kv[:, n:])
        else:
            out[name] = a
    return out


TRANSFORMS: tuple[Callable[[Weights, ModelConfig], Weights], ...] = (
    interleave_rope, fold_rope_magnitude, to_gguf_names, split_kv_b)


def gguf_tensors(weights: Weights, config: ModelConfig, *, mtp: bool = True) -> Weights:
    """Our in-memory float32 tensors -> GGUF names and layouts (numpy shapes; GGUF stores them reversed)."""
    if not mtp:
        weights = drop_mtp(weights, config)
    for transform in TRANSFORMS:
        weights = transform(weights, config)
    return weights


# ---- encoding ---------------------------------------------------------------------------------------------
OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


# The router, as llama.cpp keeps it; and the per-head MLA matrices (small: kv_b_proj's size), because
# llama.cpp's CPU backend mishandles them in f16/q8_0 (measured with llama-cpp-python 0.3.36 on x86-64: an
# f16 attn_k_b aborts with GGML_ASSERT(cur_backend_id != -1), an f16 attn_v_b gives NaN logits).
KEEP_F32 = ("ffn_gate_inp.weight", "attn_k_b.weight", "attn_v_b.weight")


def encode(name: str, a: np.ndarray, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data, its GGML type). Vectors and the router stay float32 (as llama.cpp's own converter keeps them);
    rows that do not fill whole quantization blocks fall back to f16."""
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    kind = OUTTYPES[outtype]
    if kind == F32 or a.ndim == 1 or name.endswith(KEEP_F32):
        return a.astype(np.float32), F32
    if kind == F16:
        return a.astype(np.float16), F16
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if a.shape[-1] % block:
        return a.astype(np.float16), F16
    return gguf.quants.quantize(a.astype(np.float32), kind), kind
