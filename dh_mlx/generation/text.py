"""A sequence's text as its tokens arrive: whole characters only (the tokenizer's stream decoder), and stop
strings cut out. Text that could still turn into a stop string is held back until it cannot; the text
before a stop string is all that is ever handed out, so a cut never falls inside a character."""

from __future__ import annotations

from typing import Any


class NoText:
    """The stream decoder of a request without a tokenizer (token ids only: generate_tokens): no text."""

    def add(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


class TextOut:
    def __init__(self, decoder: Any, stop: tuple[str, ...] | list[str] = ()):
        self.decoder, self.stop = decoder, tuple(s for s in stop if s)
        self.held = ""  # decoded, not yet handed out
        self.stopped = False

    def _release(self, final: bool) -> str:
        for s in self.stop:
            at = self.held.find(s)
            if at >= 0:
                out, self.held, self.stopped = self.held[:at], "", True
                return out
        keep = 0 if final else min(max((len(s) - 1 for s in self.stop), default=0), len(self.held))
        # hold back the longest tail that is the start of some stop string
        while keep and not any(s.startswith(self.held[len(self.held) - keep:]) for s in self.stop):
            keep -= 1
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def add(self, token: int) -> tuple[str, bool]:
        """(text to hand out now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        self.held += self.decoder.add(token)
        out = self._release(False)
        return out, self.stopped

    def flush(self) -> str:
        """The rest, at the end of the sequence (a stop string inside it still cuts)."""
        if self.stopped:
            return ""
        self.held += self.decoder.flush()
        return self._release(True)
