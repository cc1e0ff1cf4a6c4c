"""Stop strings over streamed text: release only text that can no longer turn into a stop string."""
from __future__ import annotations


class StopMatcher:
    """push(piece) -> the text that is safe to show. Text that could be the start of a stop string is held back
    until the next piece decides it; once a stop string appears, `stopped` is set and the text before it is the
    last thing released (the stop string itself is never shown, as in the OpenAI API)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stops)
        self.stopped = False
        self._pending = ""

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[:min(hits)]
        held = self._held_back(text)
        self._pending = text[len(text) - held:]
        return text[:len(text) - held]

    def flush(self) -> str:
        """End of generation: whatever was held back is plain text after all."""
        text, self._pending = self._pending, ""
        return text

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
