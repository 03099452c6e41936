"""A subscriber for the engine host's tests: records every event and lets the test wait
for one (no Qt: the host pushes on its own threads)."""

from __future__ import annotations

import threading
import time

from engine.api import FinishedEvent

TIMEOUT_S = 60


class Recorder:
    """Call it with events (as a host subscriber); ``wait`` for a condition on them."""

    def __init__(self) -> None:
        self.events: list = []
        self.threads: list[str] = []
        self._cv = threading.Condition()

    def __call__(self, ev) -> None:
        with self._cv:
            self.events.append(ev)
            self.threads.append(threading.current_thread().name)
            self._cv.notify_all()

    def wait(self, predicate, timeout_s: float = TIMEOUT_S):
        """Wait until ``predicate(events)`` is true; returns its value."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not (value := predicate(self.events)):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; events so far: {self.events}"
                self._cv.wait(left)
            return value

    def wait_for(self, kind: type, count: int = 1, timeout_s: float = TIMEOUT_S) -> list:
        """Wait for ``count`` events of type ``kind`` (from the start); returns them."""
        return self.wait(lambda evs: (found := [e for e in evs if isinstance(e, kind)])[count - 1:] and found,
                         timeout_s)

    def of(self, request_id: str) -> list:
        """The events of one request, in the order they came."""
        return [e for e in self.events if getattr(e, "request_id", None) == request_id]

    def names(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    def finished(self, request_id: str) -> FinishedEvent:
        return self.wait(lambda evs: next((e for e in evs if isinstance(e, FinishedEvent)
                                           and e.request_id == request_id), None))
