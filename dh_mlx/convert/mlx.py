"""A quantized copy of a model directory in mlx-lm's format: `dh-mlx quantize` (or `dh-mlx convert mlx`, the
same command), one decoder layer in memory at a time. The transform is dh_mlx.quant; the streaming, shared
with quantizing on load, is dh_mlx.checkpoint.streaming."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.shards import DEFAULT_SHARD_BYTES, ShardWriter
from ..checkpoint.streaming import QuantizedStream
from ..checkpoint.v4_weights import V4QuantizedStream
from ..checkpoint.weights import copy_tokenizer, resolve_path
from ..config import load_config
from ..device import compute_dtype
from ..outputs import check_output_dir
from ..progress import note
from ..quant import QuantConfig


def dir_bytes(path: str | Path) -> int:
    """Bytes of a model directory's weight files."""
    return sum(f.stat().st_size for f in Path(path).glob("model*.safetensors"))


def quantize(model: str | Path, out: str | Path, *, bits: int = 4, group_size: int | None = None,
             recipe: str = "uniform", mtp: bool = True, dtype: str | None = None,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False) -> dict:
    """Write a quantized copy of the model directory (or hub id) `model` into `out`, in mlx-lm's format
    (tokenizer files copied), reading and writing one decoder layer at a time; `out` must not be `model`, and
    must be empty unless `force`.

    `group_size` None picks, per matrix, the largest of 128, 64 and 32 that divides its input width.
    `dtype` stores the float tensors and the scales (default: the source's dtype, bfloat16 for FP8).
    `mtp=False` drops the MTP modules, as mlx-lm needs (its loader drops MTP layers only at DeepSeek-V3's index
    61 and refuses others).
    Returns a summary: bits per weight, bytes on disk before and after, and the matrices kept in float.
    """
    qc = QuantConfig(bits, group_size, recipe)
    src = resolve_path(model)
    check_output_dir(out, inputs=[src], force=force)
    config = load_config(src)
    stream_type = V4QuantizedStream if config.model_type == "deepseek_v4" else QuantizedStream
    stream = stream_type(src, config, qc, mtp=mtp, dtype=compute_dtype(dtype) if dtype else None)
    writer = ShardWriter(out, max_shard_bytes)
    for tensors in stream.layers():
        writer.add(tensors)
        del tensors
    copy_tokenizer(src, Path(out))  # before config.json, the last file: a directory with one is complete
    writer.finish(stream.config)
    if stream.config.model_type == "deepseek_v4":
        note(f"{out}: deepseek_v4 in transformers' module names; dh-mlx loads it (mlx-lm has no deepseek_v4)")
    elif stream.config.num_nextn_predict_layers:
        note(f"{out}: keeps the MTP layers (for MTP drafting); mlx-lm loads a copy written with `mtp=False`")
    return {"bits": bits, "group_size": group_size, "recipe": recipe, "bits_per_weight": stream.bits_per_weight(),
            "bytes": dir_bytes(out), "source_bytes": dir_bytes(src), "kept_float": stream.kept_float}
