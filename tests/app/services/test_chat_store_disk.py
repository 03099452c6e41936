"""The chat store on a bad disk (issue 12 items 1 and 2): it always opens, never loses a
change, and says what is wrong.

A damaged file is moved aside and a new one started; a file that can't be written (a
read-only folder, an immutable file, a full disk) opens read-only from a copy in memory;
a disk that fails mid-session moves the chats to memory, and ``retry_saving`` writes them
back when it can. Real read-only and full disks where this machine allows (chattr as
root, chmod otherwise, a tmpfs), SQLite's own errors simulated everywhere.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from app.services.chat_store import ChatStore
from tests.app.services import flaky_disk
from tests.app.services.flaky_disk import FULL, NO_SPACE, READ_ONLY
from tests.app.services.ordinary_user import ordinary_user  # noqa: F401 (a fixture)


def _history(path: Path) -> list[tuple[str, str, str]]:
    """(conversation title, message content, status) as a fresh connection reads the file."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT c.title, m.content, m.status FROM messages m JOIN conversations c "
                          "ON c.id = m.conversation_id ORDER BY m.id").fetchall()
    finally:
        db.close()


def _old_chat(path: Path) -> None:
    store = ChatStore(path)
    conv = store.create_conversation("Old chat")
    store.add_message(conv.id, "user", "What is a lighthouse?")
    store.add_message(conv.id, "assistant", "A tower with a light.")
    store.close()


def _add_chat(store: ChatStore, title: str) -> None:
    conv = store.create_conversation(title)
    store.add_message(conv.id, "user", f"{title} question")


# -- a damaged file -----------------------------------------------------------------------
def test_a_damaged_file_is_moved_aside_and_a_new_history_starts(tmp_path):
    path = tmp_path / "chats.sqlite3"
    junk = os.urandom(8192)
    path.write_bytes(junk)
    with pytest.raises(sqlite3.DatabaseError):
        ChatStore(path)  # the strict constructor still says so; the app uses open()
    path.with_name("chats.sqlite3-wal").write_bytes(b"journal")  # SQLite deleted the first one

    store = ChatStore.open(path)
    assert store.mode == "normal" and store.conversations() == []
    aside = store.moved_aside
    assert aside is not None and aside.read_bytes() == junk and aside.parent == tmp_path
    assert aside.name.startswith("chats.sqlite3.corrupt-")
    assert aside.name in store.problem and "damaged" in store.problem, store.problem
    # Its journal went with it: replayed into the new file it would damage that too.
    assert aside.with_name(aside.name + "-wal").read_bytes() == b"journal"
    _add_chat(store, "Fresh start")
    store.close()
    again = ChatStore.open(path)
    assert again.problem is None and [c.title for c in again.conversations()] == ["Fresh start"]


# -- a file that can't be written --------------------------------------------------------
@pytest.fixture
def read_only(tmp_path):
    """Make a path read-only for this process, really: ``chattr +i`` as root (whom
    permissions don't stop), chmod otherwise; skips where neither works here."""
    undo = []

    def make(path: Path) -> None:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(
                    ["chattr", "+i", str(path)], capture_output=True).returncode != 0:
                pytest.skip("chattr +i is not available here (root ignores chmod)")
            undo.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
        else:
            mode = path.stat().st_mode
            path.chmod(0o555 if path.is_dir() else 0o444)
            undo.append(lambda: path.chmod(mode))

    yield make
    for step in reversed(undo):
        step()


def _writable_again(undo_fixture_path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(undo_fixture_path)], check=True)
    else:
        undo_fixture_path.chmod(0o755 if undo_fixture_path.is_dir() else 0o644)


