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
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from app.gui.chat_page import ChatPage
from app.services.chat_store import ChatStore
from tests.app.gui.conftest import load_options
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


def test_a_disk_that_fills_mid_answer_keeps_the_answer_and_the_page_usable(qtbot, bridge, gui_env, chat_model,
                                                                         monkeypatch):
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
        bridge.load(load_options(chat_model))
    disk = flaky_disk.install(monkeypatch)
    path = gui_env["data"] / "chats.sqlite3"
    store = ChatStore(path)
    page = ChatPage(bridge, store, gui_env["settings"])
    qtbot.addWidget(page)
    page.params.temperature.setValue(0.0)
    page.params.max_tokens.setValue(40)
    page.show()

    tokens = []

    def fill_the_disk_mid_answer(_rid, text):  # runs after the page's own slot
        tokens.append(text)
        if len(tokens) == 2:
            page._save_active()  # saved while there is room (as its 300 ms timer would)
            disk.failure = FULL  # then the disk fills
        elif len(tokens) == 6:
            page._save_active()  # a save on the full disk, mid-answer

    bridge.tokenReceived.connect(fill_the_disk_mid_answer)
    page.input.setPlainText("Tell me about lighthouses")
    with qtbot.waitSignal(page.answerFinished, timeout=60_000) as done:
        qtbot.mouseClick(page.send_button, Qt.MouseButton.LeftButton)
    bridge.tokenReceived.disconnect(fill_the_disk_mid_answer)
    assert done.args[1].reason == "length" and disk.writes_failed

    answer = page.message_widgets()[-1]
    assert answer.role == "assistant" and len(answer.text) > 20
    assert page.send_button.isEnabled() and not page.stop_button.isEnabled()  # usable again
    banner = page.store_banner
    assert banner.isVisible() and "is full" in banner.text.text() and "Free some space" in banner.text.text()
    on_disk = sqlite3.connect(path).execute("SELECT content, status FROM messages WHERE role='assistant'").fetchone()
    assert on_disk[1] == "streaming" and len(on_disk[0]) < len(answer.text)  # the file stopped mid-answer
    assert store.messages(page.conversation_id)[-1].content == answer.text  # all of it, in memory

    banner.timer.setInterval(50)  # rather than the 5 s a user waits
    disk.failure = None  # space returns
    qtbot.waitUntil(lambda: not banner.isVisible(), timeout=5000)
    rows = sqlite3.connect(path).execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()
    assert rows == [("user", "Tell me about lighthouses", "complete"), ("assistant", answer.text, "complete")]


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
