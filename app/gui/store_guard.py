"""The one guard every chat-store write of the GUI goes through, and writes it retries.

A store write raises ``StorageError`` when the change can't be kept (the file stays
locked by another program; not even memory takes it), with a message for the user; a
disk the store didn't foresee, or a bug, can still raise an ``sqlite3.Error``. Neither
may reach a Qt slot as a traceback: the guard shows one line (in the chat page's notice
bar), logs what the user needn't read, and tells the caller the write didn't happen.
``RetriedSaves`` keeps a write that must land (a finished answer's last save) and tries it
again until the store takes it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PySide6.QtCore import QObject, QTimer

from app.services.chat_store import StorageError

log = logging.getLogger("hearth.app.chats")


@dataclass
class Outcome:
    """Whether the guarded writes all happened (False: the rest of the block was skipped)."""
    ok: bool = True


class StoreGuard:
    """``with guard("The chat could not be renamed") as done: store.rename(...)``: a
    failure ends the block, ``report`` gets the line to show, and ``done.ok`` is False."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report

    @contextmanager
    def __call__(self, what: str) -> Iterator[Outcome]:
        outcome = Outcome()
        try:
            yield outcome
        except StorageError as exc:
            outcome.ok = False
            log.warning("%s: %s", what, exc)
            self._report(f"{what}. {exc}")
        except sqlite3.Error as exc:
            outcome.ok = False
            log.error("%s", what, exc_info=True)  # unforeseen: the traceback goes to the log
            self._report(f"{what} ({exc}). Check the disk holding the chat history, and try again.")


class RetriedSaves:
    """Writes that must land: one the store refuses is kept (the latest per ``key``) and
    tried again every ``interval_ms`` until it is saved; ``flush`` tries them now."""

    def __init__(self, guard: StoreGuard, what: str, parent: QObject, interval_ms: int) -> None:
        self._guard, self._what = guard, what
        self._pending: dict[object, Callable[[], object]] = {}
        self.timer = QTimer(parent)
        self.timer.setSingleShot(True)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.flush)

    def save(self, key: object, write: Callable[[], object]) -> None:
        """Run ``write()`` now, or later if the store refuses it."""
        self._pending[key] = write
        self.flush()

    def flush(self) -> None:
        for key, write in list(self._pending.items()):
            with self._guard(self._what) as saved:
                write()
            if not saved.ok:  # the store is still refusing: the rest waits too
                self.timer.start()
                return
            del self._pending[key]
