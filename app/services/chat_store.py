"""Conversations persisted in SQLite (Qt-free).

Every change is committed at once, and an answer being streamed is written as it grows
(``update_message``), so killing the app mid-answer loses at most the last fraction of a
second: on the next start such a message is marked ``interrupted`` and shown as such.
WAL journaling keeps those frequent small writes cheap and crash-safe.

A conversation is a tree of messages, not a list: each message names the one it follows
(``parent_id``), and the children of one message are *versions* of the same turn, of which
one is selected (``active``). Regenerating an answer adds a sibling and selects it, so the
earlier answer is kept, and the turns that followed it stay with it (as in LM Studio:
flipping back to version 1 shows the conversation that went on from version 1).
``messages()`` is the selected path through the tree: what the transcript shows and, via
``history_for_model``, all the model ever sees.

All SQL stays in this module. Where it runs is ``ChatDatabase``'s business (chat_db.py):
``ChatStore.open`` always gives a working store, on the file or, when the file can't be
written (read-only, full, damaged), on a copy in memory, with ``mode`` and ``problem``
saying so; every write goes through ``_writes``, so a disk that fails mid-session moves
the chats to memory instead of failing the caller, and ``retry_saving`` writes them back
(never over changes someone else made to the file meanwhile). A write raises only
``StorageError`` for anything the disk does (the file stays locked by another program;
not even memory takes it), with a message for the user; anything else is a bug.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from app.services.chat_db import ChatDatabase, StorageError
from app.services.chat_file import problem_kind
from app.services.chat_messages import Conversation, Message, history_for_model, selected_path
from app.services.user_data import data_dir, data_dir_path

__all__ = ["ChatStore", "Conversation", "Message", "StorageError", "DEFAULT_TITLE",
           "history_for_model", "selected_path"]

log = logging.getLogger("hearth.app.chats")

DEFAULT_TITLE = "New chat"

# PRAGMA user_version: 0 is the first, list-shaped schema (no version was stored then).
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    prompt_edited INTEGER NOT NULL DEFAULT 0  -- the user typed this system prompt (not inherited)
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'notice')),
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'complete',  -- complete | streaming | stopped | interrupted | error
    meta TEXT NOT NULL DEFAULT '{}',          -- JSON: ttft_ms, decode_tok_s, tokens, model, error
    created REAL NOT NULL,
    -- The message this one follows (NULL: the first). A plain column, not a foreign key
    -- with ON DELETE CASCADE: SQLite cascades recursively and stops at 1000 levels, which
    -- a long conversation passes; subtrees are deleted here instead (delete_from).
    parent_id INTEGER,
    active INTEGER NOT NULL DEFAULT 1         -- the selected one among its siblings
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE INDEX IF NOT EXISTS messages_by_parent ON messages(parent_id);
"""

# Upgrades an existing version-0 database in place; run inside one transaction.
MIGRATE_0_TO_1 = (
    "ALTER TABLE conversations ADD COLUMN prompt_edited INTEGER NOT NULL DEFAULT 0",
    # A prompt in an old conversation may have been typed by the user: keep it (see is_leftover).
    "UPDATE conversations SET prompt_edited = (system_prompt != '')",
    "ALTER TABLE messages ADD COLUMN parent_id INTEGER",
    "ALTER TABLE messages ADD COLUMN active INTEGER NOT NULL DEFAULT 1",
    # The old list becomes a chain: each message follows the one before it.
    "UPDATE messages SET parent_id = (SELECT MAX(p.id) FROM messages p "
    "WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id)",
    "CREATE INDEX IF NOT EXISTS messages_by_parent ON messages(parent_id)",
)

_MESSAGE_COLUMNS = "id, conversation_id, role, content, status, meta, parent_id, active, created"



def _fold(text: str | None) -> str:
    return (text or "").casefold()


def _writes(method):
    """A ChatStore method that writes: one transaction, kept in memory if the file fails."""
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        return self._database.write(lambda: method(self, *args, **kwargs))
    return write


