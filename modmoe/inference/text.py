"""Token ids -> streamed text, cut at stop strings.

A byte-level BPE token may end in the middle of a UTF-8 character (decoded as U+FFFD until
the rest arrives), and a stop string may arrive over several tokens. So text is released only
when it is final: trailing replacement characters, and any tail that could still grow into a
stop string, are held back until the next token settles them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class StopTextStream:
    """The text of one generated sequence, fed token by token."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # all text released so far
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that may not be released yet."""
        hold = len(text) - len(text.rstrip(REPLACEMENT))
        body = text[: len(text) - hold]
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(body)), 0, -1):
                if body.endswith(stop[:n]):
                    hold = max(hold, len(text) - len(body) + n)
                    break
        return hold

    def feed(self, token: int) -> str:
        """Adds one token; returns the newly released text. Sets ``stopped`` when a stop
        string appeared (the text then ends right before it)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        full = self.decode(self.ids)
        hits = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        if hits:
            final = full[: min(hits)]
            self.stopped = True
        else:
            final = full[: len(full) - self._held_back(full)]
        delta = final[len(self.text) :] if final.startswith(self.text) else ""
        self.text = final if final.startswith(self.text) else self.text
        return delta

    def flush(self) -> str:
        """At the end of the sequence (no stop string): releases what was held back."""
        if self.stopped:
            return ""
        full = self.decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta
