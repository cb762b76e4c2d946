"""Checkpoint I/O for the twin: the same HF DeepSeek-V3 directory as dh_mlx.checkpoint.weights, no conversion.

One tensor per expert on disk, stacked `[E, out, in]` in memory; MTP layers at
`model.layers.{num_hidden_layers + i}` with an on-disk copy of the embedding that memory does not keep.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import layout
from ..config import ModelConfig, load_config, save_config
from ..files import write_atomic
from ..outputs import remove_owned
from ..progress import note
from ..checkpoint.layout import (WEIGHT_FILES, CheckpointError, check_tensors, config_for_tensors,
                                 drop_mtp_layers, keep_fp32)
from .model import Model

DEFAULT_SHARD_BYTES = 5 * 10**9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_file_layout(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Module state dict (stacked experts) -> the tensors a checkpoint directory holds, HF names."""
    return layout.to_file_layout(dict(state_dict), config)


def from_file_layout(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return layout.to_memory_layout(weights, config, torch.stack)


# ---- dtype and device --------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA and float32 on CPU unless asked, as dh_mlx.device.compute_dtype chooses for MLX."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cast_model(model: Model, dtype: torch.dtype) -> Model:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not name.endswith("inv_freq"):
            t.data = t.data.to(torch.float32 if keep_fp32(name) else dtype)
    return model


# ---- reading and writing -----------------------------------------------------------------------------------
def read_weights(path: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for f, _ in layout.shard_headers(path):  # (each checked: a tensor in two shards is refused by name)
        try:
            with safe_open(str(f), "pt") as g:
                weights.update({k: g.get_tensor(k) for k in g.keys()})
        except Exception as e:  # safetensors raises SafetensorError/OSError on truncated or corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return weights


def _check_against_model(weights: dict, model: Model, where: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors({k: tuple(v.shape) for k, v in weights.items()}, expected, where)


def empty_model(config: ModelConfig, device: torch.device) -> Model:
    """A model with uninitialised storage on `device` (no time spent on an init that loading overwrites)."""
    with torch.device("meta"):
        model = Model(config)
    return model.to_empty(device=device).init_buffers()


def model_from_state_dict(weights: dict[str, torch.Tensor], config: ModelConfig, *, device=None, dtype=None,
                          where: str | Path = "state dict") -> Model:
    """Build a twin from tensors in the checkpoint (file) layout, HF names."""
    device = torch.device(device) if device is not None else default_device()
    weights = from_file_layout(weights, config)
    model = cast_model(empty_model(config, device), resolve_dtype(dtype, device))
    _check_against_model(weights, model, Path(str(where)))
    model.load_state_dict(weights, strict=True)  # copies, converting to each parameter's dtype
    return model.eval()


def load_model(path: str | Path, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> Model:
    """Read a model directory (config.json + safetensors, HF DeepSeek-V3 names), as dh_mlx.load_model does.

    `device` defaults to CUDA when available; `dtype` to bfloat16 on CUDA and float32 on CPU (the router
    weight and its bias stay float32).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    config = load_config(path)
    if config.sparse_attention or config.model_type == "kimi_k25":
        raise CheckpointError(f"{path}: a {config.model_type} checkpoint; the PyTorch twin runs the DeepSeek-V3 "
                              "architecture without sparse attention or a multimodal wrapper (dh_mlx runs it)")
    weights = read_weights(path)
    config = config_for_tensors(config, weights, path)
    return model_from_state_dict(weights, config, device=device, dtype=dtype, where=path)


def init_weights(model: Model, seed: int = 0) -> Model:
    """Deterministic random init: N(0, initializer_range) for matrices, ones for norms, zeros for biases.

    The same rule as dh_mlx.checkpoint.weights.init_weights, not the same numbers (the generators differ).
    """
    std = model.config.initializer_range
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            parts = name.split(".")
            owner, leaf = (parts[-2] if len(parts) > 1 else ""), parts[-1]
            if name.endswith("inv_freq") or not t.is_floating_point():
                continue
            if "norm" in owner and leaf == "weight":
                t.fill_(1.0)
            elif leaf in ("bias", "e_score_correction_bias"):
                t.zero_()
            else:
                t.normal_(0.0, std, generator=gen)
    return model


def random_model(config: ModelConfig, *, seed: int = 0, device=None, dtype=None) -> Model:
    """An untrained twin from a config (e.g. a preset), deterministic by `seed` on a given device."""
    device = torch.device(device) if device is not None else default_device()
    model = init_weights(empty_model(config, device), seed)
    return cast_model(model, resolve_dtype(dtype, device)).eval()


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def save_model(model: Model, path: str | Path, *, mtp: bool = True,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write `model` as an HF DeepSeek-V3 directory, the layout dh_mlx.save_model writes.

    `mtp=False` writes an MTP-free copy (for mlx-lm).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, state = model.config, model.state_dict()
    if not mtp and config.num_nextn_predict_layers:
        config = config.replace(num_nextn_predict_layers=0)
        state = drop_mtp_layers(state, config)
    weights = to_file_layout(state, config)
    shards: list[list[str]] = [[]]
    size = 0
    for k in sorted(weights, key=_natural_key):
        nbytes = weights[k].numel() * weights[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    removed = remove_owned(path, WEIGHT_FILES + r"|config\.json")  # (config.json last again: never half a model)
    if [n for n in removed if not n.startswith(".tmp-")]:
        note(f"{path}: replacing {', '.join(removed)}")

    def write_shard(f: str, keys: list[str]) -> None:
        # Expert slices and the MTP embedding copies share storage; safetensors wants each tensor alone.
        save_file({k: weights[k].detach().to("cpu").contiguous().clone() for k in keys}, f,
                  metadata={"format": "pt"})

    if len(shards) == 1:
        write_atomic(path / "model.safetensors", lambda f: write_shard(f, shards[0]))
    else:
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_atomic(path / name, lambda f, s=keys: write_shard(f, s))
            weight_map.update({k: name for k in keys})
        total = sum(v.numel() * v.element_size() for v in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_atomic(path / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    save_config(config, path)
