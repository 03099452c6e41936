"""The desktop app with a bad chat history (issue 12 items 1 and 2).

1. A damaged, read-only or full ``chats.sqlite3`` gave a traceback and SIGABRT at start:
   the window must open and its banner say what happened and what to do.
2. A disk that filled mid-answer lost the answer and left Send disabled and Stop enabled
   for good: the answer must stay on screen and in memory, the page usable, and the
   answer saved once space returns (the banner then goes).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from app.gui.bridge import BridgeSignals
from app.gui.chat_page import ChatPage
from app.services.chat_store import ChatStore, StorageError
from engine.api import FinishedEvent, Timings, Usage
from tests.app.model_info_fixtures import fake_info
from tests.app.services import flaky_disk
from tests.app.services.flaky_disk import FULL, READ_ONLY

REPO = Path(__file__).resolve().parents[3]


def _main_window(qtbot, gui_env, bridge):
    from app.gui.main_window import MainWindow

    win = MainWindow(bridge=bridge, settings=gui_env["settings"], autoload=False)  # opens the store itself
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    return win


def _old_chat(path: Path) -> None:
    store = ChatStore(path)
    conv = store.create_conversation("Old chat")
    store.add_message(conv.id, "user", "Still there?")
    store.close()


def test_the_window_opens_with_a_damaged_history_and_says_where_it_went(qtbot, gui_env, bridge):
    gui_env["data"].mkdir(parents=True)
    (gui_env["data"] / "chats.sqlite3").write_bytes(os.urandom(8192))
    win = _main_window(qtbot, gui_env, bridge)  # raised sqlite3.DatabaseError here
    banner = win.chat.store_banner
    aside = win.store.moved_aside
    assert aside is not None and aside.exists()
    assert banner.isVisible() and aside.name in banner.text.text() and "damaged" in banner.text.text()
    assert not banner.retry_button.isVisible()  # nothing to retry: the new history is saved
    assert win.chat.conversation_id is not None and win.chat.chat_list.ids() == [win.chat.conversation_id]
    qtbot.mouseClick(banner.dismiss_button, Qt.MouseButton.LeftButton)  # news, read once
    assert not banner.isVisible()


def test_the_window_opens_read_only_and_saves_once_it_can(qtbot, gui_env, bridge, monkeypatch):
    path = gui_env["data"] / "chats.sqlite3"
    _old_chat(path)
    disk = flaky_disk.install(monkeypatch)
    disk.failure = READ_ONLY
    win = _main_window(qtbot, gui_env, bridge)
    banner = win.chat.store_banner
    assert win.store.mode == "read-only"
    assert banner.isVisible() and "can't be saved" in banner.text.text() and "read-only" in banner.text.text()
    assert not banner.dismiss_button.isVisible() and banner.retry_button.isVisible()
    assert banner.timer.isActive()  # it keeps trying by itself
    assert [win.store.conversation(i).title for i in win.chat.chat_list.ids()] == ["Old chat"]
    win.chat.new_conversation()
    win.store.rename(win.chat.conversation_id, "Made in memory")
    qtbot.mouseClick(banner.retry_button, Qt.MouseButton.LeftButton)  # still read-only
    assert banner.isVisible() and win.store.mode == "read-only"
    # Quitting now would lose that chat: the window says so before it closes.
    assert "could not be saved" in win.unfinished_work()
    disk.failure = None  # permissions fixed
    qtbot.mouseClick(banner.retry_button, Qt.MouseButton.LeftButton)
    assert not banner.isVisible() and win.store.mode == "normal" and not banner.timer.isActive()
    assert win.unfinished_work() is None
    titles = [r[0] for r in sqlite3.connect(path).execute("SELECT title FROM conversations ORDER BY id")]
    assert titles == ["Old chat", "Made in memory"]


class ManualBridge(BridgeSignals):
    """A bridge the test drives: ``submit`` only records the request, and the test emits
    each token and the end itself, so saves happen exactly where the test puts them (the
    real bridge delivers each token as the engine makes it, at whatever pace the machine allows)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []
        self.model_info = fake_info("manual")
        self.is_loading = False

    def submit(self, **_) -> str:
        self.requests.append(f"r{len(self.requests)}")
        return self.requests[-1]

    def abort(self, rid: str) -> None:
        pass

    def finish(self, rid: str, reason: str = "stop") -> None:
        self.requestFinished.emit(rid, FinishedEvent(rid, reason, Usage(3, 12), Timings(0, 5.0, 1.0, 100.0, 10.0)))


def _manual_page(qtbot, gui_env, store) -> tuple[ChatPage, ManualBridge]:
    bridge = ManualBridge()
    page = ChatPage(bridge, store, gui_env["settings"])
    qtbot.addWidget(page)
    page.show()
    qtbot.waitExposed(page)  # the page saw model_info: ready to send
    return page, bridge


