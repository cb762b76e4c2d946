"""Files are what they seem: the one place dh-mlx reads, writes and removes files through.

Reading: only regular files (a FIFO, device, socket or directory where a file is expected is refused at once,
by name: opening a FIFO would block forever), and every file read whole has a size bound (`LIMITS`, listed in
docs/reliability.md). Writing: a new file is written under a temporary name created fresh (never through an
existing link) and renamed over its destination, so a symbolic link planted where a command writes is replaced,
never written through; appends and locks open with O_NOFOLLOW; directories a command writes into below its
output must be real directories. Identity: whether two paths are the same file, or one lies inside the other,
is decided by device and inode, so a bind mount, a hard link or a case-insensitive spelling is caught.
Pure Python.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

MB = 1 << 20
#: The largest file of each kind read whole (bytes). Weights are not read whole: they are memory-mapped.
LIMITS = {"config": 16 * MB, "index": 256 * MB, "tokenizer": 512 * MB, "template": 4 * MB, "json": 64 * MB,
          "prompt": 256 * MB, "archive member": 256 * MB}


class FileKindError(ValueError):
    """A path that is not the kind of file a command expects (a FIFO, a link where it writes, too large...)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | Path) -> Path:
    """`path` if it is a regular file (links followed), else FileKindError naming what it is instead.
    FileNotFoundError passes up, for the caller to word."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise FileKindError(f"{path}: is {_kind(mode)}, not a regular file")
    return Path(path)


def is_regular(path: str | Path) -> bool:
    """Whether `path` exists and is a regular file (links followed); never blocks."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_bytes(path: str | Path, kind: str = "json") -> bytes:
    """The whole of a regular file no larger than LIMITS[kind], or FileKindError naming the file."""
    limit = LIMITS[kind]
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once, then is refused
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileKindError(f"{path}: is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise FileKindError(f"{path}: {st.st_size:,} bytes; a {kind} file may have at most {limit:,}")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # a file growing while read
                raise FileKindError(f"{path}: more than the {limit:,} bytes a {kind} file may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | Path, kind: str = "json") -> str:
    data = read_bytes(path, kind)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileKindError(f"{path}: byte 0x{data[e.start]:02X} at offset {e.start} is not UTF-8") from None


def read_json(path: str | Path, kind: str = "json") -> Any:
    """A JSON file (bounded, regular), or ValueError naming the file and line."""
    text = read_text(path, kind)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileKindError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise FileKindError(f"{path}: JSON nested too deeply") from None


# ---- writing -------------------------------------------------------------------------------------------------
class WriteError(OSError):
    """A write that failed: the message names the file, the cause (a full disk, say) and the free space."""


def format_bytes(n: float, unit: str | None = None) -> str:
    """`n` bytes in words: in the largest of B, KB, MB, GB (powers of 1000) it reaches, or in `unit` ("GB" or
    "GiB", thousands separated), one decimal."""
    if unit is not None:
        return f"{n / {'GB': 1e9, 'GiB': 2**30}[unit]:,.1f} {unit}"
    for name in ("B", "KB", "MB", "GB"):
        if n < 1000 or name == "GB":
            return f"{n:.0f} {name}" if name == "B" else f"{n:.1f} {name}"
        n /= 1000
    return f"{n:.1f} GB"


def write_failure(path: str | Path, e: BaseException) -> BaseException:
    """The one-line error for a failed write of `path`: disk full (with the free space) or the OS's reason.
    Libraries report a full disk in words of their own ("Unable to write N bytes"), so under 64 MB free after
    a failed write counts as full."""
    if not isinstance(e, (OSError, RuntimeError)) or isinstance(e, WriteError):  # (not a write's: as it is)
        return e
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return e
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC or free < 64 * MB
    reason = "the disk is full" if full else (e.strerror if isinstance(e, OSError) and e.strerror else
                                              str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    return WriteError(f"{path}: writing failed: {reason} ({format_bytes(free)} free)")
def _no_link(path: Path, what: str = "") -> None:
    if path.is_symlink():
        raise FileKindError(f"{path}: is a symbolic link; dh-mlx does not write {what or 'through'} it (remove it, "
                            "or choose another output)")


def real_dir(path: str | Path) -> Path:
    """`path` as a directory a command writes into: created when absent, refused when it is a link or not a
    directory (writing below a link would write wherever it points)."""
    path = Path(path)
    _no_link(path, "into")
    if path.exists() and not path.is_dir():
        raise FileKindError(f"{path}: is {_kind(os.stat(path).st_mode)}, not a directory (remove it, or choose "
                            "another output)")
    path.mkdir(exist_ok=True)
    return path


def write_atomic(path: str | Path, data: bytes | str | Callable[[str], None]) -> None:
    """Write `path` whole: into a fresh `.tmp-NAME` beside it (a callable gets that path to write), then renamed
    over `path`. An existing link at `path` is replaced, never written through; readers skip dotfiles."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    remove(tmp)
    try:
        if callable(data):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            os.close(fd)
            data(str(tmp))
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        if path.is_dir() and not path.is_symlink():
            raise FileKindError(f"{path}: is a directory; cannot write a file there")
        os.replace(tmp, path)
    except BaseException as e:
        remove(tmp)
        failure = write_failure(path, e)
        if failure is e:
            raise
        raise failure from None


def copy_file(src: str | Path, dst: str | Path, kind: str = "tokenizer") -> None:
    """Copy a regular file (bounded by LIMITS[kind]) to `dst` atomically, never through a link at `dst`."""
    write_atomic(dst, read_bytes(src, kind))


def open_nofollow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """os.open for writing in place (appends, locks) that refuses by name what would write elsewhere: a
    symbolic link, a file with other names (a hard link shares its data), or anything but a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileKindError(f"{path}: is a symbolic link; dh-mlx does not write through it (remove it)") from None
        if e.errno == errno.ENXIO:  # a FIFO that nobody reads
            raise FileKindError(f"{path}: is a FIFO (named pipe); dh-mlx does not write into it (remove it)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = _kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else "a file with other names (hard links)"
        raise FileKindError(f"{path}: is {what}; dh-mlx does not write into it (remove it)")
    return fd


def append_line(path: str | Path, line: str) -> None:
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a") as f:
        f.write(line)


def remove(path: str | Path) -> bool:
    """Remove what is at `path` without following links: a link itself, a file, or a directory tree (which
    shutil.rmtree walks without following the links inside). Returns whether something was there."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return True


# ---- identity ------------------------------------------------------------------------------------------------
def identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` names (links followed), or None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_file(a: str | Path, b: str | Path) -> bool:
    ia = identity(a)
    return ia is not None and ia == identity(b)


def chain(path: str | Path) -> list[tuple[int, int]]:
    """Identities of `path` (or, when it does not exist yet, of its nearest existing ancestor) and of every
    directory above it, up to the root."""
    p = Path(os.path.realpath(path))
    out = []
    for q in (p, *p.parents):
        i = identity(q)
        if i is not None:
            out.append(i)
    return out


def inside(path: str | Path, directory: str | Path) -> bool:
    """Whether `path` is `directory` or lies below it, by identity (a bind mount or case-insensitive spelling
    of the directory counts)."""
    d = identity(directory)
    return d is not None and d in chain(path)
