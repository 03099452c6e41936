"""The Compare page's worker: one comparison (``app.services.compare.run_comparison``) on a
thread of its own, its events handed to the GUI thread as a queued signal.

``run_comparison`` blocks for minutes and calls ``on_event`` on the thread that runs it;
the worker emits each event as ``event(object)`` from there, and Qt queues the emission to
the slots of GUI-thread objects (the page), so the page only ever sees events on the GUI
thread, in order. The event objects are never changed by the runner once sent, so they
cross threads as they are.

Garbage collection: the app collects cycles on the GUI thread only (``gc_guard``), so the
run is told not to collect on this thread (``collect_garbage=False``).
"""

from __future__ import annotations

import logging
import threading

from PySide6.QtCore import QThread, Signal

from app.services.compare import ComparePlan, run_comparison
from engine.api import HearthError

log = logging.getLogger("hearth.gui.compare")


class CompareWorker(QThread):
    """Runs one ``ComparePlan``. ``event(CompareEvent)`` for each of the run's events (the
    last is ``RunFinished``); ``failed(message)`` instead when the run could not go on at
    all (a plan the service refuses, an unexpected error): no ``RunFinished`` then. Either
    way QThread's ``finished`` follows. ``cancel()`` may be called at any moment."""

    event = Signal(object)
    failed = Signal(str)

    def __init__(self, plan: ComparePlan, parent=None) -> None:
        super().__init__(parent)
        self.plan = plan
        self._cancel = threading.Event()
        self.outcome = None  # the ComparisonResult, once the run has returned

    def cancel(self) -> None:
        """Stop the comparison: the answer in flight is aborted, the engine shut down, the
        configuration in flight and the ones after it marked cancelled; ``RunFinished``
        still comes (within a token, a weight tensor or a perplexity window)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def run(self) -> None:  # the worker thread
        try:
            self.outcome = run_comparison(self.plan, on_event=self.event.emit, cancel=self._cancel,
                                          collect_garbage=False)
        except HearthError as e:  # the plan refused as a whole: said in words
            self.failed.emit(str(e))
        except Exception as e:  # a bug: logged with its traceback, the page says what happened
            log.error("the comparison stopped on an unexpected error", exc_info=True)
            self.failed.emit(f"the comparison stopped on an unexpected error ({type(e).__name__}: {e}). "
                             "Run hearth with -v to see the details in its log.")
