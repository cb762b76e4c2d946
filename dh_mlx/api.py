"""One-call loading: a model directory or hub id, or a size preset with random weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .config import DATA_DIR, load_preset
from .model import Model
from .weights import load_model, random_model, resolve_path


def _tokenizer(path: Path) -> Any:
    from .tokenizer import load_tokenizer
    return load_tokenizer(path)


def load(path: str | Path, *, dtype: str | None = None) -> tuple[Model, Any]:
    """(model, tokenizer) from a model directory (or hub repo id); tokenizer is None if the directory has none."""
    path = resolve_path(path)
    return load_model(path, dtype=dtype), _tokenizer(path)


def load_preset_model(name: str, *, seed: int = 0, dtype: str | None = None, quiet: bool = False
                      ) -> tuple[Model, Any]:
    """An untrained model from `parameters/NAME.json` with the bundled sample tokenizer."""
    config = load_preset(name)
    model = random_model(config, seed=seed, dtype=dtype, name=f"preset {name!r}")
    if not quiet:
        print(f"note: preset {name!r} with random (untrained) weights, seed {seed}; output is noise until "
              "trained (dh-mlx train)", file=sys.stderr)
    return model, _tokenizer(DATA_DIR / "tokenizer")
