"""Quantized copies of model directories: `dh-mlx quantize` (the transform itself is dh_mlx.quant)."""

from __future__ import annotations

from pathlib import Path

from ..outputs import check_output_dir
from ..quant import QuantConfig, bits_per_weight, is_quantized, quantize_model
from .weights import copy_tokenizer, load_model, resolve_path, save_model


def dir_bytes(path: str | Path) -> int:
    """Bytes of a model directory's weight files."""
    return sum(f.stat().st_size for f in Path(path).glob("model*.safetensors"))


def quantize(model: str | Path, out: str | Path, *, bits: int = 4, group_size: int = 64, recipe: str = "uniform",
             mtp: bool = True, force: bool = False) -> dict:
    """Write a quantized copy of the model directory `model` into `out` (tokenizer files copied); `out` must
    not be `model`, and must be empty unless `force`.

    `mtp=False` drops the MTP modules (mlx-lm loads MTP layers only at DeepSeek-V3's index 61).
    Returns a summary: bits per weight and bytes on disk before and after.
    """
    qc = QuantConfig(bits, group_size, recipe)
    src = resolve_path(model)
    check_output_dir(out, inputs=[src], force=force)
    m = load_model(src, dtype="float32")
    if is_quantized(m):
        raise ValueError(f"{src}: already quantized; quantize its float checkpoint instead")
    quantize_model(m, qc)
    save_model(m, out, mtp=mtp)
    copy_tokenizer(src, Path(out))
    return {"bits": bits, "group_size": group_size, "recipe": recipe, "bits_per_weight": bits_per_weight(m),
            "bytes": dir_bytes(out), "source_bytes": dir_bytes(src)}
