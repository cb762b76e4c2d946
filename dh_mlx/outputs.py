"""Where a command writes: never over its own input, and over existing data only when the user says so."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from .files import inside, remove, same_file


class OutputError(ValueError):
    """An output path that would replace data the command was not asked to replace."""


def check_output_dir(out: str | Path, *, inputs: Iterable[str | Path | None] = (), force: bool = False,
                     arg: str = "out") -> Path:
    """`out` as a directory to write into: not one of `inputs`, and empty or absent unless `force`."""
    out = Path(out)
    for src in inputs:  # by device and inode: a bind mount, hard link or case-insensitive spelling is caught
        if src is not None and (inside(out, src) or inside(src, out)):
            how = "is, or holds, the input" if inside(src, out) else "lies inside the input"
            raise OutputError(f"{out}: `{arg}` {how} {src}; writing there could replace it (choose another `{arg}`)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory (`{arg}` takes a directory)")
    # `.tmp-*` files are what an interrupted write of ours leaves (readers skip them; a rerun writes over them)
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".tmp-")) if out.is_dir() else []
    if held and not force:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise OutputError(f"{out}: already holds {shown}; pass `force=True` to write over it, or choose another `{arg}`")
    return out


def check_output_file(out: str | Path, *, inputs: Iterable[str | Path | None] = (), force: bool = False,
                      arg: str = "out") -> Path:
    """`out` as a file to write: not a directory, not an input, absent unless `force`."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; `{arg}` takes the file to write (e.g. {out / 'model.gguf'})")
    for src in inputs:
        if src is None:
            continue
        if same_file(out, src) or inside(out, src):
            raise OutputError(f"{out}: `{arg}` is the input {src} or one of its files; writing there would replace "
                              f"it (choose another `{arg}`)")
    if out.exists() and not force:
        raise OutputError(f"{out}: exists; pass `force=True` to replace it, or choose another `{arg}`")
    return out


def remove_owned(directory: str | Path, names: str) -> list[str]:
    """Remove the entries of `directory` whose names fully match the regular expression `names`: files of the
    kind the command writes there (say, weight shards of an earlier write), never anything else; links are
    removed themselves, not followed. Returns the names removed, for the command to report."""
    pattern = re.compile(names)
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if pattern.fullmatch(p.name) and remove(p))
