"""The PyTorch twin of dh_mlx: the same config and checkpoint directory, the same numbers, on CUDA or CPU.

Nothing here imports MLX; the twin needs only `dh_mlx.config`, the training options (`dh_mlx.train.config`,
the one `TrainConfig` both trainers read) and the package importable.
"""

from ..train.config import TrainConfig
from .cache import LatentCache, make_cache
from .export import config_from_export, export_model, state_dict_from_export
from .generate import decode_step, generate_greedy, prefill
from .model import Model, Output
from .moe import Routing
from .optim import AdamW, learning_rate
from .step import Batch, alf_update, balance_loss, document_mask, loss_terms, make_optimizer, train_step
from .weights import CheckpointError, load_model, random_model, save_model

__all__ = ["Model", "Output", "Routing", "LatentCache", "make_cache", "load_model", "save_model", "random_model",
           "CheckpointError", "prefill", "decode_step", "generate_greedy", "TrainConfig", "Batch", "document_mask",
           "loss_terms", "balance_loss", "alf_update", "AdamW", "learning_rate", "make_optimizer", "train_step",
           "export_model", "state_dict_from_export", "config_from_export"]
