"""`dh-mlx domains extract` and `dh-mlx domains remove` on model directories (the selection: dh_mlx.domains)."""

from __future__ import annotations

from pathlib import Path

from ..domains import extract, remove
from ..model import Model
from ..outputs import check_output_dir
from .layout import stored_dtype
from .weights import copy_tokenizer, load_model, resolve_path, save_model


def _run(op, model_dir: str | Path, name: str, out: str | Path, force: bool) -> Model:
    src = resolve_path(model_dir)
    check_output_dir(out, inputs=[src], force=force)
    model = op(load_model(src, dtype="float32"), name)
    save_model(model, out, dtype=stored_dtype(src))  # the source's dtype: every value round-trips exactly
    copy_tokenizer(src, Path(out))
    return model


def extract_domain(model: str | Path, name: str, out: str | Path, *, force: bool = False) -> Model:
    """`dh-mlx domains extract`: write domain `name` of the model directory `model` as a standalone
    DeepSeek-V3 directory `out` (tokenizer copied)."""
    return _run(extract, model, name, out, force)


def remove_domain(model: str | Path, name: str, out: str | Path, *, force: bool = False) -> Model:
    """`dh-mlx domains remove`: write the model directory `model` without domain `name` into `out`."""
    return _run(remove, model, name, out, force)
