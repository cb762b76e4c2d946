"""Progress of long library work (building random weights, a long prefill) and notes for the user (what a
command removed, say), reported through `logging`.

The library never prints: it logs records on the `dh_mlx.progress` logger, each carrying the task's name, units
done and total, and notes on `dh_mlx.notes`. Whoever runs it decides how they show; the CLI (`show_progress`) rewrites one line in place on
a terminal once a task has run for a couple of seconds, and writes plain lines now and then otherwise.
Pure Python.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

log = logging.getLogger("dh_mlx.progress")
notes = logging.getLogger("dh_mlx.notes")
statuses = logging.getLogger("dh_mlx.status")


def note(message: str) -> None:
    """Something the user should know that is no error (the CLI prints it as `note: ...` on stderr)."""
    notes.warning(message)


class own_files_replaced:
    """Within the block, notes are dropped: a run rewriting what it wrote itself (its model at every checkpoint)
    is nothing the user needs to hear about each time."""

    def __enter__(self) -> None:
        self.level = notes.level
        notes.setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        notes.setLevel(self.level)


def status(message: str) -> None:
    """A line of what a command is doing or did (the data it read, a summary): the CLI prints it as it is, on
    stderr; a library caller sees it only if it routes `dh_mlx.status` records somewhere."""
    statuses.info(message)


class Task:
    """`with Task("prefill", total, "tokens") as t: ... t.advance(n)`: one record per advance, one at the end."""

    def __init__(self, name: str, total: float, unit: str = ""):
        self.name, self.total, self.unit, self.done = name, total, unit, 0
        self.detail = ""  # e.g. rates, shown after the count
        self.start = time.perf_counter()

    def advance(self, n: float = 1, detail: str = "") -> None:
        self.done += n
        self.detail = detail
        self._emit(False)

    def _emit(self, end: bool) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("%s: %d/%d %s", self.name, self.done, self.total, self.unit,
                     extra={"task": self, "end": end, "elapsed": time.perf_counter() - self.start})

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc) -> None:
        self._emit(True)


class ProgressHandler(logging.Handler):
    """Shows task records on `stream`: after `after` seconds of a task, a line rewritten in place on a terminal;
    otherwise a plain line at most every `every` seconds. Nothing for tasks shorter than `after`."""

    def __init__(self, stream: TextIO | None = None, after: float = 2.0, every: float = 10.0):
        super().__init__(logging.INFO)
        self._stream, self.after, self.every = stream, after, every
        self.shown: dict[int, float] = {}  # task id -> elapsed time of its last shown line

    @property
    def stream(self) -> TextIO:  # sys.stderr as it is when a record comes (tests and tools replace it)
        return self._stream or sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        task, end, elapsed = getattr(record, "task", None), getattr(record, "end", False), record.elapsed
        if task is None or elapsed < self.after and id(task) not in self.shown:
            return
        tty = self.stream.isatty()
        last = self.shown.get(id(task))
        if not end and not tty and last is not None and elapsed - last < self.every:
            return
        line = (f"{task.name}: {task.done:,}/{task.total:,}{' ' + task.unit if task.unit else ''}"
                f"{' | ' + task.detail if task.detail else ''} ({elapsed:.0f} s)")
        if tty:
            self.stream.write("\r\033[K" + ("" if end else line))
        elif not end:
            self.stream.write(line + "\n")
        self.stream.flush()
        if end:
            self.shown.pop(id(task), None)
        else:
            self.shown[id(task)] = elapsed


class NoteHandler(logging.Handler):
    """Notes as `note: ...` lines, status lines as they are, on `stream` (default: sys.stderr as it is when
    the line comes)."""

    def __init__(self, stream: TextIO | None = None, prefix: str = "note: ", words: Callable[[str], str] = str):
        super().__init__(logging.INFO)
        self._stream, self.prefix, self.words = stream, prefix, words

    def emit(self, record: logging.LogRecord) -> None:
        stream = self._stream or sys.stderr
        stream.write(f"{self.prefix}{self.words(record.getMessage())}\n")
        stream.flush()


def show_progress(stream: TextIO | None = None, words: Callable[[str], str] = str) -> ProgressHandler:
    """Route the library's progress records and notes to `stream` (default stderr), replacing any routing an
    earlier call set up; `words` rewrites notes (the CLI names arguments as its flags); returns the progress
    handler."""
    handler = ProgressHandler(stream)
    for logger, new in ((log, handler), (notes, NoteHandler(stream, words=words)),
                        (statuses, NoteHandler(stream, "", words))):
        for old in [h for h in logger.handlers if isinstance(h, (ProgressHandler, NoteHandler))]:
            logger.removeHandler(old)
        logger.addHandler(new)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return handler
