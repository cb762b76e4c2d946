"""Training checkpoints: written whole into a temporary directory, then renamed, so a crash mid-write never
leaves a broken latest checkpoint; each carries a manifest of its files' sizes and checksums, so a checkpoint
damaged later is recognised and resume falls back to the newest intact one. Layout under the run directory:

    checkpoints/step_000200/   model (or adapter) files, optimizer.safetensors, trainer_state.json, manifest.json
    checkpoints/latest         name of the newest complete checkpoint (for people; resume checks the manifests)
    .lock                      held (flock) by the one training writing the run
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..files import open_nofollow, real_dir, remove, write_atomic
from ..files import format_bytes
from ..progress import note

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
MANIFEST = "manifest.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (full disk, say); the message names the path and the free space."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_free_space(directory: Path, need: int) -> None:
    """Refuse to start a write of `need` bytes into `directory` that the disk cannot hold."""
    free = shutil.disk_usage(directory).free
    if free < need * 1.05:
        raise CheckpointWriteError(f"{directory}: not enough free disk space for a checkpoint: it needs about "
                                   f"{format_bytes(need)}, {format_bytes(free)} is free; free some space, then `resume=True`")


def save_checkpoint(run_dir: Path, step: int, *, write_weights: Callable[[Path], None], optimizer_state: Any,
                    trainer_state: dict, keep: int = 1, expected_bytes: int = 0, created: list[str] | None = None
                    ) -> Path:
    """Write checkpoint `step` whole, then keep the newest `keep` of the checkpoints this run wrote: `created`,
    the names it wrote so far (updated in place; recorded in each checkpoint, so a resumed run knows them too).
    A checkpoint directory the run did not write is never removed."""
    root = real_dir(run_dir / "checkpoints")
    name = f"step_{step:06d}"
    created = created if created is not None else []
    tmp, final = root / f".tmp-{name}", root / name
    if final.is_dir() and not final.is_symlink() and damage(final) is None:  # saved already (a stop after a save)
        return final
    check_free_space(root, expected_bytes)
    remove(tmp)
    if name not in created:
        created.append(name)
    try:
        tmp.mkdir()
        write_weights(tmp)
        mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer_state)))
        (tmp / STATE).write_text(json.dumps({**trainer_state, "step": step, "checkpoints": created}, indent=1))
        files = {p.name: [p.stat().st_size, _digest(p)] for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(files, indent=1))
    except Exception as e:  # MLX reports a full disk as "Unable to write N bytes to file."
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or free < max(expected_bytes, 1 << 26)
        raise CheckpointWriteError(f"{tmp}: writing checkpoint step {step} failed"
                                   + (" (disk full" if full else " (") + f"; {format_bytes(free)} free): {e}") from None
    remove(final)
    os.replace(tmp, final)
    write_atomic(root / "latest", name + "\n")
    for old in [p for p in _steps(root) if p.name in created][:-keep]:
        remove(old)
        created.remove(old.name)
    return final


def _steps(root: Path) -> list[Path]:
    """The checkpoint directories in step order (by number: step_1000000 comes after step_999999); links are
    not checkpoints."""
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.is_symlink() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def damage(path: Path) -> str | None:
    """Why the checkpoint directory `path` cannot be resumed from, or None when it is intact."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, (size, digest) in manifest.items():
            f = path / name
            if not f.is_file() or f.stat().st_size != size:
                return f"{f}: missing or of the wrong size"
            if _digest(f) != digest:
                return f"{f}: its checksum does not match the manifest"
        json.loads((path / STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: {type(e).__name__}: {e}"
    return None


def latest_checkpoint(run_dir: Path, *, report: bool = False) -> Path | None:
    """The newest intact checkpoint of the run (None without any); with `report`, a damaged newer one is
    named on stderr as it is passed over."""
    root = run_dir / "checkpoints"
    candidates = _steps(root)[::-1] if root.is_dir() else []
    for path in candidates:
        why = damage(path)
        if why is None:
            return path
        if report:
            note(f"checkpoint {path.name} is damaged ({why}); trying an older one")
    if candidates:
        raise ValueError(f"{root}: no intact checkpoint to resume from (newest: {candidates[0].name})")
    return None


def load_checkpoint(path: Path) -> tuple[dict, Any]:
    """(trainer_state, optimizer_state tree) of a checkpoint directory."""
    state = json.loads((path / STATE).read_text())
    opt = tree_unflatten(list(mx.load(str(path / OPTIMIZER)).items()))
    return state, opt


def remove_partial(run_dir: Path) -> None:
    """Temporary checkpoints that a killed run left behind."""
    root = run_dir / "checkpoints"
    if root.is_dir() and not root.is_symlink():
        for tmp in root.glob(".tmp-*"):
            remove(tmp)


def remove_checkpoints(run_dir: Path) -> list[str]:
    """A fresh run's --force: remove the checkpoints a training of ours wrote (step directories with their
    manifest and trainer state, `latest`, temporary ones); anything else in checkpoints/ stays. Returns the
    names removed."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    real_dir(root)
    ours = [p for p in _steps(root) if (p / MANIFEST).is_file() and (p / STATE).is_file()]
    ours += [p for p in (root / "latest", *root.glob(".tmp-*")) if p.exists() or p.is_symlink()]
    return [p.name for p in ours if remove(p)]


class RunLock:
    """One training per run directory: an flock on `.lock`, released by the kernel if the process dies."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise CheckpointWriteError(f"{run_dir}: another training (pid {holder}) is writing this run; wait for "
                                       "it to finish or choose another `out`") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
