"""Conversations persisted in SQLite (Qt-free).

Every change is committed at once, and an answer being streamed is written as it grows
(``update_message``), so killing the app mid-answer loses at most the last fraction of a
second: on the next start such a message is marked ``interrupted`` and shown as such.
WAL journaling keeps those frequent small writes cheap and crash-safe.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.services.user_data import data_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'notice')),
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'complete',  -- complete | streaming | stopped | interrupted | error
    meta TEXT NOT NULL DEFAULT '{}',          -- JSON: ttft_ms, decode_tok_s, tokens, model, error
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


@dataclass(slots=True)
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str = "complete"
    meta: dict = field(default_factory=dict)


@dataclass(slots=True)
class Conversation:
    id: int
    title: str
    system_prompt: str
    updated: float


class ChatStore:
    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else data_dir() / "chats.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        # Anything still 'streaming' was cut off by a crash or a kill.
        self._db.execute("UPDATE messages SET status='interrupted' WHERE status='streaming'")

    def close(self) -> None:
        self._db.close()

    # -- conversations ---------------------------------------------------------------------
    def create_conversation(self, title: str = "New chat", system_prompt: str = "") -> Conversation:
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO conversations (title, system_prompt, created, updated) VALUES (?, ?, ?, ?)",
            (title, system_prompt, now, now))
        return Conversation(cur.lastrowid, title, system_prompt, now)

    def conversations(self) -> list[Conversation]:
        rows = self._db.execute(
            "SELECT id, title, system_prompt, updated FROM conversations ORDER BY updated DESC, id DESC")
        return [Conversation(*r) for r in rows]

    def conversation(self, conv_id: int) -> Conversation | None:
        row = self._db.execute("SELECT id, title, system_prompt, updated FROM conversations WHERE id=?",
                               (conv_id,)).fetchone()
        return Conversation(*row) if row else None

    def rename(self, conv_id: int, title: str) -> None:
        self._db.execute("UPDATE conversations SET title=? WHERE id=?", (title, conv_id))

    def set_system_prompt(self, conv_id: int, text: str) -> None:
        self._db.execute("UPDATE conversations SET system_prompt=? WHERE id=?", (text, conv_id))

    def delete_conversation(self, conv_id: int) -> None:
        self._db.execute("DELETE FROM conversations WHERE id=?", (conv_id,))

    def _touch(self, conv_id: int) -> None:
        self._db.execute("UPDATE conversations SET updated=? WHERE id=?", (time.time(), conv_id))

    # -- messages --------------------------------------------------------------------------
    def add_message(self, conv_id: int, role: str, content: str, status: str = "complete",
                    meta: dict | None = None) -> Message:
        cur = self._db.execute(
            "INSERT INTO messages (conversation_id, role, content, status, meta, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (conv_id, role, content, status, json.dumps(meta or {}), time.time()))
        self._touch(conv_id)
        return Message(cur.lastrowid, conv_id, role, content, status, dict(meta or {}))

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

    def messages(self, conv_id: int) -> list[Message]:
        rows = self._db.execute(
            "SELECT id, conversation_id, role, content, status, meta FROM messages "
            "WHERE conversation_id=? ORDER BY id", (conv_id,))
        return [Message(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}")) for r in rows]

    def delete_from(self, conv_id: int, msg_id: int) -> None:
        """Delete a message and everything after it (edit-and-resend, regenerate)."""
        self._db.execute("DELETE FROM messages WHERE conversation_id=? AND id>=?", (conv_id, msg_id))
        self._touch(conv_id)


def history_for_model(messages: list[Message]) -> list[dict]:
    """The turns the model should see: user/assistant text, notices and failures left out."""
    out = []
    for m in messages:
        if m.role == "notice" or (m.role == "assistant" and m.status == "error"):
            continue
        if m.role == "assistant" and not m.content:
            continue
        out.append({"role": m.role, "content": m.content})
    return out
