"""Turns a request's token stream into text deltas, applying stop strings.

Text that might be the start of a stop string is held back until it is known not to be; when a
stop string appears, the text ends right before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputText:
    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer) if tokenizer else None
        self._stop = list(stop)
        self._text = ""      # all decoded text so far
        self._emitted = 0    # characters of it already returned
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        """Text to emit for these new tokens ('' while held back or after a stop)."""
        if self._detok is None or self.stopped:
            return ""
        self._text += self._detok.push(ids)
        return self._release(final=False)

    def flush(self) -> str:
        if self._detok is None or self.stopped:
            return ""
        self._text += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop:
            longest = max(len(s) for s in self._stop)
            window = max(0, self._emitted - longest + 1)
            hits = [i for i in (self._text.find(s, window) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._take(min(hits))
            if not final:
                return self._take(len(self._text) - self._held_back())
        return self._take(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self._text[self._emitted:end]
        self._emitted = end
        return out