def test_a_disk_that_fills_mid_answer_keeps_the_answer_and_the_page_usable(qtbot, gui_env, monkeypatch):
    disk = flaky_disk.install(monkeypatch)
    path = gui_env["data"] / "chats.sqlite3"
    store = ChatStore(path)
    page, bridge = _manual_page(qtbot, gui_env, store)
    page.input.setPlainText("Tell me about lighthouses")
    qtbot.mouseClick(page.send_button, Qt.MouseButton.LeftButton)
    (rid,) = bridge.requests
    words = "Lighthouses stand on rocky coasts and guide ships home through fog and storms.".split(" ")
    for i, word in enumerate(words):
        bridge.tokenReceived.emit(rid, word if i == 0 else f" {word}")
        if i == 2:
            page._save_active()  # saved while there is room (as its 300 ms timer would)
            disk.failure = FULL  # then the disk fills
        elif i == 6:
            page._save_active()  # a save on the full disk, mid-answer
    assert disk.writes_failed
    with qtbot.waitSignal(page.answerFinished, timeout=5000):
        bridge.finish(rid, "length")

    answer = page.message_widgets()[-1]
    assert answer.role == "assistant" and answer.text == " ".join(words)
    assert page.send_button.isEnabled() and not page.stop_button.isEnabled()  # usable again
    banner = page.store_banner
    assert banner.isVisible() and "is full" in banner.text.text() and "Free some space" in banner.text.text()
    on_disk = sqlite3.connect(path).execute("SELECT content, status FROM messages WHERE role='assistant'").fetchone()
    assert on_disk == ("Lighthouses stand on", "streaming")  # the file stopped mid-answer
    assert store.messages(page.conversation_id)[-1].content == answer.text  # all of it, in memory

    banner.timer.setInterval(50)  # rather than the 5 s a user waits
    disk.failure = None  # space returns
    qtbot.waitUntil(lambda: not banner.isVisible(), timeout=5000)
    rows = sqlite3.connect(path).execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()
    assert rows == [("user", "Tell me about lighthouses", "complete"), ("assistant", answer.text, "complete")]


# -- a store that refuses a write: a line in the notice bar, never a traceback ---------------
REFUSALS = [StorageError("The chat history is in use by another program. Try again in a moment."),
            sqlite3.OperationalError("disk I/O error")]


@pytest.fixture
def refusing_store(gui_env, monkeypatch):
    """A store whose writes raise ``refusing_store.refusal`` while it is set."""
    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    real_write = store._database.write

    def write(change):
        if store.refusal is not None:
            raise store.refusal
        return real_write(change)
    store.refusal = None
    monkeypatch.setattr(store._database, "write", write)
    yield store
    store.close()


def _rows(store) -> list:
    return store._db.execute("SELECT * FROM conversations").fetchall() + \
        store._db.execute("SELECT * FROM messages").fetchall()


@pytest.mark.parametrize("refusal", REFUSALS, ids=["StorageError", "sqlite3.Error"])
def test_no_store_write_of_the_chat_page_ends_in_a_traceback(qtbot, gui_env, refusing_store, refusal):
    store = refusing_store
    conv = store.create_conversation("Lighthouses")
    question = store.add_message(conv.id, "user", "What is a lighthouse?")
    first = store.add_message(conv.id, "assistant", "A tower.")
    store.add_version(first.id, "A tower with a light.")
    page, bridge = _manual_page(qtbot, gui_env, store)
    page.open_conversation(conv.id)
    rows = _rows(store)
    store.refusal = refusal

    def refused(action, expected: str) -> None:
        page.notice.show_message("")
        action()  # raised from the slot, as a traceback
        assert expected in page.notice.text() and str(refusal) in page.notice.text(), page.notice.text()

    refused(page.new_conversation, "The new chat could not be started")
    assert page.conversation_id == conv.id
    refused(lambda: page.params.systemPromptEdited.emit("Be brief"), "The system prompt could not be saved")
    refused(lambda: page.flip_version(store.messages(conv.id)[-1].id, -1), "That version could not be selected")
    assert page.message_widgets()[-1].text == "A tower with a light."
    page.edit_message(question.id)
    page.input.setPlainText("What is a lighthouse for?")
    refused(page.send, "The edited message could not replace the old one")
    assert page.input.toPlainText() == "What is a lighthouse for?" and not page.is_answering
    page._cancel_edit()
    refused(page.send, "Your message could not be sent")
    assert page.input.toPlainText() == "What is a lighthouse for?" and not bridge.requests
    refused(lambda: page.regenerate(store.messages(conv.id)[-1].id), "The answer could not be started")
    refused(lambda: page.delete_conversation(conv.id, confirm=False), "The chat could not be deleted")
    chats = page.chat_list
    refused(lambda: chats.list.item(0).setText("Renamed"), "The chat could not be renamed")
    assert chats.list.item(0).text() == "Lighthouses"  # the title it still has
    refused(lambda: chats.duplicate(conv.id), "The chat could not be duplicated")
    assert chats.ids() == [conv.id] and _rows(store) == rows  # nothing changed, nothing lost

    store.refusal = None  # writes work again, and so does the page
    chats.list.item(0).setText("Renamed")
    assert store.conversation(conv.id).title == "Renamed"


