"""A chats file written by the first release (schema version 0) opens and upgrades in place."""

from __future__ import annotations

import json
import sqlite3

from app.services.chat_store import SCHEMA_VERSION, ChatStore, history_for_model

# The schema exactly as the first release created it (app/services/chat_store.py before
# answer versions): frozen here, because the file on users' disks looks like this.
SCHEMA_V0 = """
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


def _old_file(path):
    """Two conversations interleaved in id order, one answer cut off by a kill, one empty chat."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA_V0)
    db.execute("INSERT INTO conversations VALUES (1, 'Haiku', 'Be terse.', 1.0, 5.0)")
    db.execute("INSERT INTO conversations VALUES (2, 'Code', '', 2.0, 6.0)")
    db.execute("INSERT INTO conversations VALUES (3, 'New chat', '', 3.0, 3.0)")
    rows = [(1, 1, "user", "Write a haiku", "complete", "{}"),
            (2, 2, "user", "Print hi in Python", "complete", "{}"),
            (3, 1, "assistant", "Old pond\nfrog jumps in\nsplash", "complete",
             json.dumps({"tokens": 9, "model": "m"})),
            (4, 2, "assistant", "```python\nprint('hi')\n```", "complete", "{}"),
            (5, 1, "user", "Another", "complete", "{}"),
            (6, 1, "notice", "The oldest 1 message was left out.", "complete", "{}"),
            (7, 1, "assistant", "Autumn moon", "streaming", "{}")]
    for r in rows:
        db.execute("INSERT INTO messages (id, conversation_id, role, content, status, meta, created) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (*r, float(r[0])))
    db.commit()
    db.close()


def test_a_version_0_file_opens_upgrades_and_keeps_everything(tmp_path):
    path = tmp_path / "chats.sqlite3"
    _old_file(path)
    store = ChatStore(path)
    assert store.schema_version == SCHEMA_VERSION
    assert [(c.id, c.title) for c in store.conversations()] == [(2, "Code"), (1, "Haiku"), (3, "New chat")]
    haiku = store.messages(1)
    assert [(m.id, m.role, m.content) for m in haiku] == [
        (1, "user", "Write a haiku"), (3, "assistant", "Old pond\nfrog jumps in\nsplash"),
        (5, "user", "Another"), (6, "notice", "The oldest 1 message was left out."),
        (7, "assistant", "Autumn moon")]
    assert [m.parent_id for m in haiku] == [None, 1, 3, 5, 6]  # the list became a chain
    assert haiku[1].meta == {"tokens": 9, "model": "m"}
    assert haiku[-1].status == "interrupted"  # cut off by a kill, as before the upgrade
    assert all(m.version == m.version_count == 1 for m in haiku)
    assert [m.content for m in store.messages(2)] == ["Print hi in Python", "```python\nprint('hi')\n```"]
    assert history_for_model(haiku)[-1] == {"role": "assistant", "content": "Autumn moon"}
    # The upgraded file works like a new one: appending, regenerating, editing.
    store.add_message(1, "user", "Third")
    assert store.messages(1)[-1].parent_id == 7
    v2 = store.add_version(3, "Second try")
    assert [m.content for m in store.messages(1)] == ["Write a haiku", "Second try"]
    store.select_version(3)
    assert len(store.messages(1)) == 6
    store.delete_from(2, 2)
    assert store.messages(2) == []
    # A typed system prompt counts as the user's; an untitled empty chat is a leftover.
    assert not store.is_leftover(1) and store.is_leftover(3)
    store.close()
    # Opening again is a no-op upgrade; the data is the same.
    again = ChatStore(path)
    assert again.schema_version == SCHEMA_VERSION
    assert [m.id for m in again.messages(1)] == [1, 3, 5, 6, 7, 8]
    assert again.versions(3) == [3, v2.id]
    again.close()


def test_a_failed_upgrade_leaves_the_old_file_as_it_was(tmp_path, monkeypatch):
    import app.services.chat_store as chat_store

    path = tmp_path / "chats.sqlite3"
    _old_file(path)
    broken = (*chat_store.MIGRATE_0_TO_1, "UPDATE no_such_table SET x=1")
    monkeypatch.setattr(chat_store, "MIGRATE_0_TO_1", broken)
    try:
        ChatStore(path)
    except sqlite3.OperationalError:
        pass
    else:
        raise AssertionError("the broken upgrade should have failed")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    columns = [r[1] for r in db.execute("PRAGMA table_info(messages)")]
    assert "parent_id" not in columns and "active" not in columns
    db.close()
    monkeypatch.undo()
    assert len(ChatStore(path).messages(1)) == 5  # and a working upgrade still succeeds later


def test_a_new_file_starts_at_the_current_version(tmp_path):
    store = ChatStore(tmp_path / "new.sqlite3")
    assert store.schema_version == SCHEMA_VERSION
    conv = store.create_conversation()
    store.add_message(conv.id, "user", "hi")
    assert [m.content for m in store.messages(conv.id)] == ["hi"]
