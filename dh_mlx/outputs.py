"""Where a command writes: never over its own input, and over existing data only when the user says so."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


class OutputError(ValueError):
    """An output path that would replace data the command was not asked to replace."""


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _inside(path: Path, directory: Path) -> bool:
    try:
        return path.exists() and path.resolve().is_relative_to(directory.resolve())
    except OSError:
        return False


def check_output_dir(out: str | Path, *, inputs: Iterable[str | Path | None] = (), force: bool = False,
                     flag: str = "--out") -> Path:
    """`out` as a directory to write into: not one of `inputs`, and empty or absent unless `force`."""
    out = Path(out)
    for src in inputs:
        if src is not None and (_same(out, Path(src)) or _inside(Path(src), out)):
            raise OutputError(f"{out}: {flag} is, or holds, the input {src}; writing there could replace it "
                              f"(choose another {flag})")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory ({flag} takes a directory)")
    # `.tmp-*` files are what an interrupted write of ours leaves (readers skip them; a rerun writes over them)
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".tmp-")) if out.is_dir() else []
    if held and not force:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise OutputError(f"{out}: already holds {shown}; pass --force to write over it, or choose another {flag}")
    return out


def check_output_file(out: str | Path, *, inputs: Iterable[str | Path | None] = (), force: bool = False,
                      flag: str = "--out") -> Path:
    """`out` as a file to write: not a directory, not an input, absent unless `force`."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; {flag} takes the file to write (e.g. {out / 'model.gguf'})")
    for src in inputs:
        if src is None:
            continue
        if _same(out, Path(src)) or _inside(out, Path(src)):
            raise OutputError(f"{out}: {flag} is the input {src} or one of its files; writing there would replace "
                              f"it (choose another {flag})")
    if out.exists() and not force:
        raise OutputError(f"{out}: exists; pass --force to replace it, or choose another {flag}")
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
