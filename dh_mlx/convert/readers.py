"""Read a PyTorch weights file of any of the kinds people hand us into `{name: tensor}`.

Kinds, told apart by content rather than suffix: safetensors; a torch.export `.pt2` artifact (ours, with its
config inside); a TorchScript archive (a zip with `constants.pkl` and `code/`, what `torch.jit.save` and
Rust's tch-rs `VarStore::save` write, often as `.pt` or `.ot`); a pickled state_dict (`torch.save`, `.pt`,
`.bin`, `.pth`), read with `weights_only=True`. Nothing in any of them runs: the archives' tensors are read
by `torch_archive`; PyTorch's own loaders for them, which execute the file's code, only with `trust_code`.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..checkpoint.layout import to_file_layout
from .errors import ConvertError
from .torch_archive import RawTensor, read_export_archive, read_pickle_archive
from ..files import LIMITS, FileKindError, regular_file


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _is_export(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/archive_format") for n in z.namelist())  # torch.export's PT2 archive


def _export_config(path: Path) -> ModelConfig:
    """The config.json export_model stores beside the program (read from the zip: a second
    torch.export.load would cost seconds)."""
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith("/extra/config.json")), None)
        if name is None:
            raise ConvertError(f"{path}: exported program has no config.json (not written by export_model?)")
        if z.getinfo(name).file_size > LIMITS["config"]:
            raise ConvertError(f"{path}: {name} would inflate to {z.getinfo(name).file_size:,} bytes; a config "
                               f"may have at most {LIMITS['config']:,}")
        return ModelConfig.from_dict(json.loads(z.read(name)))


def _torch():
    try:
        import torch
    except ImportError:
        raise ConvertError("reading PyTorch files needs torch: pip install 'dh-mlx[torch]'") from None
    return torch


def _state_dict_of(obj: Any, path: Path) -> dict:
    """A mapping of tensors, unwrapping the usual {'state_dict': ...} / {'model': ...} checkpoint wrappers."""
    torch = _torch()
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConvertError(f"{path}: expected a state_dict (a mapping of names to tensors), got "
                           f"{type(obj).__name__}")
    return obj


def _as_arrays(tensors: dict[str, RawTensor]) -> dict[str, Any]:
    import mlx.core as mx
    return {k: mx.array(t.array).view(mx.bfloat16) if t.dtype == "bfloat16" else mx.array(t.array)
            for k, t in tensors.items()}


def read_weights_file(path: str | Path, *, trust_code: bool = False) -> tuple[dict[str, Any], ModelConfig | None]:
    """({name: torch tensor or mx array}, the config stored in the file or None). `trust_code` reads
    TorchScript and torch.export archives with PyTorch's loaders, which run code from the file."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file")
    try:
        regular_file(path)
    except FileKindError as e:
        raise ConvertError(str(e)) from None
    if path.suffix == ".safetensors":
        import mlx.core as mx
        try:
            return dict(mx.load(str(path))), None
        except Exception as e:  # MLX raises RuntimeError/ValueError on a truncated or foreign file
            raise ConvertError(f"{path}: cannot read safetensors file: {e}") from None
    if _is_export(path) and not trust_code:
        config = _export_config(path)
        return to_file_layout(_as_arrays(read_export_archive(path)), config), config
    if _is_torchscript(path) and not trust_code:
        # names are normalised: '|' stands for '.' where a writer could not put dots in an attribute name
        return {k.replace("|", "."): v for k, v in _as_arrays(read_pickle_archive(path)).items()}, None
    torch = _torch()
    if _is_export(path):  # torch.export.load rebuilds the program: it runs the archive's code
        config = _export_config(path)
        state = torch.export.load(str(path)).state_dict
        return to_file_layout({k: v.detach().cpu() for k, v in state.items()}, config), config
    if _is_torchscript(path):
        # torch.load would hand back a RecursiveScriptModule (which has no .items()); its state_dict is what we want
        module = torch.jit.load(str(path), map_location="cpu")
        # names are normalised: '|' stands for '.' where a writer could not put dots in an attribute name
        return {k.replace("|", "."): v for k, v in module.state_dict().items()}, None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, or weights_only refusing arbitrary objects
        raise ConvertError(f"{path}: not a PyTorch state_dict that loads with weights_only=True: "
                           f"{str(e).splitlines()[0]}") from None
    return dict(_state_dict_of(obj, path)), None
