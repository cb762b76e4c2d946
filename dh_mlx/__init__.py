"""dh-mlx: Darkhorse Genesis (DeepSeek-V3-style MoE with MLA) on Apple's MLX.

Importing the package does one thing on Linux: it loads an optimised BLAS, which must happen before MLX is
first imported (`DH_MLX_BLAS=off` to skip; see docs/internals.md). It imports neither MLX nor PyTorch; the
names below load their modules on first use. `dh_mlx.backend.setup()` sets the rest of the process up.
"""

import importlib

from .backend.cpu import blas as _blas

_blas.load_fast_blas()

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "config", "DomainRouting": "config", "load_config": "config", "load_preset": "config",
    "CheckpointError": "checkpoint.layout", "load": "api", "load_preset_model": "api", "Model": "model",
    "load_model": "checkpoint.weights", "save_model": "checkpoint.weights", "random_model": "checkpoint.weights",
    "generate": "generation", "generate_tokens": "generation", "stream_generate": "generation",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dh_mlx' has no attribute {name!r}")
