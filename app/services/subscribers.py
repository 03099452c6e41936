"""The subscriber list of an engine host's face (``EngineProcess`` here, the Ray Serve
app's ``RayEngineHost``): ``subscribe`` hands back the function that unsubscribes, and a
subscriber that raises is logged and unsubscribed, so one bad listener stops only itself.
The tuple is swapped whole under a lock, so publishing iterates a snapshot without it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("hearth.services")


class Subscribers:
    def __init__(self, owner: str) -> None:
        self._owner = owner  # (named in the log line of a failed subscriber)
        self._callbacks: tuple[Callable, ...] = ()
        self._lock = threading.Lock()

    def add(self, callback: Callable) -> Callable[[], None]:
        """Call ``callback(event)`` with every event from now on; returns its unsubscribe."""
        with self._lock:
            self._callbacks = (*self._callbacks, callback)
        return lambda: self._remove(callback)

    def _remove(self, callback: Callable) -> None:
        with self._lock:
            self._callbacks = tuple(s for s in self._callbacks if s is not callback)

    def publish(self, event) -> None:
        for callback in self._callbacks:
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - one bad subscriber stops only itself
                log.exception("%s subscriber failed; it is unsubscribed", self._owner)
                self._remove(callback)