class ChatStore:
    """The conversations file (``chats.sqlite3`` in the data folder unless ``path``):
    opened, upgraded to ``SCHEMA_VERSION`` if it is older, and written through at once.

    ``ChatStore(path)`` opens the file or raises (sqlite3.Error, OSError);
    ``ChatStore.open(path)``, what the app uses, never fails (see ``mode``)."""

    def __init__(self, path: Path | str | None = None, *, _database: ChatDatabase | None = None) -> None:
        if _database is None:
            path = Path(path) if path is not None else data_dir() / "chats.sqlite3"
            _database = ChatDatabase.connect(path, _configure, _prepare)
        self._database = _database
        self.path = _database.path

    @classmethod
    def open(cls, path: Path | str | None = None) -> ChatStore:
        """The store, whatever state the disk is in: ``mode`` is "normal" (saved to the
        file), "read-only" (the file's chats, changes kept in memory until it can be
        written) or "memory" (nothing could be read); ``problem`` says why, for the user.
        A damaged file is moved aside (``moved_aside``) and a new one started."""
        if path is None:
            try:
                path = data_dir() / "chats.sqlite3"
            except OSError as exc:  # the data folder can't be created
                return cls(_database=ChatDatabase.in_memory(
                    data_dir_path() / "chats.sqlite3", f"Chat history can't be saved: {exc.strerror or exc}",
                    _configure, _prepare))
        return cls(_database=ChatDatabase.open(Path(path), _configure, _prepare, _salvage))

    @property
    def _db(self) -> sqlite3.Connection:
        return self._database.conn

    # -- where the chats are -----------------------------------------------------------------
    @property
    def mode(self) -> str:
        """ "normal", "read-only" or "memory" (see ``open``)."""
        return self._database.mode

    @property
    def problem(self) -> str | None:
        """What is wrong with the chat history, in words for the user (None: nothing)."""
        return self._database.problem

    @property
    def moved_aside(self) -> Path | None:
        """Where a damaged chat history was kept (None: it wasn't damaged)."""
        return self._database.moved_aside

    @property
    def unsaved_changes(self) -> bool:
        """Whether changes are kept in memory only (lost if the app closed now)."""
        return self._database.unsaved_changes

    @property
    def retrying(self) -> bool:
        """Whether the chats aren't saved now but ``retry_saving`` may succeed later."""
        return self._database.retrying

    def retry_saving(self, *, now: bool = True) -> bool:
        """Try to write the chats kept in memory to the file; True when saved there again.
        ``now=False`` (a timer) waits out a growing pause after a write-back that failed."""
        return self._database.retry_saving(now=now)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``mode`` or ``problem`` changes."""
        self._database.add_listener(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self._database.remove_listener(callback)

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self._database.close()

    # -- conversations ---------------------------------------------------------------------
    @_writes
    def create_conversation(self, title: str = DEFAULT_TITLE, system_prompt: str = "") -> Conversation:
        """A new conversation; ``system_prompt`` is inherited (not typed by the user here)."""
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO conversations (title, system_prompt, created, updated) VALUES (?, ?, ?, ?)",
            (title, system_prompt, now, now))
        return Conversation(cur.lastrowid, title, system_prompt, now)

    def conversations(self) -> list[Conversation]:
        """All conversations, the most recently changed first."""
        rows = self._db.execute(
            "SELECT id, title, system_prompt, updated FROM conversations ORDER BY updated DESC, id DESC")
        return [Conversation(*r) for r in rows]

    def search(self, text: str) -> list[Conversation]:
        """Conversations whose title or any message (every version) contains ``text``,
        ignoring case (Unicode case folding), newest first; blank ``text`` gives all.

        A substring scan, not an FTS index: it finds text inside words ("json" in
        "to_json") and in answers that are still streaming, with no index to keep in step
        with the writes of every streamed answer; a scan of thousands of messages takes
        milliseconds."""
        needle = _fold(text.strip())
        if not needle:
            return self.conversations()
        rows = self._db.execute(
            "SELECT id, title, system_prompt, updated FROM conversations c "
            "WHERE instr(hearth_fold(c.title), :q) > 0 OR EXISTS (SELECT 1 FROM messages m "
            "  WHERE m.conversation_id = c.id AND instr(hearth_fold(m.content), :q) > 0) "
            "ORDER BY updated DESC, id DESC", {"q": needle})
        return [Conversation(*r) for r in rows]

    def conversation(self, conv_id: int) -> Conversation | None:
        row = self._db.execute("SELECT id, title, system_prompt, updated FROM conversations WHERE id=?",
                               (conv_id,)).fetchone()
        return Conversation(*row) if row else None

    @_writes
    def rename(self, conv_id: int, title: str) -> None:
        self._db.execute("UPDATE conversations SET title=? WHERE id=?", (title, conv_id))

    @_writes
    def set_system_prompt(self, conv_id: int, text: str) -> None:
        """The user typed a system prompt for this conversation."""
        self._db.execute("UPDATE conversations SET system_prompt=?, prompt_edited=1 WHERE id=?",
                         (text, conv_id))

    @_writes
    def delete_conversation(self, conv_id: int) -> None:
        """Delete a conversation with all its messages and every answer version."""
        self._db.execute("DELETE FROM conversations WHERE id=?", (conv_id,))

    @_writes
    def duplicate_conversation(self, conv_id: int) -> Conversation:
        """A copy titled "… (copy)": the system prompt and every message, versions included."""
        src = self.conversation(conv_id)
        if src is None:
            raise KeyError(f"no conversation {conv_id}")
        edited = self._db.execute("SELECT prompt_edited FROM conversations WHERE id=?",
                                  (conv_id,)).fetchone()[0]
        now = time.time()
        title = f"{src.title} (copy)"
        new_id = self._db.execute(
            "INSERT INTO conversations (title, system_prompt, created, updated, prompt_edited) "
            "VALUES (?, ?, ?, ?, ?)", (title, src.system_prompt, now, now, edited)).lastrowid
        new_ids: dict[int, int] = {}
        for m in self._rows(conv_id):  # id order: a parent is always copied before its children
            # An answer still streaming in the original is a finished, cut-short one here.
            status = "stopped" if m.status == "streaming" else m.status
            new_ids[m.id] = self._db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, meta, created, "
                "parent_id, active) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (new_id, m.role, m.content, status, json.dumps(m.meta), m.created,
                 new_ids.get(m.parent_id), int(m.active))).lastrowid
        return Conversation(new_id, title, src.system_prompt, now)

    def is_leftover(self, conv_id: int) -> bool:
        """An empty conversation nobody will miss: no messages, the default title, and no
        system prompt typed into it (one inherited from the previous chat doesn't count)."""
        return self._db.execute(
            "SELECT 1 FROM conversations c WHERE c.id=? AND c.title=? "
            "AND NOT (c.prompt_edited AND c.system_prompt != '') "
            "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id=c.id)",
            (conv_id, DEFAULT_TITLE)).fetchone() is not None

    @_writes
    def delete_leftovers(self, keep: int | None = None) -> list[int]:
        """Delete every empty leftover conversation (see ``is_leftover``) except ``keep``;
        returns the ids deleted."""
        gone = [i for (i,) in self._db.execute("SELECT id FROM conversations WHERE id IS NOT ? ORDER BY id", (keep,))
                if self.is_leftover(i)]
        for conv_id in gone:
            self.delete_conversation(conv_id)
        return gone

    def _touch(self, conv_id: int) -> None:
        self._db.execute("UPDATE conversations SET updated=? WHERE id=?", (time.time(), conv_id))

    # -- messages --------------------------------------------------------------------------
    @_writes
    def add_message(self, conv_id: int, role: str, content: str, status: str = "complete",
                    meta: dict | None = None, *, parent_id: int | None = None) -> Message:
        """Append a message after the last one shown (the end of the selected path), or
        after ``parent_id``: if that message already has a follower, the new one becomes
        another version of that turn, and the selected one."""
        if parent_id is None:
            parent_id = self._tip(conv_id)
        # The new message is the selected one among its siblings.
        self._db.execute("UPDATE messages SET active=0 WHERE conversation_id=? AND parent_id IS ?",
                         (conv_id, parent_id))
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO messages (conversation_id, role, content, status, meta, created, parent_id, "
            "active) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
            (conv_id, role, content, status, json.dumps(meta or {}), now, parent_id))
        self._touch(conv_id)
        return self.message(cur.lastrowid)

    @_writes
    def add_version(self, msg_id: int, content: str = "", status: str = "complete",
                    meta: dict | None = None) -> Message:
        """A new version of message ``msg_id`` (a regenerated answer), selected; the old
        one and whatever followed it are kept."""
        old = self.message(msg_id)
        if old is None:
            raise KeyError(f"no message {msg_id}")
        if old.parent_id is None:
            # A first message has no parent to hang a sibling on: a NULL parent means
            # "append at the end" to add_message, so insert the sibling directly.
            self._db.execute("UPDATE messages SET active=0 WHERE conversation_id=? AND parent_id IS NULL",
                             (old.conversation_id,))
            cur = self._db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, meta, created, "
                "parent_id, active) VALUES (?, ?, ?, ?, ?, ?, NULL, 1)",
                (old.conversation_id, old.role, content, status, json.dumps(meta or {}), time.time()))
            self._touch(old.conversation_id)
            return self.message(cur.lastrowid)
        return self.add_message(old.conversation_id, old.role, content, status, meta,
                                parent_id=old.parent_id)

    @_writes
    def update_message(self, msg_id: int, *, content: str | None = None, status: str | None = None,
                       meta: dict | None = None) -> None:
        sets, args = [], []
        if content is not None:
            sets.append("content=?")
            args.append(content)
        if status is not None:
            sets.append("status=?")
            args.append(status)
        if meta is not None:
            sets.append("meta=?")
            args.append(json.dumps(meta))
        if sets:
            self._db.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id=?", (*args, msg_id))

    def message(self, msg_id: int) -> Message | None:
        """One message, with its version number among its siblings."""
        row = self._db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id=?", (msg_id,)).fetchone()
        if row is None:
            return None
        m = _message(row)
        siblings = self.versions(msg_id)
        m.version, m.version_count = siblings.index(msg_id) + 1, len(siblings)
        return m

    def messages(self, conv_id: int) -> list[Message]:
        """The conversation as shown: the selected version of every turn, in order."""
        return selected_path(self._rows(conv_id))

    def all_messages(self, conv_id: int) -> list[Message]:
        """Every message of the conversation, every version, in creation (id) order."""
        return self._rows(conv_id)

    def versions(self, msg_id: int) -> list[int]:
        """The ids of all versions of this message's turn (its siblings and itself), oldest first."""
        rows = self._db.execute(
            "SELECT s.id FROM messages m JOIN messages s ON s.conversation_id = m.conversation_id "
            "AND s.parent_id IS m.parent_id WHERE m.id=? ORDER BY s.id", (msg_id,))
        return [r[0] for r in rows]

    @_writes
    def select_version(self, msg_id: int) -> None:
        """Show this version of its turn (and the turns that followed it)."""
        self._db.execute(
            "UPDATE messages SET active = (id = :id) WHERE conversation_id = "
            "(SELECT conversation_id FROM messages WHERE id = :id) "
            "AND parent_id IS (SELECT parent_id FROM messages WHERE id = :id)", {"id": msg_id})

    @_writes
    def delete_from(self, conv_id: int, msg_id: int) -> None:
        """Delete a message and everything that followed it, in every version
        (edit-and-resend); if it was the selected version, the newest remaining one is."""
        m = self.message(msg_id)
        if m is None or m.conversation_id != conv_id:
            return
        self._db.execute(
            # UNION, not UNION ALL: a damaged file's parent cycle ends instead of running forever.
            "DELETE FROM messages WHERE id IN (WITH RECURSIVE sub(id) AS (SELECT ? UNION "
            "SELECT c.id FROM messages c JOIN sub ON c.parent_id = sub.id) SELECT id FROM sub)",
            (msg_id,))
        if m.active:
            self._db.execute(
                "UPDATE messages SET active=1 WHERE id = (SELECT MAX(id) FROM messages "
                "WHERE conversation_id=? AND parent_id IS ?)", (conv_id, m.parent_id))
        self._touch(conv_id)

    # -- helpers -----------------------------------------------------------------------------
    def _rows(self, conv_id: int) -> list[Message]:
        rows = [_message(r) for r in self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id=? ORDER BY id", (conv_id,))]
        siblings: dict[int | None, list[int]] = {}
        for m in rows:
            siblings.setdefault(m.parent_id, []).append(m.id)
        for m in rows:
            group = siblings[m.parent_id]
            m.version, m.version_count = group.index(m.id) + 1, len(group)
        return rows

    def _tip(self, conv_id: int) -> int | None:
        """The last message along the selected path (``selected_path``'s rule, in SQL: this
        runs for every message added, and a long conversation shouldn't be read for it)."""
        row = self._db.execute(
            "WITH RECURSIVE path(id, depth) AS ("
            " SELECT (SELECT id FROM messages WHERE conversation_id=:c AND parent_id IS NULL"
            "         ORDER BY active DESC, id DESC LIMIT 1), 0"
            " UNION ALL"
            " SELECT (SELECT m.id FROM messages m WHERE m.parent_id = path.id"
            "         ORDER BY m.active DESC, m.id DESC LIMIT 1), depth + 1"
            # No path is longer than the conversation: the bound ends a damaged file's cycle.
            " FROM path WHERE path.id IS NOT NULL"
            "  AND depth < (SELECT COUNT(*) FROM messages WHERE conversation_id=:c))"
            " SELECT id FROM path WHERE id IS NOT NULL ORDER BY depth DESC LIMIT 1",
            {"c": conv_id}).fetchone()
        return row[0] if row else None


def _configure(db: sqlite3.Connection) -> None:
    """Set up a connection (each one: the file's, or a copy's in memory)."""
    db.execute("PRAGMA foreign_keys=ON")
    # Unicode-aware case folding for search (SQLite's own LIKE/lower() fold ASCII only).
    db.create_function("hearth_fold", 1, _fold, deterministic=True)


def _prepare(db: sqlite3.Connection) -> None:
    """Make the database just opened current: the schema, and answers cut off last time.
    This always writes, so a file that can't be written is found out when it opens."""
    _upgrade(db)
    # Anything still 'streaming' was cut off by a crash or a kill.
    try:
        db.execute("UPDATE messages SET status='interrupted' WHERE status='streaming'")
    except sqlite3.OperationalError as exc:
        if problem_kind(exc) != "busy":
            raise
        # Another program holds the file's lock (another Hearth, mid-answer?): the file is
        # usable all the same, and its answers aren't cut off. Marked at a later start.
        log.info("chat history is locked; answers cut off earlier stay marked as streaming: %s", exc)
    # A damaged page the statement above didn't read (the chats' table, an index) is found
    # now, while the damaged file can still be set aside and salvaged, not at the first list.
    found = db.execute("PRAGMA quick_check(1)").fetchone()[0]
    if found != "ok":
        raise sqlite3.DatabaseError(f"database disk image is malformed ({found})")


def _upgrade(db: sqlite3.Connection) -> None:
    """Create the schema, or upgrade an older file in place (one transaction: an upgrade
    that fails leaves the file as it was)."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")  # another instance may be upgrading the same file
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        old = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='messages'").fetchone()
        if version < SCHEMA_VERSION:
            for statement in (MIGRATE_0_TO_1 if old else _statements(SCHEMA)):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled it back itself (a full disk)
            db.execute("ROLLBACK")
        raise


#: Rows read per query when salvaging (a failing range is split down to single rows), and the
#: most rowids a salvage looks through when the table's own maximum can't be read.
_SALVAGE_CHUNK = 256
_SALVAGE_MAX_IDS = 2_000_000


def _readable_rows(old: sqlite3.Connection, table: str, columns: str) -> tuple[list[tuple], int]:
    """Every row of ``table`` that can still be read, by rowid ranges (a range over a
    damaged page fails as a whole: it is halved until the rows that fail are alone), and
    how many rowids could not be read (deleted rows on a damaged page count too)."""
    try:
        top = old.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0] or 0
    except sqlite3.DatabaseError:  # the table's last pages are damaged: the sequence's number
        try:
            row = old.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        except sqlite3.DatabaseError:
            row = None
        top = row[0] if row else None
    if not isinstance(top, int) or top < 0:  # (a damaged sequence can hold anything)
        top = 100_000
    top = min(top, _SALVAGE_MAX_IDS)
    out: list[tuple] = []
    lost = 0

    def grab(a: int, b: int) -> None:
        nonlocal lost
        try:
            out.extend(old.execute(f"SELECT {columns} FROM {table} WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
                                   (a, b)).fetchall())
        except sqlite3.DatabaseError:
            if a == b:
                lost += 1
                return
            mid = (a + b) // 2
            grab(a, mid)
            grab(mid + 1, b)

    for a in range(1, top + 1, _SALVAGE_CHUNK):
        grab(a, min(top, a + _SALVAGE_CHUNK - 1))
    return out, lost


def _open_damaged(damaged: Path) -> tuple[sqlite3.Connection, int] | None:
    """The damaged file read-only and its schema version: with its journal (the latest chats
    may be there) where SQLite can, else the file alone as it is (immutable: nothing is
    created or changed beside it). None: not even that."""
    for mode in ("mode=ro", "mode=ro&immutable=1"):
        old = None
        try:
            old = sqlite3.connect(f"{damaged.resolve().as_uri()}?{mode}", uri=True)
            version = old.execute("PRAGMA user_version").fetchone()[0]
            old.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return old, int(version)
        except sqlite3.DatabaseError:
            if old is not None:
                old.close()
    return None


def _insert_each(db: sqlite3.Connection, table: str, columns: str, rows: list[tuple]) -> int:
    """Insert ``rows`` one by one; returns how many were refused (a damaged value that breaks
    a constraint, a role 'usfr') without losing the rest."""
    sql = f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(columns.split(',')))})"
    refused = 0
    for row in rows:
        try:
            db.execute(sql, row)
        except (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, OverflowError):
            refused += 1
    return refused


def _relink(db: sqlite3.Connection) -> None:
    """Give every message whose parent was lost a parent again: the last message, before it,
    of its chat's selected path (``selected_path``), so the chat reads on past the gap."""
    orphans = db.execute("SELECT id, conversation_id FROM messages WHERE parent_id IS NOT NULL AND parent_id "
                         "NOT IN (SELECT id FROM messages) ORDER BY id").fetchall()
    for msg_id, conv_id in orphans:
        before = [_message(r) for r in db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id=? AND id<? ORDER BY id",
            (conv_id, msg_id))]
        path = selected_path(before)
        db.execute("UPDATE messages SET parent_id=? WHERE id=?", (path[-1].id if path else None, msg_id))


