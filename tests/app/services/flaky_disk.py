"""A disk that fails on demand, for the chat store's file (issue 12: full, read-only).

``install(monkeypatch)`` makes every SQLite connection to a file (not ``:memory:``) one
whose writes raise ``disk.failure`` while it is set, as SQLite does on a full disk or a
read-only file: reads still work, and so does everything once ``failure`` is None again
("space returns"). It patches ``sqlite3.connect`` itself, so it works on any version of
the store. The errors are the ones SQLite really gives (seen on a full tmpfs, a read-only
folder and a ``chattr +i`` file).
"""

from __future__ import annotations

import errno
import sqlite3

FULL = sqlite3.OperationalError("database or disk is full")
READ_ONLY = sqlite3.OperationalError("attempt to write a readonly database")
NO_SPACE = OSError(errno.ENOSPC, "No space left on device")

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "ALTER", "DROP")


class Disk:
    failure: BaseException | None = None
    writes_failed = 0


def _is_write(sql: str) -> bool:
    head = sql.lstrip().upper()
    return head.startswith(_WRITES) or (head.startswith("PRAGMA") and "=" in head)


def install(monkeypatch) -> Disk:
    disk = Disk()
    real_connect = sqlite3.connect

    class FlakyConnection(sqlite3.Connection):
        def execute(self, sql, *args):
            if disk.failure is not None and _is_write(sql):
                disk.writes_failed += 1
                raise disk.failure
            return super().execute(sql, *args)

    def connect(target, *args, **kwargs):
        if str(target) != ":memory:":
            kwargs["factory"] = FlakyConnection
        return real_connect(target, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    return disk
