"""Import weights from a PyTorch file (ours or DeepSeek's official names) into our model directory."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import ModelConfig, load_config
from ..model import Model
from ..outputs import check_output_dir
from ..tokenizer import load_tokenizer, write_hf_files
from ..checkpoint.layout import drop_mtp_embedding_copies, drop_rotary_buffers, split_fused_experts, stack_experts
from ..checkpoint.weights import check_values, save_model
from .errors import ConvertError
from .names import rename
from .readers import read_weights_file

# File layout (one tensor per expert, MTP embedding copies) -> modules; as load_model, except that layers past
# the configured MTP count are reported, not dropped.
IMPORT_TRANSFORMS = (drop_rotary_buffers, drop_mtp_embedding_copies, split_fused_experts)
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _as_mx(t: Any) -> mx.array:
    if isinstance(t, mx.array):
        return t
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    return mx.array(t.detach().cpu().numpy())


def _dtype_name(a: mx.array) -> str:
    return str(a.dtype).rsplit(".", 1)[-1]


def to_checkpoint_names(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Official DeepSeek names -> ours (others pass through); also {our name: the name in the file}."""
    out, source = {}, {}
    for name, t in state.items():
        ours = rename(name, "official", "ours") or name
        out[ours] = t
        source[ours] = name
    return out, source


def _listing(names: list[str], source: dict[str, str] | None = None) -> str:
    shown = [f"{n} (in the file: {source[n]})" if source and source.get(n, n) != n else n for n in names[:12]]
    return ", ".join(shown) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")


def check_names(weights: dict[str, mx.array], model: Model, source: dict[str, str], where: Path) -> None:
    """ConvertError listing missing, unexpected and misshapen tensors (in our names, with the file's)."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(weights) & set(expected) if tuple(weights[k].shape) != tuple(expected[k].shape))
    parts = ([f"missing tensors: {_listing(missing)}"] if missing else []) + (
        [f"unexpected tensors: {_listing(unexpected, source)}"] if unexpected else []) + (
        ["wrong shapes: " + ", ".join(f"{k} {tuple(weights[k].shape)} (config implies "
                                       f"{tuple(expected[k].shape)})" for k in wrong[:12])] if wrong else [])
    if parts:
        raise ConvertError(f"{where}: does not match the config: " + "; ".join(parts))


def import_checkpoint(input: str | Path, out: str | Path, *, config: str | Path | ModelConfig | None = None,
                      tokenizer: str | Path | None = None, dtype: str | None = None,
                      trust_code: bool = False, force: bool = False) -> Path:
    """Read `input` (state_dict .pt/.bin, .safetensors, TorchScript .pt/.ot, torch.export .pt2) with our or
    DeepSeek's official tensor names, check it against `config` (a config.json, a directory holding one, or
    a ModelConfig; a .pt2 carries its own), and write our model directory at `out`.

    `tokenizer`: a directory with tokenizer.model to copy along. `dtype`: as stored unless given. Nothing
    in the file runs, unless `trust_code` (PyTorch's own TorchScript / torch.export loaders: a trusted file only).
    """
    input = Path(input)
    out = check_output_dir(out, inputs=[input, None if isinstance(config, ModelConfig) else config, tokenizer],
                           force=force)
    state, stored_config = read_weights_file(input, trust_code=trust_code)
    if isinstance(config, ModelConfig):
        cfg = config
    elif config is not None:
        cfg = load_config(config)
    elif stored_config is not None:
        cfg = stored_config
    else:
        raise ConvertError(f"{input}: the file carries no config; give one (`config`, a config.json)")
    named, source = to_checkpoint_names(state)
    weights = {k: _as_mx(v) for k, v in named.items()}
    check_values(weights, input)  # as loading does: float tensors, no NaN or infinity
    dtype = dtype or Counter(_dtype_name(v) for v in weights.values()
                             if mx.issubdtype(v.dtype, mx.floating)).most_common(1)[0][0]
    if dtype not in _DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    for transform in IMPORT_TRANSFORMS:
        weights = transform(weights, cfg)
    weights = stack_experts(weights, cfg, mx.stack)
    model = Model(cfg)
    check_names(weights, model, source, input)
    model.load_weights(list(weights.items()))
    save_model(model, out, dtype=dtype)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if tok is None:
            raise ConvertError(f"{tokenizer}: no tokenizer.model in this directory")
        write_hf_files(tok, out)
    return out
