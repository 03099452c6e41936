"""Background work for the Models page: blocking service calls off the UI thread.

``TaskRunner`` runs a callable on its own ``QThreadPool`` and hands the result (or the
exception) back on the UI thread. Calls share a *channel* ("search", "details", ...):
only the newest call of a channel is delivered, so a slow answer to an old query never
overwrites the answer to the latest one.

``DownloadEvents`` turns the Qt-free ``DownloadManager``'s listener calls (made on its
worker threads) into a queued Qt signal.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal


class _Call(QRunnable):
    def __init__(self, runner: "TaskRunner", channel: str, ticket: int, fn: Callable[[], object]) -> None:
        super().__init__()
        self._runner, self._channel, self._ticket, self._fn = runner, channel, ticket, fn

    def run(self) -> None:
        try:
            result, error = self._fn(), None
        except Exception as exc:  # delivered to the caller's error handler on the UI thread
            result, error = None, exc
        try:
            self._runner._finished.emit(self._channel, self._ticket, result, error)
        except RuntimeError:
            pass  # the page was closed while this call ran: nobody is waiting for the answer


class TaskRunner(QObject):
    """Run blocking calls in the background; newest call per channel wins."""

    _finished = Signal(str, int, object, object)

    def __init__(self, parent: QObject | None = None, max_threads: int = 4) -> None:
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(max_threads)
        self._tickets: dict[str, int] = {}
        self._callbacks: dict[tuple[str, int], tuple[Callable, Callable | None]] = {}
        self._closed = False
        self._finished.connect(self._deliver)

    def run(self, channel: str, fn: Callable[[], object], on_done: Callable[[object], None],
            on_error: Callable[[Exception], None] | None = None) -> None:
        """Call ``fn()`` on a pool thread, then ``on_done(result)`` or ``on_error(exc)`` here."""
        if self._closed:
            return
        ticket = self._tickets.get(channel, 0) + 1
        self._tickets[channel] = ticket
        self._callbacks[(channel, ticket)] = (on_done, on_error)
        self._pool.start(_Call(self, channel, ticket, fn))

    def pending(self, channel: str) -> bool:
        """Whether the newest call of ``channel`` has not been delivered yet."""
        return (channel, self._tickets.get(channel, 0)) in self._callbacks

    def shutdown(self, timeout_ms: int = 3000) -> None:
        """Drop every undelivered result and wait for running calls to return."""
        self._closed = True
        self._callbacks.clear()
        self._pool.waitForDone(timeout_ms)

    def _deliver(self, channel: str, ticket: int, result: object, error: object) -> None:
        callbacks = self._callbacks.pop((channel, ticket), None)
        if callbacks is None or self._closed or ticket != self._tickets.get(channel):
            return  # superseded by a newer call, or the page is closing
        on_done, on_error = callbacks
        if error is None:
            on_done(result)
        elif on_error is not None:
            on_error(error)
        else:
            raise error


class DownloadEvents(QObject):
    """Re-emits a ``DownloadManager``'s status snapshots as a signal on the UI thread."""

    statusChanged = Signal(object)

    def __init__(self, manager, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._unsubscribe = unsubscribe = manager.subscribe(self.statusChanged.emit)
        # If the widget tree goes away without detach(), stop the manager calling into it.
        self.destroyed.connect(lambda *_: unsubscribe())

    def detach(self) -> None:
        """Stop forwarding (before the manager shuts down and this object goes away)."""
        self._unsubscribe()
