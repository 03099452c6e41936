"""Stop-string detection over a stream of text deltas."""

from __future__ import annotations

from engine.errors import InvalidRequestError


class StopStringMatcher:
    """Finds stop strings in streamed text, even when they span several deltas.

    Feed each text delta to :meth:`feed`; it returns ``(text_to_emit, stopped)``. Text
    that might be the start of a stop string is held back until the next deltas show
    whether it is, so nothing after a stop string is ever emitted and nothing that could
    still become a stop string is emitted early. When generation ends for another reason
    (EOS, length), call :meth:`flush` to get the held-back text.

    Generation stops at the first point in the stream where some stop string is
    complete; when several complete there, the one starting earliest wins. The result
    does not depend on how the text is split into deltas.
    """

    __slots__ = ("_stops", "_include", "_prefixes", "_max_hold", "_pending", "_matched")

    def __init__(self, stops: tuple[str, ...] | list[str], include_stop_str_in_output: bool = False):
        stops = tuple(stops)
        if any(not isinstance(s, str) or not s for s in stops):
            raise InvalidRequestError("stop strings must be non-empty strings.")
        self._stops = stops
        self._include = include_stop_str_in_output
        # Every proper prefix of a stop string: a pending suffix in this set may still grow
        # into a stop string and must be held back.
        self._prefixes = frozenset(s[:i] for s in stops for i in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in stops), default=0)
        self._pending = ""
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been found."""
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that ended generation, or None."""
        return self._matched

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add a text delta; return (text safe to emit now, whether generation stops)."""
        if self._matched is not None:
            return "", True
        if not self._stops:
            return delta, False
        buf = self._pending + delta
        # Matches fully inside the old pending text were ruled out by the previous call,
        # so a new match must end inside `delta`.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self._stops:
            start = buf.find(s, max(0, len(self._pending) - len(s) + 1))
            if start < 0:
                continue
            cand = (start + len(s), start, s)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is not None:
            end, start, s = best
            self._matched = s
            self._pending = ""
            return (buf[:end] if self._include else buf[:start]), True
        hold = self._held_suffix_len(buf)
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release held-back text when generation ends without a stop string."""
        text, self._pending = self._pending, ""
        return text

    def _held_suffix_len(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string.
        for k in range(min(len(buf), self._max_hold), 0, -1):
            if buf[-k:] in self._prefixes:
                return k
        return 0
