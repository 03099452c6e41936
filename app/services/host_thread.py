"""The engine host's own thread: one thread that runs the host's work in the order it was
posted, and its timers (Qt-free, the engine host's counterpart of a QThread's event loop).

Every change to the host's state (which engine serves, the load under way, the requests
running) happens on this thread, so none of it needs a lock; any thread posts work to it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

log = logging.getLogger("hearth.host")

_STOP = object()


class HostThread:
    """A thread that runs posted calls one at a time, in order, and named timers.

    ``post`` may be called from any thread; ``start_timer`` / ``stop_timer`` /
    ``timer_active`` only from calls running on this thread. A call that raises is
    logged; the thread goes on (like a Qt event loop after a slot that raised)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._timers: dict[str, tuple[float, float | None, Callable[[], None]]] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on this thread, after every call posted before it."""
        self._calls.put((fn, args))

    def stop(self) -> None:
        """End the thread once the calls posted before this one have run."""
        self._calls.put(_STOP)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; returns whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def start_timer(self, name: str, delay_s: float, fn: Callable[[], None], repeat: bool = False) -> None:
        """Call ``fn`` on this thread after ``delay_s`` (then every ``delay_s`` if
        ``repeat``), replacing a timer of the same name."""
        self._timers[name] = (time.monotonic() + delay_s, delay_s if repeat else None, fn)

    def stop_timer(self, name: str) -> None:
        self._timers.pop(name, None)

    def timer_active(self, name: str) -> bool:
        return name in self._timers

    def _run(self) -> None:
        while True:
            timeout = None
            if self._timers:
                timeout = max(0.0, min(due for due, _, _ in self._timers.values()) - time.monotonic())
            try:
                item = self._calls.get(timeout=timeout)
            except queue.Empty:
                self._fire_due_timers()
                continue
            if item is _STOP:
                return
            fn, args = item
            self._call(fn, *args)
            if self._timers:
                self._fire_due_timers()

    def _fire_due_timers(self) -> None:
        now = time.monotonic()
        for name, (due, every, fn) in list(self._timers.items()):
            if due > now or self._timers.get(name, (None,))[0] != due:
                continue  # not yet, or replaced or stopped by a timer that fired before it
            if every is None:
                del self._timers[name]
            else:
                self._timers[name] = (now + every, every, fn)
            self._call(fn)

    @staticmethod
    def _call(fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("the engine host's %s failed", getattr(fn, "__name__", fn))
