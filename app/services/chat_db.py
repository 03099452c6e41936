"""Where the chats live: the SQLite file, or memory while the file can't be written (Qt-free).

``ChatStore`` keeps its schema and queries; this module keeps the connection and its
states, so the app opens and keeps every chat whatever the disk does (issue 12):

- ``"normal"``: the file is open read-write and every change is in it at once.
- ``"read-only"``: the file was read (every chat is shown) but can't be written (a
  read-only folder, an immutable file, a full disk, a disk error): the chats were copied
  into memory, changes go there, and ``retry_saving`` writes them all back to the file
  when it can (permissions fixed, space freed), returning to ``"normal"``.
- ``"memory"``: nothing could be read (the folder can't be created, the file can't be
  read, or it was damaged and couldn't be moved aside): chats of this session live in
  memory only. They are written to the file later only where that can't overwrite
  chats that were never read (there was no file).

A damaged file (not a database, malformed) is moved aside with a timestamped name, kept
for the user, and a new one started. ``problem`` says, in words for the user, what is
wrong and what to do; listeners hear of every change of state.

A write that fails on the disk (``write``) never reaches the caller: the chats move to
memory as they are in the file, and the write runs again there. Write-back replaces the
file's content with the memory copy (SQLite's backup API); another Hearth writing the
same file in the meantime would lose its changes, but it could not write either.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app.services.user_data import DATA_DIR_ENV, move_aside

log = logging.getLogger("hearth.app.chats")

T = TypeVar("T")
MODES = ("normal", "read-only", "memory")
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
_SQLITE_HEADER = b"SQLite format 3\x00"
_SPACE_MARGIN = 1 << 20  # write back only with this much room to spare beyond the chats
_LOST = ("Until then, chats of this session are kept only in memory and are lost if Hearth "
         "closes.")


class StorageError(Exception):
    """The chats could be kept neither in the file nor in memory (the message says why)."""


def connect_file(target: str, *, uri: bool = False) -> sqlite3.Connection:
    """A connection to a database file, autocommit."""
    return sqlite3.connect(target, isolation_level=None, uri=uri)


def problem_kind(exc: BaseException) -> str | None:
    """What kind of trouble with the file ``exc`` is: ``"corrupt"``, ``"full"``,
    ``"read-only"``, ``"unavailable"`` (can't open, I/O error, locked), or None (not the
    disk's fault: a bug, to be raised)."""
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "full"
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return "read-only"
        return "unavailable"
    if type(exc) not in (sqlite3.DatabaseError, sqlite3.OperationalError):
        return None  # IntegrityError, ProgrammingError…: the code's fault, not the disk's
    # sqlite_errorname is Python 3.11+, and absent on an error raised by hand: the
    # messages are SQLite's own, stable across versions.
    name, text = getattr(exc, "sqlite_errorname", "") or "", str(exc).lower()
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "file is not a database" in text \
            or "malformed" in text:
        return "corrupt"
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return "full"
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        return "read-only"
    return "unavailable"


def _where(path: Path, kind: str) -> str:
    """The cause, from the folder itself where SQLite's error is vague (a full disk shows
    up as "disk I/O error" when SQLite's shared-memory file can't grow)."""
    folder = path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    try:
        if shutil.disk_usage(existing).free < _SPACE_MARGIN:
            kind = "full"
    except OSError:
        pass
    if kind == "full":
        return f"the disk holding {folder} is full. Free some space"
    if not os.access(existing, os.W_OK):
        return f"the data folder {folder} is read-only. Fix its permissions (or set {DATA_DIR_ENV} " \
               "to a writable folder)"
    if kind == "read-only" or (path.exists() and not os.access(path, os.W_OK)):
        return f"the file {path} is read-only. Fix its permissions"
    return f"{path} can't be written to. Check the disk and the folder's permissions"


def cannot_save_text(path: Path, exc: BaseException) -> str:
    """What the banner says while chats can't be saved: what is wrong and what to do."""
    kind = problem_kind(exc) or "unavailable"
    return (f"Chat history can't be saved ({_reason(exc)}): {_where(path, kind)}; Hearth saves "
            f"this session's chats as soon as it can. {_LOST}")


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def _not_a_database(path: Path) -> bool:
    """Whether ``path`` holds something other than an SQLite database (an empty file is a
    new database; one that can't be read is for SQLite to judge)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except OSError:
        return False
    return bool(head) and head != _SQLITE_HEADER


class ChatDatabase:
    """The connection ``ChatStore`` runs its SQL on (``conn``), and where it lives.

    ``configure(conn)`` sets up every connection (functions, pragmas); ``prepare(conn)``
    runs once on the database opened (schema upgrade, clean-up) and must write, which is
    how a file that can't be written is found out at once rather than at the first answer.
    """

    def __init__(self, path: Path, configure: Callable[[sqlite3.Connection], None],
                 prepare: Callable[[sqlite3.Connection], None]) -> None:
        self.path = path
        self._configure = configure
        self._prepare = prepare
        self.conn: sqlite3.Connection | None = None
        self.mode = "normal"
        #: What is wrong, for the user (None: nothing). In "normal" mode it is news to
        #: read once (the file was moved aside); otherwise chats are not being saved.
        self.problem: str | None = None
        self.moved_aside: Path | None = None  # where a damaged file was kept
        self.unsaved_changes = False          # changes made in memory, not yet in the file
        self._write_back = True               # the memory copy may replace the file
        self._in_write = False
        self._listeners: list[Callable[[], None]] = []

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def connect(cls, path: Path, configure, prepare) -> ChatDatabase:
        """The file, read-write, or an exception (sqlite3.Error, OSError)."""
        db = cls(path, configure, prepare)
        db.conn = db._open_file(prepare=True)
        return db

    @classmethod
    def open(cls, path: Path, configure, prepare) -> ChatDatabase:
        """The file if it can be used, else the best state there is (see the module's
        docstring); never raises for anything the disk does."""
        db = cls(path, configure, prepare)
        if _not_a_database(path):
            # Moved aside before SQLite opens it: closing it, SQLite would delete its
            # journal (-wal), which may hold the latest chats.
            return db._replace_damaged(sqlite3.DatabaseError("file is not a database"))
        try:
            db.conn = db._open_file(prepare=True)
            return db
        except (sqlite3.Error, OSError) as exc:
            failure = exc
        log.warning("cannot open the chat history %s: %s", path, failure)
        if problem_kind(failure) == "corrupt":
            return db._replace_damaged(failure)
        return db._open_read_only(failure)

    @classmethod
    def in_memory(cls, path: Path, problem: str, configure, prepare) -> ChatDatabase:
        """An empty database in memory, to be written to ``path`` when that can be made
        (the data folder can't be created: ``problem`` says so)."""
        return cls(path, configure, prepare)._start_in_memory(f"{problem} {_LOST}", write_back=True)

    def _open_file(self, *, prepare: bool) -> sqlite3.Connection:
        """A read-write connection to the file (WAL: frequent small writes stay cheap)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect_file(str(self.path))
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._configure(conn)
            if prepare:
                self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _replace_damaged(self, failure: BaseException) -> ChatDatabase:
        """Keep the damaged file under another name and start a new one."""
        aside = move_aside(self.path)
        if aside is None:
            return self._start_in_memory(
                f"Your chat history {self.path} is damaged ({_reason(failure)}) and could not be "
                f"moved aside, so it isn't shown. Move it out of {self.path.parent} and restart "
                f"Hearth. {_LOST}", write_back=False)
        for suffix in ("-wal", "-shm"):  # its journal would be replayed into the new file
            companion = self.path.with_name(self.path.name + suffix)
            if companion.exists():
                try:
                    os.replace(companion, aside.with_name(aside.name + suffix))
                except OSError as exc:
                    log.warning("cannot move %s aside: %s", companion, exc)
        self.moved_aside = aside
        log.warning("chat history %s was damaged (%s); kept as %s", self.path, failure, aside)
        note = (f"Your chat history was damaged ({_reason(failure)}) and could not be opened. It was "
                f"kept as {aside.name} in {self.path.parent}, and a new, empty chat history was "
                "started.")
        try:
            self.conn = self._open_file(prepare=True)
        except (sqlite3.Error, OSError) as exc:
            return self._start_in_memory(f"{note} {cannot_save_text(self.path, exc)}", write_back=True)
        self.problem = note
        return self

    def _open_read_only(self, failure: BaseException) -> ChatDatabase:
        """The file can't be written: show its chats from a copy in memory."""
        if not self.path.exists():
            return self._start_in_memory(cannot_save_text(self.path, failure), write_back=True)
        try:
            self.conn, complete = self._read_copy()
            self._prepare(self.conn)
        except (sqlite3.Error, OSError) as exc:
            log.warning("cannot read the chat history %s: %s", self.path, exc)
            if self.conn is not None:
                self.conn.close()
            return self._start_in_memory(
                f"Your chat history {self.path} can't be read ({_reason(exc)}), so it isn't shown; "
                f"it is left as it is. Fix its permissions and restart Hearth. {_LOST}",
                write_back=False)
        self.mode = "read-only"
        self._write_back = complete
        self.problem = cannot_save_text(self.path, failure)
        if not complete:
            self.problem = (f"Chat history is read-only: {self.path} can't be written, and its "
                            f"latest changes can't be read without writing. Fix the folder's "
                            f"permissions and restart Hearth. {_LOST}")
        return self

    def _read_copy(self) -> tuple[sqlite3.Connection, bool]:
        """The file copied into memory, read without writing anything, and whether the copy
        is complete. ``mode=ro`` reads the journal too but needs its shared-memory file;
        where that can't be made (a read-only folder) ``immutable=1`` reads the main file
        alone, missing whatever the journal (``-wal``) still holds."""
        wal = self.path.with_name(self.path.name + "-wal")
        last: BaseException | None = None
        for query in ("mode=ro", "immutable=1"):
            memory = sqlite3.connect(":memory:", isolation_level=None)
            try:
                src = connect_file(f"{self.path.resolve().as_uri()}?{query}", uri=True)
            except sqlite3.Error as exc:
                memory.close()
                last = exc
                continue
            try:
                src.execute("SELECT count(*) FROM sqlite_master").fetchone()
                src.backup(memory)
            except sqlite3.Error as exc:
                memory.close()
                last = exc
                continue
            finally:
                src.close()
            self._configure(memory)
            complete = query == "mode=ro" or not (wal.exists() and wal.stat().st_size > 0)
            return memory, complete
        raise last  # type: ignore[misc]

    def _start_in_memory(self, problem: str, *, write_back: bool) -> ChatDatabase:
        """An empty database in memory (nothing of the file could be used)."""
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        self._configure(self.conn)
        self._prepare(self.conn)
        self.mode, self.problem, self._write_back = "memory", problem, write_back
        log.warning("chat history in memory only: %s", problem)
        return self

    # -- writing ---------------------------------------------------------------------------
    def write(self, change: Callable[[], T]) -> T:
        """Run ``change`` (which writes through ``conn``) as one transaction. If the file
        fails it, the chats move to memory and it runs again there (see the module's
        docstring); anything else it raises is raised. Nested calls join the outer one."""
        if self._in_write:
            return change()
        self._in_write = True
        try:
            try:
                return self._transaction(change)
            except (sqlite3.Error, OSError) as exc:
                if self.mode != "normal" or problem_kind(exc) is None:
                    raise
                self._move_to_memory(exc)
                return self._transaction(change)
        finally:
            self._in_write = False
            if self.mode != "normal":
                self.unsaved_changes = True

    def _transaction(self, change: Callable[[], T]) -> T:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = change()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled it back itself (a full disk)
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return result

    def _move_to_memory(self, failure: BaseException) -> None:
        """The file stopped taking writes: carry on from a copy of it in memory."""
        log.warning("cannot write the chat history %s (%s): keeping chats in memory", self.path, failure)
        memory = sqlite3.connect(":memory:", isolation_level=None)
        try:
            self.conn.backup(memory)
            self._configure(memory)
        except sqlite3.Error as exc:
            memory.close()
            raise StorageError(f"Chat history can't be saved or read: {_reason(failure)}; then "
                               f"{_reason(exc)}. Check the disk holding {self.path.parent}.") from exc
        old, self.conn = self.conn, memory
        try:
            old.close()
        except sqlite3.Error:
            pass
        self.mode = "read-only"
        self.problem = cannot_save_text(self.path, failure)
        self._notify()

    # -- saving again ------------------------------------------------------------------------
    @property
    def retrying(self) -> bool:
        """Whether ``retry_saving`` may still bring the chats back to the file."""
        return self.mode != "normal" and self._write_back

    def retry_saving(self) -> bool:
        """Try once to write the chats in memory to the file; True when the store saves to
        the file again (then ``problem`` is None). Cheap when it can't: a disk without
        room for the chats isn't even tried, so a retry never fills what was freed."""
        if self.mode == "normal":
            return True
        if not self._write_back or self._in_write:
            return False
        try:
            size = self.conn.execute("PRAGMA page_count").fetchone()[0] * \
                self.conn.execute("PRAGMA page_size").fetchone()[0]
            folder = next(p for p in (self.path.parent, *self.path.parents) if p.exists())
            if shutil.disk_usage(folder).free < size + _SPACE_MARGIN:
                return False
            target = self._open_file(prepare=False)
        except (sqlite3.Error, OSError) as exc:
            log.info("chat history still can't be saved: %s", exc)
            return False
        try:
            self.conn.backup(target, progress=_give_up_when_busy)
            target.execute("PRAGMA journal_mode=WAL")
        except (sqlite3.Error, OSError, _Busy) as exc:
            log.info("chat history still can't be saved: %s", exc)
            target.close()
            return False
        old, self.conn = self.conn, target
        old.close()
        self.mode, self.problem, self.unsaved_changes = "normal", None, False
        log.warning("chat history is saved to %s again", self.path)
        self._notify()
        return True

    # -- listeners ---------------------------------------------------------------------------
    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``mode`` or ``problem`` changes."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class _Busy(Exception):
    """Another connection holds the file: give the write-back up until the next try."""


def _give_up_when_busy(status: int, _remaining: int, _total: int) -> None:
    # Python's backup() retries a busy file forever; a retry must never hang the app.
    if status in (_SQLITE_BUSY, _SQLITE_LOCKED):
        raise _Busy("the chat history file is in use")
