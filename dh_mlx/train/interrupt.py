"""SIGINT and SIGTERM during training: the loop finishes the step it is in, saves a checkpoint, and the command
exits 128 + the signal.

The handler only records the signal; the loop checks it between steps, so a checkpoint never holds a step's
new weights under the previous step's number. Handlers are installed for the loop's duration even where SIGINT
arrives ignored (a job started in the background by a script); later signals change nothing.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by `signum`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    signum: int | None = None

    def check(self) -> None:
        """Raise `Interrupted` if a signal came since the loop started."""
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Record the first SIGINT / SIGTERM in the yielded `StopRequest` for the loop to act on."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signum is None:
            request.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