def _file_bytes(path: Path) -> tuple[bytearray, int]:
    """The history file's bytes with its journal written in, and its page size."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return bytearray(path.read_bytes()), page


def test_a_damaged_page_costs_only_the_rows_on_it(tmp_path):
    """One damaged page set the whole history aside, though the rest could be read: now the
    chats and messages that can still be read are copied into the new history (ids kept; a
    message after a lost one follows the one before that), and the note says how many."""
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    for i in range(60):
        conv = store.create_conversation(f"chat {i}")
        for j in range(4):
            store.add_message(conv.id, "user" if j % 2 == 0 else "assistant",
                              f"{'MARKER ' if (i, j) == (30, 1) else ''}message {j} of chat {i} " + "x" * (250 + 90 * j))
    store.close()
    data, page = _file_bytes(path)
    at = data.index(b"MARKER message 1 of chat 30") // page * page  # that message's page
    data[at:at + 100] = os.urandom(100)  # its header: every row on it is unreadable
    path.write_bytes(bytes(data))

    store = ChatStore.open(path)
    assert store.mode == "normal" and store.moved_aside is not None
    titles = [c.title for c in store.conversations()]
    assert len(titles) == 60
    assert "60 chats and" in store.problem and "were recovered" in store.problem, store.problem
    assert store.moved_aside.name in store.problem
    contents = [m.content for c in store.conversations() for m in store.messages(c.id)]
    assert 200 <= len(contents) < 240 and not any(c.startswith("MARKER") for c in contents)
    rows = sqlite3.connect(store.path).execute("SELECT conversation_id, count(*) FROM messages GROUP BY 1")
    recovered = dict(rows.fetchall())
    partial = [cid for cid, n in recovered.items() if n < 4]
    assert partial  # a chat that lost some of its messages (the page's first or last)
    for cid, n in recovered.items():  # each shows every message recovered: the chain holds across the lost
        assert len(store.messages(cid)) == n, cid
    store.add_message(partial[0], "user", "still works")
    store.close()
    assert ChatStore.open(path).problem is None


@pytest.mark.parametrize("what", ["folder", "file"])
def test_a_read_only_history_shows_its_chats_and_saves_them_once_it_can(tmp_path, read_only, what):
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "chats.sqlite3"
    _old_chat(path)
    before = path.read_bytes()
    read_only(folder if what == "folder" else path)

    store = ChatStore.open(path)
    assert store.mode == "read-only" and store.retrying
    assert [c.title for c in store.conversations()] == ["Old chat"]
    assert [m.content for m in store.messages(store.conversations()[0].id)][-1] == "A tower with a light."
    assert "can't be saved" in store.problem and "read-only" in store.problem, store.problem
    assert str(folder if what == "folder" else path) in store.problem
    _add_chat(store, "Made while read-only")  # kept in memory
    assert store.unsaved_changes and [c.title for c in store.conversations()][0] == "Made while read-only"
    assert not store.retry_saving() and path.read_bytes() == before

    _writable_again(folder if what == "folder" else path)  # the user fixes the permissions
    assert store.retry_saving()
    assert store.mode == "normal" and store.problem is None and not store.unsaved_changes
    assert [t for t, _c, _s in _history(path)] == ["Old chat", "Old chat", "Made while read-only"]


# -- as an ordinary user, whom permissions stop (CI may run as root, whom they don't) -------
def _read_only_file_then_fixed(folder: Path, journal: bool) -> None:
    path = folder / "chats.sqlite3"
    if journal:  # its latest chats still in the journal (-wal), as after a crash
        (folder / "live").mkdir()
        live = ChatStore(folder / "live" / "chats.sqlite3")
        _add_chat(live, "Old chat")
        for name in ("chats.sqlite3", "chats.sqlite3-wal"):
            shutil.copy(folder / "live" / name, folder / name)
        live.close()
        shutil.rmtree(folder / "live")
    else:
        _old_chat(path)
    files = sorted(p.name for p in folder.iterdir())
    path.chmod(0o444)
    try:
        store = ChatStore.open(path)
        assert store.mode == "read-only" and f"the file {path} is read-only" in store.problem, store.problem
        assert store.retrying and store.conversations()[0].title == "Old chat"
        # Nothing made beside it: SQLite's -shm would be as read-only as the file.
        assert sorted(p.name for p in folder.iterdir()) == files
        _add_chat(store, "Made while read-only")
        assert not store.retry_saving()
        assert sorted(p.name for p in folder.iterdir()) == files
    finally:
        path.chmod(0o644)  # the user fixes the file
    assert store.retry_saving(), store.problem  # that -shm kept it read-only for good
    assert [t for t, _c, _s in _history(path)][-1] == "Made while read-only"
    store.close()
    again = ChatStore.open(path)
    assert again.mode == "normal" and again.problem is None, again.problem
    assert [c.title for c in again.conversations()] == ["Made while read-only", "Old chat"]
    again.close()


@pytest.mark.parametrize("journal", [False, True], ids=["closed", "with-journal"])
def test_a_read_only_file_is_saved_once_the_user_fixes_it(ordinary_user, journal):
    ordinary_user.run(_read_only_file_then_fixed, ordinary_user.folder, journal)


def _folder_that_cant_be_searched(data: Path) -> None:
    data.mkdir()
    path = data / "chats.sqlite3"
    _old_chat(path)
    data.chmod(0o600)  # it can be listed, but nothing in it opened
    try:
        store = ChatStore.open()  # raised PermissionError: the app didn't start
        assert store.mode == "memory" and store.retrying
        assert f"the data folder {data} can't be opened (no permission" in store.problem, store.problem
        _add_chat(store, "Made meanwhile")
        assert not store.retry_saving()
    finally:
        data.chmod(0o755)  # the user fixes the folder
    # It held chats this session never saw: they are never written over, and this
    # session's are saved beside them.
    assert not store.retry_saving() and not store.retrying and store.mode == "memory"
    assert [t for t, _c, _s in _history(path)] == ["Old chat", "Old chat"]
    (aside,) = data.glob("chats.sqlite3.unsaved-*")
    assert aside.name in store.problem and "rename" in store.problem, store.problem
    assert [t for t, _c, _s in _history(aside)] == ["Made meanwhile"]


def test_a_data_folder_that_cant_be_searched_opens_in_memory_and_overwrites_nothing(ordinary_user,
                                                                                   monkeypatch):
    data = ordinary_user.folder / "data"
    monkeypatch.setenv("HEARTH_DATA_DIR", str(data))  # ChatStore.open() finds it as the app does
    ordinary_user.run(_folder_that_cant_be_searched, data)


@pytest.mark.parametrize("failure", [READ_ONLY, FULL, NO_SPACE], ids=["read-only", "full", "ENOSPC"])
def test_a_file_that_takes_no_writes_opens_read_only(tmp_path, monkeypatch, failure):
    """SQLite's own errors, simulated: for a CI that runs neither as root nor on a tmpfs."""
    path = tmp_path / "chats.sqlite3"
    _old_chat(path)
    disk = flaky_disk.install(monkeypatch)
    disk.failure = failure
    store = ChatStore.open(path)  # it used to raise here, and the app aborted
    assert store.mode == "read-only"
    assert [c.title for c in store.conversations()] == ["Old chat"]
    expected = "read-only" if failure is READ_ONLY else "is full. Free some space"
    assert expected in store.problem and "lost if Hearth closes" in store.problem, store.problem
    _add_chat(store, "Kept in memory")
    disk.failure = None
    assert store.retry_saving() and store.mode == "normal"
    assert [t for t, _c, _s in _history(path)][-1] == "Kept in memory"


