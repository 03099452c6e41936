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

All SQL stays in this class (a later change makes the store survive a damaged disk).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.services.user_data import data_dir

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


@dataclass(slots=True)
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str = "complete"
    meta: dict = field(default_factory=dict)
    parent_id: int | None = None
    active: bool = True
    created: float = 0.0
    version: int = 1        # 1-based position among its siblings (the versions of this turn)
    version_count: int = 1


@dataclass(slots=True)
class Conversation:
    id: int
    title: str
    system_prompt: str
    updated: float


def _fold(text: str | None) -> str:
    return (text or "").casefold()


class ChatStore:
    """The conversations file (``chats.sqlite3`` in the data folder unless ``path``):
    opened, upgraded to ``SCHEMA_VERSION`` if it is older, and written through at once."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else data_dir() / "chats.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Unicode-aware case folding for search (SQLite's own LIKE/lower() fold ASCII only).
        self._db.create_function("hearth_fold", 1, _fold, deterministic=True)
        self._upgrade()
        # Anything still 'streaming' was cut off by a crash or a kill.
        self._db.execute("UPDATE messages SET status='interrupted' WHERE status='streaming'")

    def _upgrade(self) -> None:
        """Create the schema, or upgrade an older file in place (one transaction: an
        upgrade that fails leaves the file as it was)."""
        if self._db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")  # another instance may be upgrading the same file
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            old = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='messages'").fetchone()
            if version < SCHEMA_VERSION:
                for statement in (MIGRATE_0_TO_1 if old else _statements(SCHEMA)):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    # -- conversations ---------------------------------------------------------------------
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

    def rename(self, conv_id: int, title: str) -> None:
        self._db.execute("UPDATE conversations SET title=? WHERE id=?", (title, conv_id))

    def set_system_prompt(self, conv_id: int, text: str) -> None:
        """The user typed a system prompt for this conversation."""
        self._db.execute("UPDATE conversations SET system_prompt=?, prompt_edited=1 WHERE id=?",
                         (text, conv_id))

    def delete_conversation(self, conv_id: int) -> None:
        """Delete a conversation with all its messages and every answer version."""
        self._db.execute("DELETE FROM conversations WHERE id=?", (conv_id,))

    def duplicate_conversation(self, conv_id: int) -> Conversation:
        """A copy titled "… (copy)": the system prompt and every message, versions included."""
        src = self.conversation(conv_id)
        if src is None:
            raise KeyError(f"no conversation {conv_id}")
        edited = self._db.execute("SELECT prompt_edited FROM conversations WHERE id=?",
                                  (conv_id,)).fetchone()[0]
        self._db.execute("BEGIN IMMEDIATE")
        try:
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
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return Conversation(new_id, title, src.system_prompt, now)

    def is_leftover(self, conv_id: int) -> bool:
        """An empty conversation nobody will miss: no messages, the default title, and no
        system prompt typed into it (one inherited from the previous chat doesn't count)."""
        return self._db.execute(
            "SELECT 1 FROM conversations c WHERE c.id=? AND c.title=? "
            "AND NOT (c.prompt_edited AND c.system_prompt != '') "
            "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id=c.id)",
            (conv_id, DEFAULT_TITLE)).fetchone() is not None

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

    def select_version(self, msg_id: int) -> None:
        """Show this version of its turn (and the turns that followed it)."""
        self._db.execute(
            "UPDATE messages SET active = (id = :id) WHERE conversation_id = "
            "(SELECT conversation_id FROM messages WHERE id = :id) "
            "AND parent_id IS (SELECT parent_id FROM messages WHERE id = :id)", {"id": msg_id})

    def delete_from(self, conv_id: int, msg_id: int) -> None:
        """Delete a message and everything that followed it, in every version
        (edit-and-resend); if it was the selected version, the newest remaining one is."""
        m = self.message(msg_id)
        if m is None or m.conversation_id != conv_id:
            return
        self._db.execute(
            "DELETE FROM messages WHERE id IN (WITH RECURSIVE sub(id) AS (SELECT ? UNION ALL "
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
            " FROM path WHERE path.id IS NOT NULL AND depth < :most)"
            " SELECT id FROM path WHERE id IS NOT NULL ORDER BY depth DESC LIMIT 1",
            {"c": conv_id, "most": 10_000_000}).fetchone()  # the bound stops a damaged file's cycle
        return row[0] if row else None


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


def selected_path(messages: list[Message]) -> list[Message]:
    """The messages along the selected path: from the first one, always on to the selected
    version of the next turn (the newest one if, against the rules, none or several are)."""
    children: dict[int | None, list[Message]] = {}
    for m in sorted(messages, key=lambda m: m.id):  # each sibling list oldest first
        children.setdefault(m.parent_id, []).append(m)
    path, parent, seen = [], None, set()
    while children.get(parent):
        group = children[parent]
        chosen = next((m for m in reversed(group) if m.active), group[-1])
        if chosen.id in seen:  # a damaged file with a cycle: stop rather than loop
            break
        seen.add(chosen.id)
        path.append(chosen)
        parent = chosen.id
    return path


def history_for_model(messages: list[Message]) -> list[dict]:
    """The turns the model should see: user/assistant text, notices and failures left out.

    ``messages`` is ``ChatStore.messages()``: only the selected version of each answer."""
    out = []
    for m in messages:
        if m.role == "notice" or (m.role == "assistant" and m.status == "error"):
            continue
        if m.role == "assistant" and not m.content:
            continue
        out.append({"role": m.role, "content": m.content})
    return out
