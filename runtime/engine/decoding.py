"""Turning generated tokens into text that is safe to stream: whole UTF-8 characters, stop strings cut."""

from __future__ import annotations


class TextAssembler:
    """Accumulates token bytes and releases text that can no longer change.

    Text is held back while it ends in a partial UTF-8 sequence or in a prefix of a stop string,
    so a streaming client never receives bytes of a stop string or half a character.
    """

    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._bytes = bytearray()
        self.text = ""  # all decoded text so far (stop string excluded once hit)
        self._emitted = 0
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return newly releasable text."""
        if self.stopped:
            return ""
        self._bytes.extend(piece)
        try:
            decoded = self._bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.end < len(self._bytes) and exc.reason != "unexpected end of data":
                decoded = self._bytes.decode("utf-8", errors="replace")
            else:
                decoded = self._bytes[: exc.start].decode("utf-8", errors="replace")
        self.text = decoded
        for stop in self._stop:
            idx = decoded.find(stop, max(0, self._emitted - len(stop)))
            if idx != -1:
                self.text = decoded[:idx]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(decoded) - self._held_back(decoded))

    def flush(self) -> str:
        """Release whatever is held back (generation ended without a stop string)."""
        return self._release(len(self.text))

    def _held_back(self, text: str) -> int:
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out