@pytest.mark.parametrize("refusal", REFUSALS, ids=["StorageError", "sqlite3.Error"])
def test_a_refused_save_during_an_answer_keeps_it_and_saves_it_later(qtbot, gui_env, refusing_store, refusal):
    store = refusing_store
    page, bridge = _manual_page(qtbot, gui_env, store)
    page.input.setPlainText("Tell me about lighthouses")
    page.send()
    (rid,) = bridge.requests
    store.refusal = refusal  # the file stays locked from here
    bridge.requestStarted.emit(rid, {"dropped": 2})  # its note can't be saved either
    assert "The note about the context could not be saved" in page.notice.text()
    bridge.tokenReceived.emit(rid, "Lighthouses guide ships.")
    page._save_active()
    assert "The answer can't be saved yet" in page.notice.text()
    page._answer_ends.timer.setInterval(50)  # rather than the 5 s a user waits
    with qtbot.waitSignal(page.answerFinished, timeout=5000):
        bridge.finish(rid)
    assert "saving it is tried again" in page.notice.text()
    assert page.send_button.isEnabled() and page.message_widgets()[-1].text == "Lighthouses guide ships."
    store.refusal = None
    qtbot.waitUntil(lambda: store.messages(page.conversation_id)[-1].status == "complete", timeout=5000)
    assert store.messages(page.conversation_id)[-1].content == "Lighthouses guide ships."


def test_a_page_that_could_start_no_chat_starts_one_on_send(qtbot, gui_env, refusing_store):
    store = refusing_store
    store.refusal = REFUSALS[0]
    page, bridge = _manual_page(qtbot, gui_env, store)  # raised in the constructor
    assert page.conversation_id is None and "A new chat could not be started" in page.notice.text()
    store.refusal = None
    page.input.setPlainText("Hello")
    page.send()
    assert page.conversation_id is not None and bridge.requests
    assert [m.content for m in store.messages(page.conversation_id)] == ["Hello", ""]


@pytest.mark.slow
def test_hearth_starts_with_a_damaged_history(tmp_path):
    """The real `hearth gui` process (offscreen) with 8 KiB of random bytes as its chat
    history: it aborted with SIGABRT (rc 134) before any window showed."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "chats.sqlite3").write_bytes(os.urandom(8192))
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", HEARTH_DATA_DIR=str(data), HF_HUB_OFFLINE="1",
               XDG_CONFIG_HOME=str(tmp_path / "config"))  # never the user's own settings
    proc = subprocess.run([sys.executable, "-m", "app.cli", "gui", "--quit-after-start"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (aside,) = data.glob("chats.sqlite3.corrupt-*")
    assert aside.name in proc.stderr  # said where the old file went
    assert ChatStore(data / "chats.sqlite3").schema_version >= 1  # a new, working history


def test_the_first_token_is_painted_at_once_and_later_ones_together(qtbot, gui_env):
    """Pushed tokens reach the page with no polling delay: the first is shown as its signal
    arrives (no render timer in between); later ones wait for the next paint."""
    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    page, bridge = _manual_page(qtbot, gui_env, store)
    page.input.setPlainText("Hello")
    qtbot.mouseClick(page.send_button, Qt.MouseButton.LeftButton)
    (rid,) = bridge.requests
    bridge.tokenReceived.emit(rid, "Hi")
    answer = page.message_widgets()[-1]
    assert answer.text == "Hi" and not page._render_timer.isActive()
    bridge.tokenReceived.emit(rid, " there")
    assert answer.text == "Hi" and page._render_timer.isActive()
    qtbot.waitUntil(lambda: answer.text == "Hi there", timeout=2000)


def test_the_time_to_first_token_shows_with_the_first_token(qtbot, gui_env):
    """TTFT appeared only when the answer ended: it shows under the answer as soon as the
    first token arrives (measured here), and the engine's own figure replaces it at the end."""
    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    page, bridge = _manual_page(qtbot, gui_env, store)
    page.input.setPlainText("Tell me about lighthouses")
    qtbot.mouseClick(page.send_button, Qt.MouseButton.LeftButton)
    rid = bridge.requests[-1]
    answer = page.message_widgets()[-1]
    assert "TTFT" not in answer.footer.text()
    waited = time.monotonic()
    qtbot.wait(60)
    waited = (time.monotonic() - waited) * 1000
    bridge.tokenReceived.emit(rid, "Light")
    footer = answer.footer.text()
    assert footer.startswith("TTFT ") and footer.endswith("…")
    assert int(footer.split()[1]) >= int(waited)  # (Qt's wait may return a little early: what passed)
    bridge.tokenReceived.emit(rid, "houses")
    with qtbot.waitSignal(page.answerFinished, timeout=5000):
        bridge.finish(rid)
    assert answer.footer.text().startswith("TTFT 5 ms")  # the engine's figure
