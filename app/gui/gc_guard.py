"""Run Python's cyclic garbage collector on the GUI thread only.

CPython collects cycles in whichever thread happens to allocate when a generation's
threshold trips. In this app that is often the engine host's load thread (loading a
model allocates a lot); if the garbage holds Qt widgets (a closed page or dialog kept in
a cycle by a lambda slot), Qt then destroys GUI objects off the GUI thread, which
crashes. So automatic collection is turned off and a timer on the GUI thread collects
with the same thresholds instead (the usual remedy for PySide/PyQt apps with workers).
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QTimer


class GuiThreadGC(QObject):
    def __init__(self, parent=None, interval_ms: int = 500) -> None:
        super().__init__(parent)
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._timer = QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self.check)
        self._timer.start()

    def check(self) -> None:
        """Collect the generations whose allocation counts passed their thresholds."""
        c0, c1, c2 = gc.get_count()
        t0, t1, t2 = gc.get_threshold()
        if c0 > t0:
            gen = 2 if c2 > t2 else 1 if c1 > t1 else 0
            gc.collect(gen)

    def stop(self) -> None:
        self._timer.stop()
        if self._was_enabled:
            gc.enable()
