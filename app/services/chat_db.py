"""Where the chats live: the SQLite file, or memory while the file can't be written (Qt-free).

``ChatStore`` keeps its schema and queries; this module keeps the connection and its
states, so the app opens and keeps every chat whatever the disk does (issue 12):

- ``"normal"``: the file is open read-write and every change is in it at once.
- ``"read-only"``: the file was read (every chat is shown) but can't be written (a
  read-only folder or file, an immutable file, a full disk, a disk error): the chats were
  copied into memory, changes go there, and ``retry_saving`` writes them back to the file
  when it can (permissions fixed, space freed), returning to ``"normal"``.
- ``"memory"``: nothing could be read (the folder can't be created or searched, the file
  can't be read, or it was damaged and couldn't be moved aside), or the file changed while
  this session's chats were in memory: chats of this session live in memory only.

A damaged file (not a database, malformed) is moved aside with a timestamped name, kept
for the user, and a new one started. ``problem`` says, in words for the user, what is
wrong and what to do; listeners hear of every change of state.

A lock held by another connection (another Hearth writing the same file) is not a disk
failure: every connection waits up to ``BUSY_TIMEOUT_S`` for it, a write waits once more,
and a write still locked out raises ``StorageError`` (the chats stay on the file, nothing
moves to memory). Any other failure of the disk in ``write`` never reaches the caller: the
chats move to memory as they are in the file, and the write runs again there.

Writing back never overwrites what someone else wrote. The copy in memory remembers what
the file held when it was taken (``content_digest``); the write-back replaces the file's
rows in one transaction that holds the file's write lock, and only if the file still holds
exactly that. If it doesn't (another Hearth saved chats meanwhile, or a file that couldn't
be looked at holds chats), this session's chats are saved beside it as
``<name>.unsaved-<time>`` instead, and ``problem`` says so.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app.services.chat_file import (LOST, SPACE_MARGIN, cannot_save_text, companion, companions,
                                    content_digest, copy_rows_back, exists, free_space, not_a_database,
                                    problem_kind, reason, remove_new_companions, save_copy_beside, size,
                                    unwritable, where_text)
from app.services.user_data import move_aside

log = logging.getLogger("hearth.app.chats")

T = TypeVar("T")
MODES = ("normal", "read-only", "memory")
#: How long a connection waits for another connection's lock before giving up (a write
#: waits twice): Hearth's own transactions last milliseconds, so this is generous.
BUSY_TIMEOUT_S = 2.0
_RETRY_PAUSE_S = (5.0, 300.0)  # first and longest pause after a write-back that failed


class StorageError(Exception):
    """A change to the chats could not be kept (the message says why and what to do)."""


def connect_file(target: str, *, uri: bool = False) -> sqlite3.Connection:
    """A connection to a database file, autocommit, that waits up to ``BUSY_TIMEOUT_S``
    for another connection's lock."""
    return sqlite3.connect(target, isolation_level=None, uri=uri, timeout=BUSY_TIMEOUT_S)


def _connect_memory() -> sqlite3.Connection:
    # The timeout counts when the file is attached to it for a write-back.
    return sqlite3.connect(":memory:", isolation_level=None, timeout=BUSY_TIMEOUT_S)


