"""Two writers on one chat history (second review, finding 3), and what a write-back costs.

A lock (another Hearth writing the same file) is not a broken disk: it is waited for,
and a write still locked out raises StorageError with the chats left on the file. A
write-back of chats kept in memory never overwrites what another writer saved meanwhile.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from app.services import chat_db
from app.services.chat_store import ChatStore, StorageError
from tests.app.services import flaky_disk
from tests.app.services.flaky_disk import FULL


def _titles(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [t for (t,) in db.execute("SELECT title FROM conversations ORDER BY id")]
    finally:
        db.close()


def _contents(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [c for (c,) in db.execute("SELECT content FROM messages ORDER BY id")]
    finally:
        db.close()


class Locker:
    """Another program holding the file's write lock (``BEGIN IMMEDIATE``)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.fixture
def short_locks(monkeypatch):
    """Connections give up on a lock after 50 ms, not seconds (set before opening)."""
    monkeypatch.setattr(chat_db, "BUSY_TIMEOUT_S", 0.05, raising=False)  # (raising: the old store had none)


def test_a_lock_that_passes_is_waited_for(tmp_path):
    path = tmp_path / "chats.sqlite3"
    store = ChatStore.open(path)
    locker = Locker(path)
    threading.Timer(0.2, locker.release).start()  # well inside the store's wait
    conv = store.create_conversation("Written once the lock went")
    assert store.mode == "normal" and store.problem is None
    assert _titles(path) == ["Written once the lock went"] and store.conversation(conv.id)


def test_a_lock_that_stays_raises_and_leaves_the_chats_on_the_file(tmp_path, short_locks):
    path = tmp_path / "chats.sqlite3"
    a, b = ChatStore.open(path), ChatStore.open(path)
    conv = a.create_conversation("A's chat")
    locker = Locker(path)
    try:
        with pytest.raises(StorageError, match="in use by another program") as refused:
            b.create_conversation("B's chat")
        assert str(path) in str(refused.value) and "Try again" in str(refused.value)
        # It used to move to memory here, and write the memory back over A's chats later.
        assert b.mode == "normal" and b.problem is None and not b.unsaved_changes
    finally:
        locker.release()
    a.add_message(conv.id, "assistant", "A's answer")
    b.create_conversation("B's chat")  # the lock is gone: B writes to the file
    assert b.retry_saving() and _titles(path) == ["A's chat", "B's chat"]
    assert _contents(path) == ["A's answer"] and [m.content for m in a.messages(conv.id)] == ["A's answer"]


def test_a_lock_when_the_app_starts_still_opens_the_file(tmp_path, short_locks):
    path = tmp_path / "chats.sqlite3"
    ChatStore(path).close()
    locker = Locker(path)
    try:
        store = ChatStore.open(path)  # its clean-up write waits, then leaves it for later
        assert store.mode == "normal" and store.problem is None
    finally:
        locker.release()
    store.create_conversation("Saved")
    assert _titles(path) == ["Saved"]


def test_a_write_back_never_overwrites_what_another_writer_saved_meanwhile(tmp_path, monkeypatch):
    path = tmp_path / "chats.sqlite3"
    other = ChatStore.open(path)  # another Hearth, on a connection the flaky disk spares
    old = other.create_conversation("Old chat")
    disk = flaky_disk.install(monkeypatch)
    store = ChatStore.open(path)
    disk.failure = FULL  # this one's writes fail: its chats move to memory
    store.create_conversation("Kept in memory")
    assert store.mode == "read-only" and store.retrying
    disk.failure = None
    other.add_message(old.id, "user", "Saved by the other window")  # the file changes meanwhile
    other.create_conversation("The other's chat")

    assert not store.retry_saving()  # it replaced the whole file with its copy
    assert _titles(path) == ["Old chat", "The other's chat"]
    assert _contents(path) == ["Saved by the other window"]
    (aside,) = tmp_path.glob("chats.sqlite3.unsaved-*")
    assert _titles(aside) == ["Old chat", "Kept in memory"]  # this session's, beside it
    assert aside.name in store.problem and "not written over" in store.problem, store.problem
    assert store.mode == "memory" and not store.retrying and not store.unsaved_changes
    other.create_conversation("Still saved")  # the other window's writes still land
    assert _titles(path)[-1] == "Still saved"


def test_with_nothing_changed_in_memory_the_file_is_opened_again_as_it_is(tmp_path, monkeypatch):
    """No copy back (a whole history, on the GUI thread) when memory holds nothing new,
    and so nothing written over what another window saved meanwhile."""
    path = tmp_path / "chats.sqlite3"
    ChatStore(path).close()
    disk = flaky_disk.install(monkeypatch)
    disk.failure = FULL
    store = ChatStore.open(path)
    assert store.mode == "read-only" and not store.unsaved_changes
    disk.failure = None
    ChatStore(path).create_conversation("The other's chat")
    assert store.retry_saving() and store.mode == "normal"
    assert _titles(path) == ["The other's chat"] and [c.title for c in store.conversations()] == ["The other's chat"]


def test_a_write_back_needs_room_for_the_journal_too(tmp_path, monkeypatch):
    """The rows go to the journal (-wal) beside the file's old pages: about twice the
    history, which the space check used to ignore."""
    path = tmp_path / "chats.sqlite3"
    disk = flaky_disk.install(monkeypatch)
    store = ChatStore.open(path)
    disk.failure = FULL
    conv = store.create_conversation("Long")
    store.add_message(conv.id, "user", "x" * 200_000)
    disk.failure = None
    history = store._db.execute("PRAGMA page_count").fetchone()[0] * store._db.execute("PRAGMA page_size").fetchone()[0]
    opened = []

    def open_file(self, prepare):
        opened.append(1)
        raise OSError(5, "Input/output error")  # enough to see that it was tried
    monkeypatch.setattr(chat_db.ChatDatabase, "_open_file", open_file)
    real_usage = shutil.disk_usage

    def free(room: int):
        monkeypatch.setattr(shutil, "disk_usage", lambda folder: real_usage(folder)._replace(free=room))
    free(history + (1 << 20) + 4096)  # room for the history, not for its journal as well
    assert not store.retry_saving() and opened == []  # not even tried
    free(2 * history + (1 << 20))
    assert not store.retry_saving() and opened == [1]  # tried


def test_a_failed_write_back_is_retried_by_the_timer_after_a_growing_pause(tmp_path, monkeypatch):
    path = tmp_path / "chats.sqlite3"
    disk = flaky_disk.install(monkeypatch)
    store = ChatStore.open(path)
    disk.failure = FULL
    store.create_conversation("In memory")
    # The disk looks fine (room, permissions), yet the write-back fails: every 5 s on the
    # GUI thread that would be a whole copy of the history each time.
    tries = []
    real = chat_db.ChatDatabase._open_file
    monkeypatch.setattr(chat_db.ChatDatabase, "_open_file",
                        lambda self, prepare: tries.append(1) or real(self, prepare=prepare))
    now = [1000.0]
    monkeypatch.setattr(chat_db.time, "monotonic", lambda: now[0])
    assert not store.retry_saving(now=False) and len(tries) == 1
    assert not store.retry_saving(now=False) and len(tries) == 1  # pausing
    now[0] += 5.1
    assert not store.retry_saving(now=False) and len(tries) == 2
    now[0] += 5.1
    assert not store.retry_saving(now=False) and len(tries) == 2  # the pause doubled
    assert not store.retry_saving() and len(tries) == 3  # Try again: at once
    disk.failure = None
    now[0] += 1000
    assert store.retry_saving(now=False) and _titles(path) == ["In memory"]
