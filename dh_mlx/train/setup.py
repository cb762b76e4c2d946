"""What `train`, `lora` and `domains add` do before their first step: the backend set up for training, the
ranks found, the run directory checked (by rank 0), the tokenizer loaded, and the data opened and described."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import backend
from ..outputs import OutputError, check_output_dir
from ..progress import status
from .config import TrainConfig
from .data import describe_dataset
from .distributed import World, on_main, world
from .prepared import open_dataset


def check_run_dir(out: str | Path, *, resume: bool, force: bool, inputs: list) -> Path:
    """A run directory to train into: with `resume`, one holding a run; otherwise empty or absent unless
    `force` (which starts the run afresh there)."""
    out = Path(out)
    if resume:
        if not (out / "checkpoints").is_dir():
            raise OutputError(f"{out}: holds no run to resume (no checkpoints/); drop `resume` to start one")
        return out
    if (out / "checkpoints").is_dir() and not force:
        raise OutputError(f"{out}: holds a run (checkpoints/); pass `resume=True` to continue it, `force=True` to "
                          "start afresh, or choose another `out`")
    return check_output_dir(out, inputs=inputs, force=force)


@dataclass
class Run:
    out: Path
    w: World  # this process's rank among the data-parallel ones (rank 0 writes)
    tokenizer: Any

    def open_data(self, data: str | Path, cfg: TrainConfig, domains: list[str] | None, **kw):
        """The training and validation data, described on rank 0's status line; `kw` as `open_dataset`'s."""
        dataset = open_dataset(data, self.tokenizer, seq_len=cfg.seq_len, domains=domains,
                               val_fraction=cfg.val_fraction, seed=cfg.seed, skip_invalid=cfg.skip_invalid, **kw)
        if self.w.main:
            status(describe_dataset(data, dataset, cfg.seq_len, cfg.val_fraction))
        return dataset


def start_run(out: str | Path, *, tokenizer: str | Path, inputs: list, resume: bool, force: bool,
              vocab_size: int | None = None) -> Run:
    """Set up a training run into `out` (`inputs`: what it reads, which `out` must not hold), its tokenizer the
    one in `tokenizer` (checked against `vocab_size` when given)."""
    from ..tokenizer import load_tokenizer
    backend.setup(training=True)  # before MLX's first eval: the step may then split over both CPU streams
    w = world()  # under mlx.launch: one of several data-parallel ranks
    out = Path(out)
    on_main(w, check_run_dir, out, resume=resume, force=force, inputs=[tokenizer, *inputs])
    tok = load_tokenizer(tokenizer, vocab_size=vocab_size)
    if tok is None:
        raise ValueError(f"{tokenizer}: no tokenizer.model or tokenizer.json (pass `tokenizer`)")
    return Run(out, w, tok)
