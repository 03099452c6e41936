"""Keep a Qt binding that drops references to None / True / False from aborting the app.

What happened: with PySide6 / shiboken6 6.12.0 on Python 3.11, every Qt method that
returns nothing gives back ``None`` without taking a reference to it, and every signal
``emit`` / ``connect`` does the same with ``True``. Python 3.12 made these singletons
immortal, so there the slip is harmless; on 3.10 and 3.11 their reference counts fall by
one per call until one reaches zero and the interpreter aborts with ``Fatal Python error:
none_dealloc: deallocating None`` (or ``bool_dealloc``). A chart redraw makes thousands
of such calls, so the Performance page took the app down within seconds while an answer
streamed (about 2,000-2,800 references per redraw), and within a minute idle. The traceback
names whatever call made the last decrement (``setXRange`` in a linked view), not the
culprit. 6.11.3 does not do this (measured: no change over 1,000 calls).

Two layers of defence:

1. pyproject.toml excludes the broken release, so a new install gets a good binding.
2. ``install()`` measures the running binding at start-up (a few hundred void calls and
   emits) and, if it drops references, gives None, True and False a reference count so
   large (2**60) that no run can exhaust it: the same thing Python 3.12 does for them.
   That turns the binding's slip into a no-op rather than hiding a bug of ours, and it
   covers an environment where another package pinned the broken binding.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Callable

log = logging.getLogger("hearth.gui.binding")

SINGLETONS = (None, True, False)
# References added to each singleton. At the ~10,000 lost per second of a streaming redraw,
# 2**60 lasts far longer than any process; Py_ssize_t still has 2**63 of room.
PIN = 1 << 60
PROBE_CALLS = 256


def _refcounts() -> tuple[int, ...]:
    return tuple(sys.getrefcount(o) for o in SINGLETONS)


def _qt_probe() -> Callable[[], None]:
    """One void Qt call and one signal emit, the two shapes seen to drop references."""
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        ping = Signal(int)

    probe = _Probe()
    probe.ping.connect(lambda _v: None)

    def call() -> None:
        probe.setObjectName("hearth-binding-probe")  # returns nothing (None)
        probe.ping.emit(1)                           # returns True
    call.keepalive = probe  # type: ignore[attr-defined]
    return call


def singleton_refs_lost(probe: Callable[[], None] | None = None, calls: int = PROBE_CALLS) -> int:
    """References to None/True/False lost over ``calls`` probe calls (0 for a sound binding).

    ``probe`` defaults to real Qt calls; a correct binding leaves the counts where they were
    (the probe holds no new references), a faulty one loses one per call or more.
    """
    probe = probe or _qt_probe()
    probe()  # first call may create caches; not counted
    before = _refcounts()
    for _ in range(calls):
        probe()
    after = _refcounts()
    return max(0, sum(b - a for b, a in zip(before, after)))


def singletons_pinned() -> bool:
    """True when None/True/False can't reach zero: immortal (3.12+) or pinned by us."""
    if sys.version_info >= (3, 12):
        return True
    return all(sys.getrefcount(o) >= PIN // 2 for o in SINGLETONS)


def pin_singletons() -> bool:
    """Add ``PIN`` references to None, True and False; False where that can't be done
    (not CPython, or a version whose singletons are immortal already)."""
    if sys.implementation.name != "cpython" or sys.version_info >= (3, 12):
        return False
    # CPython <= 3.11: ob_refcnt (Py_ssize_t) is the first field of every object, except
    # in a Py_TRACE_REFS build; check that the field read there is the count before writing.
    fields = [ctypes.c_ssize_t.from_address(id(obj)) for obj in SINGLETONS]
    if any(f.value != sys.getrefcount(obj) - 1 for f, obj in zip(fields, SINGLETONS)):
        return False
    for f in fields:
        f.value += PIN
    return True


def install(probe: Callable[[], None] | None = None) -> str | None:
    """Check the running Qt binding; pin the singletons if it loses references.

    Returns a one-line description of what was found and done, or None when the binding
    is sound (or the singletons are immortal anyway). Call once, after QApplication exists.
    """
    if singletons_pinned():
        return None
    lost = singleton_refs_lost(probe)
    if lost < PROBE_CALLS // 2:  # noise is a handful at most; the fault is >= one per call
        return None
    try:
        from PySide6 import __version__ as pyside_version
    except ImportError:  # pragma: no cover - only a test's fake probe gets here without Qt
        pyside_version = "?"
    found = (f"PySide6 {pyside_version} on Python {sys.version_info.major}."
             f"{sys.version_info.minor} drops references to None/True ({lost} in {PROBE_CALLS} calls)")
    cure = "install another PySide6 release: pip install 'PySide6-Essentials!=6.12.0'"
    if pin_singletons():
        message = f"{found}; Hearth pinned them so the app can't abort. To fix it at the source, {cure}."
        log.warning(message)
    else:  # an interpreter whose object layout we don't know: say so, change nothing
        message = f"{found}; the app may abort after a while: {cure}."
        log.error(message)
    return message