def test_a_history_that_cant_be_read_is_left_alone(tmp_path, monkeypatch):
    path = tmp_path / "chats.sqlite3"
    _old_chat(path)
    before = path.read_bytes()
    real = sqlite3.connect

    def unreadable(target, *args, **kwargs):
        if str(target) == ":memory:":
            return real(target, *args, **kwargs)
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", unreadable)
    store = ChatStore.open(path)
    assert store.mode == "memory" and "can't be read" in store.problem and str(path) in store.problem
    _add_chat(store, "This session only")
    # Writing memory back would replace chats it never read: it never tries.
    assert not store.retrying and not store.retry_saving()
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_a_data_folder_that_cant_be_made_keeps_chats_in_memory_until_it_can(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should go")
    monkeypatch.setenv("HEARTH_DATA_DIR", str(blocker / "hearth"))
    store = ChatStore.open()
    assert store.mode == "memory" and "HEARTH_DATA_DIR" in store.problem, store.problem
    _add_chat(store, "Before the folder")
    assert store.retrying and not store.retry_saving()
    blocker.unlink()
    assert store.retry_saving() and store.mode == "normal"
    assert [t for t, _c, _s in _history(blocker / "hearth" / "chats.sqlite3")] == ["Before the folder"]


def test_memory_is_never_written_over_a_history_that_appeared_meanwhile(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should go")
    monkeypatch.setenv("HEARTH_DATA_DIR", str(blocker / "hearth"))
    store = ChatStore.open()
    _add_chat(store, "Before the folder")
    blocker.unlink()
    (blocker / "hearth").mkdir(parents=True)
    _old_chat(blocker / "hearth" / "chats.sqlite3")  # another Hearth got there first
    assert not store.retry_saving() and not store.retrying
    assert [t for t, _c, _s in _history(blocker / "hearth" / "chats.sqlite3")] == ["Old chat", "Old chat"]
    (aside,) = (blocker / "hearth").glob("chats.sqlite3.unsaved-*")
    assert [t for t, _c, _s in _history(aside)] == ["Before the folder"]
    assert aside.name in store.problem


# -- a disk that fails mid-session ---------------------------------------------------------
@pytest.mark.parametrize("failure", [FULL, NO_SPACE], ids=["sqlite-full", "ENOSPC"])
def test_a_disk_that_fills_mid_answer_loses_nothing_and_saves_when_space_returns(tmp_path, monkeypatch, failure):
    path = tmp_path / "chats.sqlite3"
    disk = flaky_disk.install(monkeypatch)
    store = ChatStore.open(path)
    changes = []
    store.add_listener(lambda: changes.append((store.mode, store.problem)))
    conv = store.create_conversation("Story")
    store.add_message(conv.id, "user", "Tell me a story")
    answer = store.add_message(conv.id, "assistant", "", status="streaming")
    store.update_message(answer.id, content="Once upon")

    disk.failure = failure  # the disk fills
    text = "Once upon a time there was a lighthouse keeper who counted ships."
    store.update_message(answer.id, content=text[:30])  # no exception reaches the page
    store.update_message(answer.id, content=text, status="complete", meta={"tokens": 12})
    _add_chat(store, "Asked while full")
    assert disk.writes_failed and store.mode == "read-only" and store.unsaved_changes
    assert "is full" in store.problem and changes == [("read-only", store.problem)]
    assert store.messages(conv.id)[-1].content == text  # all of it, in memory
    assert _history(path)[-1] == ("Story", "Once upon", "streaming")  # the file as it was
    assert not store.retry_saving()  # still full: nothing written

    disk.failure = None  # space returns
    assert store.retry_saving()
    assert store.mode == "normal" and store.problem is None and changes[-1] == ("normal", None)
    assert _history(path) == [("Story", "Tell me a story", "complete"), ("Story", text, "complete"),
                              ("Asked while full", "Asked while full question", "complete")]
    store.add_message(conv.id, "user", "And then?")  # the file takes writes again, ids carry on
    store.close()
    again = ChatStore(path)
    assert [m.content for m in again.messages(conv.id)] == ["Tell me a story", text, "And then?"]


def test_a_bug_is_still_raised_not_taken_for_a_bad_disk(tmp_path):
    store = ChatStore.open(tmp_path / "chats.sqlite3")
    with pytest.raises(sqlite3.IntegrityError):
        store.add_message(12345, "user", "to a conversation that doesn't exist")
    assert store.mode == "normal" and store.problem is None


def _fill(filler: Path) -> None:
    """Write ``filler`` until its disk has no byte left."""
    with open(filler, "ab", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


def _mount_small_tmpfs(mnt: Path) -> None:
    """A 4 MiB tmpfs on ``mnt``, or a skip saying why not."""
    if os.geteuid() != 0:
        pytest.skip("can't mount a small tmpfs here (needs root)")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:  # no mount command (FileNotFoundError)
        pytest.skip(f"can't mount a small tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"can't mount a small tmpfs here: {done.stderr.strip()}")


def test_a_real_full_disk(tmp_path):
    """A 4 MiB tmpfs filled up while the store is open (root only: mounting needs it)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _mount_small_tmpfs(mnt)
    store = again = None
    try:
        store = ChatStore.open(mnt / "chats.sqlite3")
        conv = store.create_conversation("Real disk")
        answer = store.add_message(conv.id, "assistant", "", status="streaming")
        filler = mnt / "filler"
        _fill(filler)
        text = "word " * 8000  # 40 KB: more than is left
        store.update_message(answer.id, content=text, status="complete")
        assert store.mode == "read-only" and "is full" in store.problem, store.problem
        assert store.messages(conv.id)[-1].content == text
        filler.unlink()
        assert store.retry_saving() and store.mode == "normal"
        store.close()
        assert _history(mnt / "chats.sqlite3") == [("Real disk", text, "complete")]
        # A full disk when the app starts: it opens read-only and says why.
        _fill(filler)
        again = ChatStore.open(mnt / "chats.sqlite3")
        assert again.mode == "read-only" and "is full" in again.problem, again.problem
        assert [m.content for m in again.messages(conv.id)] == [text]
    finally:
        for opened in (store, again):  # an open file keeps the mount busy
            if opened is not None:
                opened.close()
        # Lazy: it goes even if something still holds it, never left mounted.
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def test_salvage_keeps_messages_whose_chat_row_was_lost_and_skips_only_a_broken_row(tmp_path):
    """Review findings: one readable row that breaks the schema (a role byte flipped to
    'usfr') made the whole copy fail, and messages whose chat's row sat on the damaged page
    were dropped without a word. Now the broken row alone is left out, and such messages go
    to a "Recovered chat" of their own."""
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    for i in range(40):
        conv = store.create_conversation(f"{'TITLEMARK ' if i == 20 else ''}chat {i}")
        store.add_message(conv.id, "user", f"{'ROLEFLIP ' if i == 5 else ''}question {i}")
        store.add_message(conv.id, "assistant", f"answer {i}")
    store.close()
    data, page = _file_bytes(path)
    flip = data.index(b"userROLEFLIP")
    data[flip:flip + 4] = b"usfr"  # readable, but the CHECK on role refuses it
    at = data.index(b"TITLEMARK") // page * page  # the chats' page (40 short rows fit on one)
    data[at:at + 100] = os.urandom(100)
    path.write_bytes(bytes(data))

    store = ChatStore.open(path)
    assert store.moved_aside is not None and "were recovered" in store.problem, store.problem
    assert "could not be read" in store.problem and "Recovered chat" in store.problem
    convs = store.conversations()
    assert len(convs) == 40 and {c.title for c in convs} == {"Recovered chat"}  # every chat row was on that page
    contents = sorted(m.content for c in convs for m in store.messages(c.id))
    assert len(contents) == 79 and "ROLEFLIP question 5" not in contents and "answer 5" in contents


def test_salvage_survives_a_damaged_sequence_number():
    """With the table's last page unreadable, salvage looks up sqlite_sequence: a damaged
    value there (text, huge) must neither crash the store's opening nor scan for hours."""
    from app.services import chat_store

    class Damaged:
        def __init__(self, seq):
            self.seq, self.ranges = seq, 0

        def execute(self, sql, args=()):
            if "max(rowid)" in sql:
                raise sqlite3.DatabaseError("database disk image is malformed")
            if "sqlite_sequence" in sql:
                return type("Cursor", (), {"fetchone": lambda _self: (self.seq,)})()
            self.ranges += 1
            return type("Cursor", (), {"fetchall": lambda _self: []})()

    for seq in ("abc", None, -5, 10**15):
        old = Damaged(seq)
        rows, lost = chat_store._readable_rows(old, "messages", "id")
        assert rows == [] and lost == 0 and old.ranges <= chat_store._SALVAGE_MAX_IDS // chat_store._SALVAGE_CHUNK + 1
