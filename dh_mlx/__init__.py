"""dh-mlx: Darkhorse Genesis (DeepSeek-V3-style MoE with MLA) on Apple's MLX."""

import importlib.util

from . import _blas, _jit

_jit.enable()  # vectorised mx.compile kernels on the CPU (Linux); before MLX compiles anything
_blas.load_fast_blas()  # must precede the first `import mlx.core` (Linux CPU speed)

from .config import DomainRouting, ModelConfig, load_config, load_preset  # noqa: E402
from .layout import CheckpointError  # noqa: E402

__all__ = ["ModelConfig", "DomainRouting", "CheckpointError", "load_config", "load_preset"]
__version__ = "0.1.0"

# A CUDA box may run only the PyTorch twin (dh_mlx.torch), which needs the config and layout above, not MLX.
if importlib.util.find_spec("mlx") is not None:
    from .api import load, load_preset_model  # noqa: E402
    from .generate import generate, generate_tokens, stream_generate  # noqa: E402
    from .model import Model  # noqa: E402
    from .weights import load_model, random_model, save_model  # noqa: E402

    __all__ += ["Model", "load_model", "save_model", "random_model", "load", "load_preset_model", "generate",
                "generate_tokens", "stream_generate"]
