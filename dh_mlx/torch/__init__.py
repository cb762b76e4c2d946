"""The PyTorch twin of dh_mlx: the same config and checkpoint directory, the same numbers, on CUDA or CPU.

Nothing here imports MLX; the twin needs only `dh_mlx.config` (and the package importable).
"""

from .cache import LatentCache, make_cache
from .export import config_from_export, export_model, state_dict_from_export
from .generate import decode_step, generate_greedy, prefill
from .model import Model, Output
from .moe import Routing
from .step import TrainConfig, alf_update, balance_loss, loss_terms, make_optimizer, train_step
from .weights import CheckpointError, load_model, random_model, save_model

__all__ = ["Model", "Output", "Routing", "LatentCache", "make_cache", "load_model", "save_model", "random_model",
           "CheckpointError", "prefill", "decode_step", "generate_greedy", "TrainConfig", "loss_terms",
           "balance_loss", "alf_update", "make_optimizer", "train_step", "export_model", "state_dict_from_export",
           "config_from_export"]
