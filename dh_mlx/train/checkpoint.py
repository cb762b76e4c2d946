"""Training checkpoints: written whole into a temporary directory, then renamed, so a crash mid-write never
leaves a broken latest checkpoint. Layout under the run directory:

    checkpoints/step_000200/   model (or adapter) files, optimizer.safetensors, trainer_state.json
    checkpoints/latest         name of the newest complete checkpoint
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, *, write_weights: Callable[[Path], None], optimizer_state: Any,
                    trainer_state: dict, keep: int = 2) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_weights(tmp)
    flat = dict(tree_flatten(optimizer_state))
    mx.save_safetensors(str(tmp / OPTIMIZER), flat)
    (tmp / STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_text_atomic(root / "latest", name + "\n")
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise ValueError(f"{pointer}: points to {path.name}, which is incomplete (no {STATE})")
    return path


def load_checkpoint(path: Path) -> tuple[dict, Any]:
    """(trainer_state, optimizer_state tree) of a checkpoint directory."""
    state = json.loads((path / STATE).read_text())
    opt = tree_unflatten(list(mx.load(str(path / OPTIMIZER)).items()))
    return state, opt
