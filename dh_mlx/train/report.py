"""What a training run prints while it runs: a progress bar on a terminal, plain periodic lines elsewhere.

A log file or a pipe gets one self-contained line per report (as mlx-lm's trainer prints), never a bar's
redraws; everything goes to stderr, so stdout stays free for a command's result.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable, TextIO

from ..files import append_line, write_atomic
from ..progress import note


def _step_info(r: dict) -> str:
    info = f"ce {r['ce']:.3f} | {r['tokens_per_s']:.0f} tok/s | lr {r['lr']:.2e}"
    if "comm_bytes" in r:  # data-parallel: what the step's all_sums carried, and how long they took
        info += f" | all_sum {r['comm_bytes'] / 1e6:.1f} MB {r['comm_s'] * 1e3:.0f} ms"
    imb = r.get("imbalance")  # None where no routed expert was trained (e.g. LoRA without --experts)
    info += " | imbalance -" if imb is None else f" | imbalance {imb:.2f}"
    if "mixture_tokens" in r:  # a domain mixture: the tokens each component gave so far
        info += " | " + " ".join(f"{k} {_count(v)}" for k, v in r["mixture_tokens"].items())
    return info


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.{1 if unit == 'k' else 2}f}{unit}"
    return str(n)


def _validation_line(step: int, r: dict) -> str:
    mtp = r.get("val_mtp_agreement")
    return (f"step {step}: val loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.1f})"
            + ("" if mtp is None else f", MTP drafts agreeing with greedy {mtp:.1%}"))


class LineReport:
    """Plain lines: the first step, every `every` steps, and each validation."""

    def __init__(self, total: int, start: int, *, every: int = 10, stream: TextIO | None = None):
        self.total, self.every, self.stream = total, every, stream or sys.stderr

    def print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, step: int, r: dict) -> None:
        if step % self.every == 0 or step == 1 or step == self.total:
            self.print(f"step {step}/{self.total}: {_step_info(r)}")
        if "val_loss" in r:
            self.print(_validation_line(step, r))

    def stop(self) -> None:
        pass


class BarReport:
    """A rich progress bar on stderr showing loss, tokens/s, learning rate and expert-load imbalance."""

    def __init__(self, total: int, start: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self._p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=False)
        self._task = self._p.add_task("train", total=total, completed=start, info="")
        self._p.start()

    def print(self, text: str) -> None:
        self._p.console.print(text, highlight=False)

    def update(self, step: int, r: dict) -> None:
        info = _step_info(r)
        if "val_loss" in r:
            info += f" | val {r['val_loss']:.3f}"
            self.print(_validation_line(step, r))
        self._p.update(self._task, completed=step, info=info)

    def stop(self) -> None:
        self._p.stop()


def make_report(total: int, start: int) -> BarReport | LineReport:
    """The bar when stderr is a terminal, plain lines otherwise."""
    return BarReport(total, start) if sys.stderr.isatty() else LineReport(total, start)


train_log = logging.getLogger("dh_mlx.train")


class LogReport:
    """What the training loop reports (its start, each step's record, lines of text, its end), as records on
    the `dh_mlx.train` logger: the library never prints; `show_training()` (the CLI's) draws them."""

    def __init__(self, total: int, start: int):
        self._emit("start", total=total, start=start)

    def update(self, step: int, r: dict) -> None:
        self._emit("step", step=step, record=r)

    def print(self, text: str) -> None:
        self._emit("line", text=text)

    def stop(self) -> None:
        self._emit("stop")

    @staticmethod
    def _emit(kind: str, **data) -> None:
        if train_log.isEnabledFor(logging.INFO):
            train_log.info(kind, extra={"training": (kind, data)})


class TrainingHandler(logging.Handler):
    """Draws `LogReport`'s records: a progress bar on a terminal, plain lines otherwise (`make_report`)."""

    def __init__(self, words: Callable[[str], str] = str):
        super().__init__(logging.INFO)
        self.view: BarReport | LineReport | None = None
        self.words = words

    def emit(self, record: logging.LogRecord) -> None:
        kind, data = getattr(record, "training", (None, {}))
        if kind == "start":
            self.view = make_report(data["total"], data["start"])
        elif self.view is not None and kind == "step":
            self.view.update(data["step"], data["record"])
        elif self.view is not None and kind == "line":
            self.view.print(self.words(data["text"]))
        elif self.view is not None and kind == "stop":
            self.view.stop()
            self.view = None


def show_training(words: Callable[[str], str] = str) -> None:
    """Route the training loop's records to stderr, replacing any routing set before; `words` rewrites its
    lines of text (the CLI names arguments as its flags)."""
    for old in [h for h in train_log.handlers if isinstance(h, TrainingHandler)]:
        train_log.removeHandler(old)
    train_log.addHandler(TrainingHandler(words))
    train_log.setLevel(logging.INFO)
    train_log.propagate = False


def directory_bytes(path: Path) -> int:
    """Bytes of the files under `path` (what a run directory takes on disk)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class MetricsLog:
    """Append-only JSONL of metrics; on resume, entries after the resumed step are dropped, and so is a line
    that a killed run left unfinished."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    note(f"{path}: dropped an unreadable line ({line[:40]!r})")
            write_atomic(path, "".join(l + "\n" for l in keep))
        elif resume_step is None:
            write_atomic(path, "")

    def write(self, record: dict) -> None:
        append_line(self.path, json.dumps(record) + "\n")
