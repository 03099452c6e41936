"""The chat history's file on disk (Qt-free): what is wrong with it, in words for the user,
the two files SQLite keeps beside it (``-wal``, ``-shm``), and writing a copy kept in
memory back to it without overwriting what someone else wrote meanwhile.

Every check here works in a folder the app may not look into (no search permission):
``Path.exists`` raises there (EACCES is not one of the errors it swallows), which once
stopped the app from starting; ``exists`` answers None ("can't tell") instead.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from app.services.user_data import DATA_DIR_ENV, aside_path

log = logging.getLogger("hearth.app.chats")

COMPANIONS = ("-wal", "-shm")  # SQLite's journal and its shared-memory index
SPACE_MARGIN = 1 << 20  # write back only with this much room to spare beyond the chats
LOST = "Until then, chats of this session are kept only in memory and are lost if Hearth closes."
_SQLITE_HEADER = b"SQLite format 3\x00"


def companion(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def exists(path: Path) -> bool | None:
    """Whether ``path`` exists; None when that can't be told (a folder on the way can't be
    searched)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    except OSError:
        return None
    return True


def size(path: Path) -> int:
    """The file's size; 0 when it is absent or can't be looked at."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def companions(path: Path) -> set[str]:
    """The suffixes of the companion files that exist now."""
    return {s for s in COMPANIONS if exists(companion(path, s))}


def remove_new_companions(path: Path, before: set[str]) -> None:
    """Delete the companions that weren't there in ``before`` (an empty ``-wal``, a
    ``-shm``): a read-only connection makes them with the database's own mode, 0444 for a
    read-only file, and a ``-shm`` left so keeps the file read-only for SQLite after the
    user fixed its permissions. One that existed before belongs to someone: kept."""
    for suffix in COMPANIONS:
        extra = companion(path, suffix)
        if suffix in before or not exists(extra) or (suffix == "-wal" and size(extra) > 0):
            continue
        try:
            extra.unlink()
        except OSError as exc:
            log.warning("cannot remove %s: %s", extra, exc)


def unwritable(path: Path) -> OSError | None:
    """Why SQLite can't write ``path`` (the file, or its ``-wal``/``-shm``, is read-only or
    immutable), or None. Asked before opening the file read-write: opened anyway, SQLite
    falls back to read-only and makes a ``-shm`` as read-only as the file."""
    for p in (path, *(companion(path, s) for s in COMPANIONS)):
        if exists(p) and not os.access(p, os.W_OK):
            return PermissionError(errno.EACCES, "Permission denied", str(p))
    return None


def first_existing(folder: Path) -> Path:
    """``folder``, or its nearest ancestor that exists (the one a new folder would go in)."""
    return next((p for p in (folder, *folder.parents) if exists(p)), folder)


def free_space(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(first_existing(folder)).free
    except OSError:
        return None


def not_a_database(path: Path) -> bool:
    """Whether ``path`` holds something other than an SQLite database (an empty file is a
    new database; one that can't be read is for SQLite to judge)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except OSError:
        return False
    return bool(head) and head != _SQLITE_HEADER


def problem_kind(exc: BaseException) -> str | None:
    """What kind of trouble with the file ``exc`` is: ``"corrupt"``, ``"full"``,
    ``"read-only"``, ``"busy"`` (another connection holds a lock: it passes),
    ``"unavailable"`` (can't open, I/O error), or None (not the disk's fault: a bug, to be
    raised)."""
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
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or " is locked" in text:
        return "busy"
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return "full"
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        return "read-only"
    return "unavailable"


def reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def where_text(path: Path, kind: str) -> str:
    """What is wrong where, and what to do, from the folder and files themselves where
    SQLite's error is vague (a full disk shows up as "disk I/O error" when SQLite's
    shared-memory file can't grow; a read-only ``-shm`` as a read-only database)."""
    folder = path.parent
    existing = first_existing(folder)
    free = free_space(folder)
    if kind == "full" or (free is not None and free < SPACE_MARGIN):
        return f"the disk holding {folder} is full. Free some space"
    if kind == "busy":
        return (f"{path} is in use by another program (another Hearth window?) and stayed locked. "
                "Close that program")
    if not os.access(existing, os.X_OK):
        return (f"the data folder {existing} can't be opened (no permission to look inside it). Fix its "
                f"permissions (or set {DATA_DIR_ENV} to a writable folder)")
    if not os.access(existing, os.W_OK):
        return f"the data folder {existing} is read-only. Fix its permissions (or set {DATA_DIR_ENV} " \
               "to a writable folder)"
    for p in (path, *(companion(path, s) for s in COMPANIONS)):
        if exists(p) and not os.access(p, os.W_OK):
            return f"the file {p} is read-only. Fix its permissions"
    if kind == "read-only":
        return f"the file {path} is read-only. Fix its permissions"
    return f"{path} can't be written to. Check the disk and the folder's permissions"


def cannot_save_text(path: Path, exc: BaseException) -> str:
    """What the banner says while chats can't be saved: what is wrong and what to do."""
    kind = problem_kind(exc) or "unavailable"
    return (f"Chat history can't be saved ({reason(exc)}): {where_text(path, kind)}; Hearth saves "
            f"this session's chats as soon as it can. {LOST}")


def content_digest(conn: sqlite3.Connection, schema: str = "main") -> str:
    """A fingerprint of everything a database holds (schema, user_version, every row), to
    tell whether a file still is what a copy of it was. Rows, not file sizes or times: a
    checkpoint rewrites the file without changing what it holds."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(conn.execute(f"PRAGMA {schema}.user_version").fetchone()).encode())
    master = conn.execute(f"SELECT type, name, tbl_name, sql FROM {schema}.sqlite_master "
                          "ORDER BY type, name").fetchall()
    h.update(repr(master).encode())
    for kind, name, _table, _sql in master:
        if kind == "table":
            for row in conn.execute(f'SELECT * FROM {schema}."{name}" ORDER BY rowid'):
                h.update(repr(row).encode())
    return h.hexdigest()


def copy_rows_back(memory: sqlite3.Connection, path: Path, baseline: str | None) -> bool:
    """Replace the rows of the file ``path`` with those of the ``memory`` database, in one
    transaction that holds the file's write lock, if the file still holds what
    ``baseline`` (``content_digest``) says it held when the copy was taken; False, and
    nothing written, if it doesn't. Both must have the same schema (the digest covers
    it). The file's old pages stay until a checkpoint: it needs room for about twice the
    rows while this runs."""
    memory.execute("ATTACH DATABASE ? AS disk", (str(path),))
    try:
        memory.execute("BEGIN IMMEDIATE")  # locks the attached file too
        try:
            if content_digest(memory, "disk") != baseline:
                memory.execute("ROLLBACK")
                return False
            tables = [name for (name,) in memory.execute(
                "SELECT name FROM main.sqlite_master WHERE type='table' AND name != 'sqlite_sequence'")]
            memory.execute("PRAGMA defer_foreign_keys=ON")
            for name in tables:  # all gone first: a cascade can't take copied rows
                memory.execute(f'DELETE FROM disk."{name}"')
            for name in tables:
                memory.execute(f'INSERT INTO disk."{name}" SELECT * FROM main."{name}"')
            # Last: the inserts above set the AUTOINCREMENT counters too.
            memory.execute("DELETE FROM disk.sqlite_sequence")
            memory.execute("INSERT INTO disk.sqlite_sequence SELECT * FROM main.sqlite_sequence")
            memory.execute("COMMIT")
            return True
        except BaseException:
            if memory.in_transaction:
                try:
                    memory.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
    finally:
        memory.execute("DETACH DATABASE disk")


def save_copy_beside(conn: sqlite3.Connection, path: Path,
                     connect: Callable[[str], sqlite3.Connection]) -> Path | None:
    """Save the database ``conn`` as a new file beside ``path``
    (``<name>.unsaved-<time>``); returns it, or None (then nothing is left behind)."""
    aside = aside_path(path, "unsaved")
    if aside is None:
        return None
    dest = None
    try:
        dest = connect(str(aside))
        conn.backup(dest)
        return aside
    except (sqlite3.Error, OSError) as exc:
        log.warning("cannot save this session's chats as %s: %s", aside, exc)
    finally:
        if dest is not None:
            dest.close()
    try:
        aside.unlink(missing_ok=True)
    except OSError:
        pass
    return None