def _salvage(damaged: Path, new: sqlite3.Connection) -> str | None:
    """Copy the chats and messages of a damaged history that can still be read into the new
    (empty) one, with their ids; says what was recovered (None: nothing). Messages whose chat
    row was lost go to a chat of their own ("Recovered chat"); a message that followed a lost
    one follows the last one before it on its chat's path; an answer cut off mid-stream is
    marked interrupted; a row that can be read but breaks the schema is left out (counted)."""
    opened = _open_damaged(damaged)
    if opened is None:
        return None
    old, version = opened
    try:
        conv_cols = "id, title, system_prompt, created, updated" + (", prompt_edited" if version >= 1 else "")
        msg_cols = "id, conversation_id, role, content, status, meta, created" + (
            ", parent_id, active" if version >= 1 else "")
        convs, lost_convs = _readable_rows(old, "conversations", conv_cols)
        msgs, lost = _readable_rows(old, "messages", msg_cols)
    finally:
        old.close()
    if not convs and not msgs:
        return None
    known = {row[0] for row in convs}
    homeless: dict[object, list[tuple]] = {}
    for m in msgs:
        if m[1] not in known:
            homeless.setdefault(m[1], []).append(m)
    for conv_id, rows in homeless.items():  # their chat's row was lost: a chat for them, same id
        when = [r[6] for r in rows if isinstance(r[6], (int, float))] or [time.time()]
        convs.append((conv_id, "Recovered chat", "", min(when), max(when)) + ((0,) if version >= 1 else ()))
    new.execute("BEGIN IMMEDIATE")
    try:
        refused_convs = _insert_each(new, "conversations", conv_cols, convs)
        refused = _insert_each(new, "messages", msg_cols, msgs)
        if version < 1:  # an old file's list becomes a chain, as its upgrade does
            new.execute(MIGRATE_0_TO_1[1])
            new.execute("UPDATE messages SET parent_id = (SELECT MAX(p.id) FROM messages p "
                        "WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id)")
        _relink(new)
        new.execute("UPDATE messages SET status='interrupted' WHERE status='streaming'")
        chats, messages = (new.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("conversations", "messages"))
        new.execute("COMMIT")
    except BaseException:
        if new.in_transaction:
            new.execute("ROLLBACK")
        raise
    if not chats:
        return None
    said = f"{chats} chat{'s' if chats != 1 else ''} and {messages} message{'s' if messages != 1 else ''} were recovered"
    missing = [f"about {n} {what}{'s' if n != 1 else ''} could not be read" for n, what in
               ((lost_convs + refused_convs, "chat"), (lost + refused, "message")) if n]
    if homeless:
        missing.append(f"{len(homeless)} chat{'s' if len(homeless) != 1 else ''} lost {'their' if len(homeless) != 1 else 'its'} "
                       "title and settings (now \"Recovered chat\")")
    return said + (f" ({'; '.join(missing)})" if missing else "")


def _statements(script: str) -> list[str]:
    """``script`` split into statements (sqlite3.complete_statement knows about comments
    and quotes); executescript would commit the transaction they must run in."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


def _message(row) -> Message:
    return Message(row[0], row[1], row[2], row[3], row[4], json.loads(row[5] or "{}"),
                   row[6], bool(row[7]), row[8])
