"""One-call loading: a model directory or hub id, or a size preset with random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import backend
from .config import DATA_DIR, load_config, load_preset
from .model import Model
from .quant import QuantConfig, quantize_model
from .checkpoint.weights import check_fits, load_model, memory_check, random_model, resolve_path
from .device import compute_dtype
from .progress import note


def _tokenizer(path: Path, vocab_size: int) -> Any:
    from .tokenizer import load_tokenizer
    return load_tokenizer(path, vocab_size=vocab_size)


def load(path: str | Path, *, dtype: str | None = None, bits: int | None = None, group_size: int | None = None
         ) -> tuple[Model, Any]:
    """(model, tokenizer) from a model directory (or hub repo id); tokenizer is None if the directory has none.
    `bits` quantizes a float or FP8 checkpoint to MLX's affine 4/8-bit as it is read (`load_model`).
    A tokenizer with more pieces than the model's vocab_size is refused before the weights are read."""
    backend.setup()
    qc = QuantConfig(bits, group_size) if bits else None
    path = resolve_path(path, before_download=memory_check(dtype, str(path), qc))
    tokenizer = _tokenizer(path, load_config(path).vocab_size)
    return load_model(path, dtype=dtype, bits=bits, group_size=group_size), tokenizer


def load_preset_model(name: str, *, seed: int = 0, dtype: str | None = None, bits: int | None = None,
                      group_size: int | None = None) -> tuple[Model, Any]:
    """An untrained model from `parameters/NAME.json` with the bundled sample tokenizer (quantized with `bits`):
    its output is noise until trained. Building the weights reports progress (`dh_mlx.progress`)."""
    backend.setup()
    config = load_preset(name)
    tokenizer = _tokenizer(DATA_DIR / "tokenizer", config.vocab_size)
    check_fits(config, compute_dtype(dtype), f"preset {name!r}")
    note(f"preset {name!r} with random (untrained) weights, seed {seed}; output is noise until trained "
         "(dh-mlx train)")
    model = random_model(config, seed=seed, dtype=dtype, name=f"preset {name!r}")
    if bits:
        quantize_model(model, QuantConfig(bits, group_size))
    return model, tokenizer


def load_pipelined(path: str | Path, *, dtype: str | None = None) -> tuple[Any, Any]:
    """(this rank's part of the model, tokenizer) for pipeline-parallel generation under `mlx.launch`: the
    decoder layers split evenly over the ranks, each rank reading only its own weights
    (`generation.pipeline`)."""
    import mlx.core as mx
    from .device import compute_dtype
    from .generation.pipeline import PipelineModel, split_layers
    backend.setup()
    group = mx.distributed.init()
    path = resolve_path(path)
    config = load_config(path)
    own = split_layers(config.num_hidden_layers, group.size())[group.rank()]
    tokenizer = _tokenizer(path, config.vocab_size)
    model = load_model(path, dtype=dtype, layers=own)
    return PipelineModel(model, group, own, compute_dtype(dtype)), tokenizer
