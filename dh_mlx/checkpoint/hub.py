"""Model directories by hub id: `org/name` from the huggingface_hub cache, or downloaded into it (no MLX)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from .layout import CheckpointError, safetensors_files

HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]


def _complete(d: Path) -> bool:
    """Whether a cached snapshot holds a config and every weight file it needs (not only what a config
    lookup cached)."""
    try:
        return (d / "config.json").is_file() and bool(safetensors_files(d))
    except CheckpointError:
        return False


def resolve_path(path: str | Path, *, before_download: Callable[[Path], None] | None = None) -> Path:
    """A local directory, or a Hugging Face hub repo id (`org/name`): from the huggingface_hub cache when it
    is all there (no request), else downloaded into it; `before_download(dir)` sees the repo's JSON files first
    (a memory check can refuse before the weights come). An absolute path, one under `~`, or one whose first
    part is a local directory never reaches the hub."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    if p.is_absolute() or s.startswith(("~", ".")) or (str(p.parent) != "." and p.parent.exists()):
        raise CheckpointError(f"{path}: no such model directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        raise CheckpointError(f"{path}: no such model directory (nor a hub id, which reads org/name)")
    from huggingface_hub import snapshot_download
    try:
        cached = Path(snapshot_download(s, allow_patterns=HUB_FILES, local_files_only=True))
        if _complete(cached):
            return cached
    except Exception:  # not in the cache
        pass
    try:
        if before_download is not None:
            before_download(Path(snapshot_download(s, allow_patterns=["*.json"])))
        got = Path(snapshot_download(s, allow_patterns=HUB_FILES))
    except (CheckpointError, MemoryError, ValueError):
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a local directory, not in the Hugging Face cache, and the hub "
                              f"download failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not _complete(got):  # huggingface_hub hands back a partial cache entry when the hub cannot be reached
        raise CheckpointError(f"{path}: the Hugging Face cache holds only part of it ({got}), and the hub "
                              "download failed (offline?)")
    return got