class ChatDatabase:
    """The connection ``ChatStore`` runs its SQL on (``conn``), and where it lives.

    ``configure(conn)`` sets up every connection (functions, pragmas); ``prepare(conn)``
    runs once on the database opened (schema upgrade, clean-up) and must write, which is
    how a file that can't be written is found out at once rather than at the first answer.
    """

    def __init__(self, path: Path, configure: Callable[[sqlite3.Connection], None],
                 prepare: Callable[[sqlite3.Connection], None],
                 salvage: Callable[[Path, sqlite3.Connection], str | None] | None = None) -> None:
        self.path = path
        self._configure = configure
        self._prepare = prepare
        # salvage(damaged file, new connection): copies what of a damaged file can still be
        # read into the new one, and says what it saved (None: nothing)
        self._salvage = salvage
        self.conn: sqlite3.Connection | None = None
        self.mode = "normal"
        #: What is wrong, for the user (None: nothing). In "normal" mode it is news to
        #: read once (the file was moved aside); otherwise chats are not being saved.
        self.problem: str | None = None
        self.moved_aside: Path | None = None  # where a damaged file was kept
        self.unsaved_changes = False          # changes made in memory, not yet in the file
        self._write_back = True               # the memory copy may go back to the file
        # What the file held when the memory copy was taken (content_digest), and whether
        # the file must be prepared first to compare with it (the copy was prepared in
        # memory, the file wasn't).
        self._baseline: str | None = None
        self._prepare_file = True
        self._pause_s, self._next_try = _RETRY_PAUSE_S[0], 0.0
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
    def open(cls, path: Path, configure, prepare, salvage=None) -> ChatDatabase:
        """The file if it can be used, else the best state there is (see the module's
        docstring); never raises for anything the disk does. ``salvage``: see __init__."""
        db = cls(path, configure, prepare, salvage)
        if not_a_database(path):
            # Moved aside before SQLite opens it: closing it, SQLite would delete its
            # journal (-wal), which may hold the latest chats.
            return db._replace_damaged(sqlite3.DatabaseError("file is not a database"))
        blocked = unwritable(path)
        if blocked is not None:
            # Not even tried read-write: SQLite would fall back to read-only and make a
            # -shm as read-only as the file, which stays after the user fixes the file.
            log.warning("cannot write the chat history %s: %s", path, blocked)
            return db._open_read_only(blocked)
        failure: BaseException | None = None
        for _attempt in range(2):  # a lock passes: wait for it once more
            try:
                db.conn = db._open_file(prepare=True)
                return db
            except (sqlite3.Error, OSError) as exc:
                failure = exc
            if problem_kind(failure) != "busy":
                break
        log.warning("cannot open the chat history %s: %s", path, failure)
        if problem_kind(failure) == "corrupt":
            return db._replace_damaged(failure)
        return db._open_read_only(failure)

    @classmethod
    def in_memory(cls, path: Path, problem: str, configure, prepare) -> ChatDatabase:
        """An empty database in memory, to be written to ``path`` when that can be made
        (the data folder can't be created: ``problem`` says so)."""
        return cls(path, configure, prepare)._start_in_memory(f"{problem} {LOST}", write_back=True)

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
                f"Your chat history {self.path} is damaged ({reason(failure)}) and could not be "
                f"moved aside, so it isn't shown. Move it out of {self.path.parent} and restart "
                f"Hearth. {LOST}", write_back=False)
        for suffix in ("-wal", "-shm"):  # its journal would be replayed into the new file
            extra = companion(self.path, suffix)
            if exists(extra):
                try:
                    os.replace(extra, companion(aside, suffix))
                except OSError as exc:
                    log.warning("cannot move %s aside: %s", extra, exc)
        self.moved_aside = aside
        log.warning("chat history %s was damaged (%s); kept as %s", self.path, failure, aside)
        note = (f"Your chat history was damaged ({reason(failure)}) and could not be opened. It was "
                f"kept as {aside.name} in {self.path.parent}, and a new, empty chat history was "
                "started.")
        try:
            self.conn = self._open_file(prepare=True)
        except (sqlite3.Error, OSError) as exc:
            return self._start_in_memory(f"{note} {cannot_save_text(self.path, exc)}", write_back=True)
        saved = None
        if self._salvage is not None:
            try:
                saved = self._salvage(aside, self.conn)
            except Exception as exc:  # noqa: BLE001 - whatever a damaged file does, the new history opens
                log.warning("nothing could be recovered from %s: %s: %s", aside, type(exc).__name__, exc)
                if self.conn.in_transaction:
                    self.conn.rollback()
        if saved:
            note = (f"Your chat history was damaged ({reason(failure)}) and could not be opened as it was: "
                    f"{saved} into a new chat history. The damaged file was kept as {aside.name} in "
                    f"{self.path.parent}.")
        self.problem = note
        return self

    def _open_read_only(self, failure: BaseException) -> ChatDatabase:
        """The file can't be written: show its chats from a copy in memory."""
        found = exists(self.path)
        if found is None:  # the folder can't be searched: the file may well hold chats
            return self._start_in_memory(
                f"Your chat history can't be opened ({reason(failure)}): "
                f"{where_text(self.path, 'unavailable')}, and restart Hearth to see your chats. {LOST}",
                write_back=True)  # once it can: beside the file if that holds chats
        if not found:
            return self._start_in_memory(cannot_save_text(self.path, failure), write_back=True)
        try:
            self.conn, complete = self._read_copy()
            self._prepare(self.conn)
        except (sqlite3.Error, OSError) as exc:
            log.warning("cannot read the chat history %s: %s", self.path, exc)
            if self.conn is not None:
                self.conn.close()
            return self._start_in_memory(
                f"Your chat history {self.path} can't be read ({reason(exc)}), so it isn't shown; "
                f"it is left as it is. Fix its permissions and restart Hearth. {LOST}",
                write_back=False)
        self.mode = "read-only"
        self._write_back = complete
        self._baseline, self._prepare_file = content_digest(self.conn), True
        self.problem = cannot_save_text(self.path, failure)
        if not complete:
            self.problem = (f"Chat history is read-only: {self.path} can't be written, and its "
                            f"latest changes can't be read without writing. Fix the folder's "
                            f"permissions and restart Hearth. {LOST}")
        return self

    def _read_copy(self) -> tuple[sqlite3.Connection, bool]:
        """The file copied into memory, read without writing anything, and whether the copy
        is complete. With no journal (``-wal``) to read, ``immutable=1`` reads the main
        file and creates nothing. A journal needs ``mode=ro``, which creates the shared-
        memory file (``-shm``) if it is missing, as read-only as the file: removed again
        once read (``remove_new_companions``). Where even that fails (a read-only folder),
        ``immutable=1`` reads the main file alone, missing what the journal holds."""
        journal = size(companion(self.path, "-wal")) > 0
        before = companions(self.path)
        last: BaseException | None = None
        try:
            for query in (("mode=ro", "immutable=1") if journal else ("immutable=1",)):
                memory = _connect_memory()
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
                return memory, query == "mode=ro" or not journal
        finally:
            remove_new_companions(self.path, before)
        raise last  # type: ignore[misc]

    def _start_in_memory(self, problem: str, *, write_back: bool) -> ChatDatabase:
        """An empty database in memory (nothing of the file could be used). Written back
        only over a file that holds no chats either (its baseline is an empty history)."""
        self.conn = _connect_memory()
        self._configure(self.conn)
        self._prepare(self.conn)
        self.mode, self.problem, self._write_back = "memory", problem, write_back
        self._baseline, self._prepare_file = content_digest(self.conn), True
        log.warning("chat history in memory only: %s", problem)
        return self

    # -- writing ---------------------------------------------------------------------------
    def write(self, change: Callable[[], T]) -> T:
        """Run ``change`` (which writes through ``conn``) as one transaction. If the file
        fails it, the chats move to memory and it runs again there (see the module's
        docstring). Raises StorageError when the change can't be kept (the file stays
        locked; memory fails), and whatever else ``change`` raises (a bug). Nested calls
        join the outer one."""
        if self._in_write:
            return change()
        self._in_write = True
        try:
            return self._write(change)
        finally:
            self._in_write = False
            if self.mode != "normal":
                self.unsaved_changes = True

    def _write(self, change: Callable[[], T]) -> T:
        try:
            return self._transaction(change)
        except (sqlite3.Error, OSError) as exc:
            failure = exc
        if problem_kind(failure) == "busy":
            log.info("chat history %s is locked (%s): waiting once more", self.path, failure)
            try:
                return self._transaction(change)
            except (sqlite3.Error, OSError) as exc:
                failure = exc
            if problem_kind(failure) == "busy":
                raise StorageError(
                    f"The chat history {self.path} is in use by another program (another Hearth "
                    f"window?) and stayed locked for {2 * BUSY_TIMEOUT_S:g} s, so this change "
                    "wasn't saved. Try again in a moment.") from failure
        if problem_kind(failure) is None:
            raise failure
        if self.mode != "normal":
            raise StorageError(f"Chat history can't be kept, not even in memory: {reason(failure)}.") \
                from failure
        self._move_to_memory(failure)
        try:
            return self._transaction(change)
        except (sqlite3.Error, OSError) as exc:
            if problem_kind(exc) is None:
                raise
            raise StorageError(f"Chat history can't be kept, not even in memory: {reason(exc)}.") from exc

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
        memory = _connect_memory()
        try:
            self.conn.backup(memory)
            self._configure(memory)
            baseline = content_digest(memory)
        except sqlite3.Error as exc:
            memory.close()
            raise StorageError(f"Chat history can't be saved or read: {reason(failure)}; then "
                               f"{reason(exc)}. Check the disk holding {self.path.parent}.") from exc
        old, self.conn = self.conn, memory
        try:
            old.close()
        except sqlite3.Error:
            pass
        self.mode = "read-only"
        self._baseline, self._prepare_file = baseline, False  # the file was prepared at open
        self.problem = cannot_save_text(self.path, failure)
        self._notify()

    # -- saving again ------------------------------------------------------------------------
    @property
    def retrying(self) -> bool:
        """Whether ``retry_saving`` may still bring the chats back to the file."""
        return self.mode != "normal" and self._write_back

    def retry_saving(self, *, now: bool = True) -> bool:
        """Try once to write the chats in memory to the file; True when the store saves to
        the file again (then ``problem`` is None).

        Cheap while it can't work: nothing is opened while the folder, the file or its
        companions aren't writable or the disk lacks room for about twice the chats (the
        write-back passes through the journal). With no change made in memory the file is
        simply opened again, nothing copied. A write-back that failed anyway is tried
        again by ``now=False`` calls (the banner's timer) only after a pause that grows
        from 5 s to 5 min; ``now=True`` (Try again, quitting) tries at once."""
        if self.mode == "normal":
            return True
        if not self._write_back or self._in_write or not self._could_write():
            return False
        if not now and time.monotonic() < self._next_try:
            return False
        try:
            if not self.unsaved_changes:  # nothing of this session's to write
                self._switch_to(self._open_file(prepare=True))
                return True
            target = self._open_file(prepare=self._prepare_file)
            try:
                unchanged = self._copy_into_file()
            except BaseException:
                target.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            log.info("chat history still can't be saved: %s", exc)
            self._next_try = time.monotonic() + self._pause_s
            self._pause_s = min(2 * self._pause_s, _RETRY_PAUSE_S[1])
            return False
        if not unchanged:
            target.close()
            self._keep_apart()
            return False
        self._switch_to(target)
        return True

    def _could_write(self) -> bool:
        """Whether a write-back may work now, from checks that open nothing."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        if not os.access(folder, os.W_OK | os.X_OK) or unwritable(self.path) is not None:
            return False
        size_now = self.conn.execute("PRAGMA page_count").fetchone()[0] * \
            self.conn.execute("PRAGMA page_size").fetchone()[0]
        free = free_space(folder)
        # The rows go to the journal first, beside the file's old pages: about twice.
        return free is None or free >= 2 * size_now + SPACE_MARGIN

    def _copy_into_file(self) -> bool:
        """The memory copy's rows into the file, if it still holds what it held when the
        copy was taken (``copy_rows_back``); False, and nothing written, if it doesn't."""
        return copy_rows_back(self.conn, self.path, self._baseline)

    def _keep_apart(self) -> None:
        """The file changed since the copy was taken: save this session's chats beside it,
        never over it, and stop writing back."""
        aside = save_copy_beside(self.conn, self.path, connect_file)
        saved = aside is not None
        self.mode, self._write_back = "memory", False
        changed = (f"{self.path} holds chats this session hasn't read (another Hearth window may have "
                   "saved them while this session's chats were kept in memory), so this session's "
                   "chats were not written over them")
        if saved:
            log.warning("chat history %s changed meanwhile: this session's chats are saved as %s",
                        self.path, aside)
            self.unsaved_changes = False
            self.problem = (f"{changed}: they were saved as {aside.name} in {self.path.parent}. "
                            f"Restart Hearth to see the chat history; to use this session's chats "
                            f"instead, close Hearth and rename {aside.name} to {self.path.name}. "
                            "Changes made from now on are kept only in memory and are lost if "
                            "Hearth closes.")
        else:
            log.warning("chat history %s changed meanwhile: this session's chats stay in memory", self.path)
            self.problem = (f"{changed}, and they could not be saved beside it either. They are kept "
                            "only in memory and are lost if Hearth closes: export the chats you want "
                            "to keep (right-click a chat, Export), then restart Hearth.")
        self._notify()

    def _switch_to(self, target: sqlite3.Connection) -> None:
        """Save to the file again, through ``target``."""
        old, self.conn = self.conn, target
        old.close()
        self.mode, self.problem, self.unsaved_changes = "normal", None, False
        self._baseline = None
        self._pause_s, self._next_try = _RETRY_PAUSE_S[0], 0.0
        log.warning("chat history is saved to %s again", self.path)
        self._notify()

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
