"""The chat list (rename, duplicate, export, search, no empty leftovers), opening at the
latest message, and answer versions - on a scripted bridge, so every answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QApplication, QFileDialog, QLineEdit, QMessageBox

from app.gui.bridge import BridgeSignals
from app.gui.chat_list import ChatList
from app.gui.export_dirs import EXPORT_DIR_KEY, write_export
from app.gui.chat_page import ChatPage
from app.services.chat_store import ChatStore
from engine.api import FinishedEvent, Timings, Usage
from tests.app.model_info_fixtures import fake_info


class ScriptedBridge(BridgeSignals):
    """Answers each request with the next scripted text, one token per word, as the
    real bridge would signal it (queued, on the UI thread)."""

    def __init__(self, answers=()) -> None:
        super().__init__()
        self.answers = list(answers)
        self.requests: list[dict] = []
        self.model_info = fake_info("scripted")
        self.is_loading = False

    def submit(self, *, messages=None, system=None, params=None, **_) -> str:
        rid = f"r{len(self.requests)}"
        self.requests.append({"messages": messages, "system": system})
        text = self.answers.pop(0) if self.answers else f"answer {len(self.requests)}"
        QTimer.singleShot(0, lambda: self._play(rid, text))
        return rid

    def _play(self, rid: str, text: str) -> None:
        for word in text.split(" "):
            self.tokenReceived.emit(rid, word if word == text.split(" ")[0] else " " + word)
        ev = FinishedEvent(rid, "stop", Usage(3, len(text.split())), Timings(0, 5.0, 1.0, 100.0, 10.0))
        self.requestFinished.emit(rid, ev)

    def abort(self, rid: str) -> None:
        pass


@pytest.fixture
def store(gui_env):
    s = ChatStore(gui_env["data"] / "chats.sqlite3")
    yield s
    s.close()


def _page(qtbot, gui_env, store, bridge=None, size=(900, 600)):
    bridge = bridge or ScriptedBridge()
    page = ChatPage(bridge, store, gui_env["settings"])
    qtbot.addWidget(page)
    page.resize(*size)
    page.show()
    qtbot.waitExposed(page)
    if bridge.model_info:
        page._on_model_loaded(bridge.model_info)
    return page


def _send(qtbot, page, text):
    page.input.setPlainText(text)
    with qtbot.waitSignal(page.answerFinished, timeout=5000):
        page.send()


def _chat(store, title, *turns):
    conv = store.create_conversation(title=title)
    for i, text in enumerate(turns):
        store.add_message(conv.id, "user" if i % 2 == 0 else "assistant", text)
    return conv.id


# -- the list: menu, rename, duplicate, export, search ------------------------------------
def test_the_menu_offers_rename_duplicate_both_exports_and_delete(qtbot, gui_env, store):
    conv = _chat(store, "Plan", "hi", "hello")
    chats = ChatList(store, gui_env["settings"])
    qtbot.addWidget(chats)
    chats.reload(select=conv)
    menu = chats.context_menu(conv)
    assert [a.text() for a in menu.actions() if not a.isSeparator()] == [
        "Rename…", "Duplicate", "Export as Markdown…", "Export as JSON…", "Delete…"]
    with qtbot.waitSignal(chats.deleteRequested) as asked:
        next(a for a in menu.actions() if a.objectName() == "delete").trigger()
    assert asked.args == [conv] and store.conversation(conv) is not None  # the page decides


def test_f2_renames_in_place_and_an_empty_title_is_refused(qtbot, gui_env, store):
    conv = _chat(store, "Old title", "hi")
    chats = ChatList(store, gui_env["settings"])
    qtbot.addWidget(chats)
    chats.show()
    chats.reload(select=conv)
    for new_text, expected in (("  Trip   to Rome ", "Trip to Rome"), ("   ", "Trip to Rome")):
        qtbot.keyClick(chats.list, Qt.Key.Key_F2)
        # (the previous round's editor may linger hidden until Qt deletes it: look for a shown one;
        # on a loaded machine the new one may show an event or two later)
        shown = lambda: [e for e in chats.list.findChildren(QLineEdit) if e.isVisible()]  # noqa: E731
        qtbot.waitUntil(lambda: bool(shown()), timeout=5000)  # F2 opens the title for editing
        editor = shown()[0]
        editor.setText(new_text)
        qtbot.keyClick(editor, Qt.Key.Key_Return)
        qtbot.waitUntil(lambda: not shown())
        assert store.conversation(conv).title == expected
        assert chats.list.currentItem().text() == expected


def test_double_click_also_renames(qtbot, gui_env, store):
    conv = _chat(store, "Title", "hi")
    chats = ChatList(store, gui_env["settings"])
    qtbot.addWidget(chats)
    chats.show()
    chats.reload(select=conv)
    rect = chats.list.visualItemRect(chats.list.item(0))
    # A real double-click is press, release, double-click: the view edits the item pressed.
    qtbot.mouseClick(chats.list.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.mouseDClick(chats.list.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: chats.list.findChild(QLineEdit) is not None)


def test_duplicate_opens_a_copy_with_every_message_and_the_system_prompt(qtbot, gui_env, store):
    conv = _chat(store, "Recipe", "How do I bake bread?", "Flour, water, salt.")
    store.set_system_prompt(conv, "You are a baker.")
    page = _page(qtbot, gui_env, store)
    page.open_conversation(conv)
    next(a for a in page.chat_list.context_menu(conv).actions() if a.objectName() == "duplicate").trigger()
    copy = page.conversation_id
    assert copy != conv and store.conversation(copy).title == "Recipe (copy)"
    assert [w.text for w in page.message_widgets()] == ["How do I bake bread?", "Flour, water, salt."]
    assert page.params.system_prompt.toPlainText() == "You are a baker."
    assert page.conversation_list.currentItem().text() == "Recipe (copy)"
    # What the list has to say shows in the page's notice bar.
    page.chat_list.choose_save_path = lambda *a: str(gui_env["tmp"] / "bread.md")
    page.chat_list.export(copy, "markdown")
    assert page.notice.isVisible() and "Saved" in page.notice.text() and "bread.md" in page.notice.text()


def test_export_writes_markdown_and_json_and_remembers_the_folder(qtbot, gui_env, store, tmp_path):
    conv = _chat(store, "Code: a/b?", "Print hi", "```python\nprint('hi')\n```")
    store.add_version(store.messages(conv)[1].id, "Use print.")
    chats = ChatList(store, gui_env["settings"])
    qtbot.addWidget(chats)
    out = tmp_path / "exports"
    out.mkdir()
    asked = []
    chats.choose_save_path = lambda caption, name, filt: asked.append((caption, name, filt)) or str(out / "x")
    md = chats.export(conv, "markdown")
    js = chats.export(conv, "json")
    assert asked[0] == ("Export chat as Markdown", "Code- a-b.md", "Markdown (*.md)")
    assert asked[1][1:] == ("Code- a-b.json", "JSON (*.json)")
    assert md == out / "x.md" and js == out / "x.json"  # the extension is added when left out
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Code: a/b?") and "## You\n\nPrint hi" in text
    assert "## Assistant (version 2 of 2)\n\nUse print." in text
    doc = json.loads(js.read_text(encoding="utf-8"))
    assert doc["title"] == "Code: a/b?"
    assert [v["content"] for v in doc["messages"][1]["versions"]] == ["```python\nprint('hi')\n```", "Use print."]
    assert gui_env["settings"].value(EXPORT_DIR_KEY) == str(out)


def test_the_save_dialog_starts_in_documents_then_in_the_last_folder(qtbot, gui_env, store, tmp_path,
                                                                    monkeypatch):
    from PySide6.QtCore import QStandardPaths

    docs = tmp_path / "Documents"
    docs.mkdir()
    monkeypatch.setattr(QStandardPaths, "writableLocation", lambda _where: str(docs))
    starts = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        lambda parent, caption, start, filt: starts.append(start) or (str(tmp_path / "a.md"), filt))
    conv = _chat(store, "Notes", "hi")
    chats = ChatList(store, gui_env["settings"])
    qtbot.addWidget(chats)
    chats.confirm_overwrite = lambda path: True  # "a.md" for JSON: a.md.json, written twice
    assert chats.export(conv, "markdown") == tmp_path / "a.md"
    chats.export(conv, "json")
    assert starts == [str(docs / "Notes.md"), str(tmp_path / "Notes.json")]
    # No Documents folder: home.
    monkeypatch.setattr(QStandardPaths, "writableLocation", lambda _where: "")
    gui_env["settings"].remove(EXPORT_DIR_KEY)
    chats.export(conv, "json")
    assert starts[-1] == str(Path.home() / "Notes.json")


def test_an_export_that_cannot_be_written_says_what_to_do(qtbot, gui_env, store, tmp_path):
    conv = _chat(store, "Notes", "hi")
    chats = ChatList(store, gui_env["settings"])
    qtbot.addWidget(chats)
    chats.choose_save_path = lambda *a: str(tmp_path / "missing" / "x.md")
    with qtbot.waitSignal(chats.message) as said:
        assert chats.export(conv, "markdown") is None
    assert "Could not save" in said.args[0] and "Choose a folder" in said.args[0]
    assert gui_env["settings"].value(EXPORT_DIR_KEY) is None
    chats.choose_save_path = lambda *a: None  # cancelled: nothing happens
    assert chats.export(conv, "markdown") is None


def test_write_export_says_whether_it_saved(tmp_path):
    """Its callers used to tell success by the line starting with "Saved"."""
    def write(target: Path) -> str:
        target.write_text("hi", encoding="utf-8")
        return "the notes"
    saved = write_export(tmp_path / "notes.md", write, None)
    assert saved.saved and saved.message == f"Saved the notes to {tmp_path / 'notes.md'}"
    failed = write_export(tmp_path / "missing" / "notes.md", write, None)
    assert not failed.saved and failed.message.startswith("Could not save")


def test_search_filters_by_title_and_text_and_clearing_restores_the_list(qtbot, gui_env, store):
    soup = _chat(store, "Soup", "How long do I boil lentils?", "About 20 minutes.")
    bread = _chat(store, "Bread", "Knead how long?", "Ten MINUTES by hand.")
    other = _chat(store, "Travel", "Trains in Italy", "Book early.")
    page = _page(qtbot, gui_env, store)
    page.open_conversation(soup)
    assert page.chat_list.ids() == [other, bread, soup]
    page.activateWindow()
    page.input.setFocus()
    qtbot.waitUntil(lambda: QApplication.focusWidget() is page.input)
    qtbot.keyClick(page.input, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)  # Ctrl+F
    assert QApplication.focusWidget() is page.chat_list.search_box
    qtbot.keyClicks(page.chat_list.search_box, "minutes")
    qtbot.waitUntil(lambda: page.chat_list.ids() == [bread, soup])
    assert page.conversation_list.currentItem().text() == "Soup"  # the open chat stays marked
    page.chat_list.search_box.clear()
    page.chat_list.search_box.setText("TRAVEL")
    qtbot.waitUntil(lambda: page.chat_list.ids() == [other])
    assert page.conversation_list.currentItem() is None and page.conversation_id == soup
    page.chat_list.search_box.setText("no such words")
    qtbot.waitUntil(lambda: page.chat_list.ids() == [])
    assert page.chat_list.no_match.isVisible()
    page.chat_list.search_box.clear()
    qtbot.waitUntil(lambda: page.chat_list.ids() == [other, bread, soup])
    assert page.conversation_list.currentItem().text() == "Soup" and not page.chat_list.no_match.isVisible()


# -- opening at the latest message --------------------------------------------------------
def test_opening_a_conversation_shows_its_latest_message(qtbot, gui_env, store):
    long_text = "A paragraph that wraps over several lines in a narrow transcript. " * 8
    tall = _chat(store, "Tall", *[f"{i}: {long_text}" for i in range(24)])
    short = _chat(store, "Short", "hi", "hello")
    gui_env["settings"].setValue("chat/last_conversation", short)
    page = _page(qtbot, gui_env, store, size=(800, 420))
    bar = page.scroll.verticalScrollBar()
    rect = page.conversation_list.visualItemRect(page.conversation_list.item(1))
    qtbot.mouseClick(page.conversation_list.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert page.conversation_id == tall
    last = page.message_widgets()[-1]

    def latest_in_view():
        top = last.mapTo(page.scroll.viewport(), last.rect().topLeft()).y()
        return bar.maximum() > 0 and bar.value() == bar.maximum() and 0 <= top < page.scroll.viewport().height()

    qtbot.waitUntil(latest_in_view)
    # Scrolling up by hand stops following the end: later layout changes don't pull it back.
    bar.triggerAction(bar.SliderAction.SliderToMinimum)
    with qtbot.waitSignal(bar.rangeChanged):  # narrower: the messages wrap taller
        page.resize(640, 420)
    assert bar.value() == 0


# -- no empty leftovers ----------------------------------------------------------------------
def test_new_chat_reuses_an_empty_one_and_leaving_it_deletes_it(qtbot, gui_env, store):
    used = _chat(store, "Used", "hi", "hello")
    gui_env["settings"].setValue("chat/last_conversation", used)
    page = _page(qtbot, gui_env, store)
    qtbot.mouseClick(page.chat_list.new_button, Qt.MouseButton.LeftButton)
    fresh = page.conversation_id
    assert fresh != used and page.message_widgets() == []
    qtbot.mouseClick(page.chat_list.new_button, Qt.MouseButton.LeftButton)  # again: the same empty chat
    page.new_conversation()
    assert page.conversation_id == fresh and len(store.conversations()) == 2
    # Leave it unused (a click in the list): it goes.
    rect = page.conversation_list.visualItemRect(page.conversation_list.item(1))
    qtbot.mouseClick(page.conversation_list.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert page.conversation_id == used
    assert store.conversation(fresh) is None and page.chat_list.ids() == [used]


def test_an_empty_chat_with_a_typed_system_prompt_or_a_name_is_kept(qtbot, gui_env, store):
    used = _chat(store, "Used", "hi", "hello")
    page = _page(qtbot, gui_env, store)
    page.new_conversation()
    prompted = page.conversation_id
    page.params.system_prompt.setPlainText("You are a pirate.")  # typed by the user
    page.open_conversation(used)
    page.new_conversation()
    named = page.conversation_id
    store.rename(named, "Ideas for later")
    page.new_conversation()  # named: not a leftover, so a new one is made
    assert page.conversation_id not in (named, prompted)
    page.open_conversation(used)
    assert {c.id for c in store.conversations()} == {used, prompted, named}


def test_start_up_removes_leftovers_but_reopens_the_last_one(qtbot, gui_env, store):
    used = _chat(store, "Used", "hi", "hello")
    stale = [store.create_conversation().id for _ in range(3)]
    reopened = store.create_conversation().id
    gui_env["settings"].setValue("chat/last_conversation", reopened)
    page = _page(qtbot, gui_env, store)
    assert page.conversation_id == reopened
    assert sorted(page.chat_list.ids()) == sorted([used, reopened])
    assert all(store.conversation(c) is None for c in stale)


def test_deleting_another_chat_keeps_the_open_one(qtbot, gui_env, store, monkeypatch):
    a = _chat(store, "A", "hi", "hello")
    b = _chat(store, "B", "hey", "yo")
    c = _chat(store, "C", "newest", "chat")
    page = _page(qtbot, gui_env, store)
    page.open_conversation(a)
    monkeypatch.setattr(QMessageBox, "question", lambda *args, **kw: QMessageBox.StandardButton.Yes)
    next(x for x in page.chat_list.context_menu(b).actions() if x.objectName() == "delete").trigger()
    assert store.conversation(b) is None and page.conversation_id == a and page.chat_list.ids() == [c, a]
    assert page.conversation_list.currentItem().text() == "A"


# -- answer versions -----------------------------------------------------------------------------
def test_regenerate_keeps_the_old_answer_as_a_version_to_flip_back_to(qtbot, gui_env, store):
    bridge = ScriptedBridge(["first answer", "second answer", "third"])
    page = _page(qtbot, gui_env, store, bridge=bridge)
    _send(qtbot, page, "Question")
    old = page.message_widgets()[-1]
    assert old.versions_bar is None or not old.versions_bar.isVisible()
    with qtbot.waitSignal(page.answerFinished, timeout=5000):
        qtbot.mouseClick(old.regen_button, Qt.MouseButton.LeftButton)
    answer = page.message_widgets()[-1]
    assert [w.text for w in page.message_widgets()] == ["Question", "second answer"]
    assert answer.versions_label.text() == "2/2" and answer.versions_bar.isVisible()
    assert not answer.next_version_button.isEnabled() and answer.prev_version_button.isEnabled()
    # The model was asked without the old answer.
    assert bridge.requests[1]["messages"] == [{"role": "user", "content": "Question"}]
    qtbot.mouseClick(answer.prev_version_button, Qt.MouseButton.LeftButton)
    answer = page.message_widgets()[-1]
    assert answer.text == "first answer" and answer.versions_label.text() == "1/2"
    # The choice is in the store: the next turn builds on version 1, and a restart shows it.
    _send(qtbot, page, "More")
    assert bridge.requests[2]["messages"] == [{"role": "user", "content": "Question"},
                                              {"role": "assistant", "content": "first answer"},
                                              {"role": "user", "content": "More"}]
    page.close()
    again = _page(qtbot, gui_env, store, bridge=ScriptedBridge())
    assert [w.text for w in again.message_widgets()] == ["Question", "first answer", "More", "third"]
    assert again.message_widgets()[1].versions_label.text() == "1/2"


def test_regenerating_an_earlier_answer_keeps_the_later_turns_with_the_old_version(qtbot, gui_env, store):
    bridge = ScriptedBridge(["A1", "A2", "A1 redone"])
    page = _page(qtbot, gui_env, store, bridge=bridge)
    _send(qtbot, page, "Q1")
    _send(qtbot, page, "Q2")
    first_answer = page.message_widgets()[1]
    with qtbot.waitSignal(page.answerFinished, timeout=5000):
        page.regenerate(first_answer.msg_id)
    assert [w.text for w in page.message_widgets()] == ["Q1", "A1 redone"]
    assert bridge.requests[-1]["messages"] == [{"role": "user", "content": "Q1"}]
    page.flip_version(page.message_widgets()[1].msg_id, -1)
    assert [w.text for w in page.message_widgets()] == ["Q1", "A1", "Q2", "A2"]
    page.flip_version(page.message_widgets()[1].msg_id, +1)
    assert [w.text for w in page.message_widgets()] == ["Q1", "A1 redone"]


def test_versions_cannot_flip_while_an_answer_streams(qtbot, gui_env, store):
    bridge = ScriptedBridge(["one", "two"])
    page = _page(qtbot, gui_env, store, bridge=bridge)
    _send(qtbot, page, "Q")
    with qtbot.waitSignal(page.answerFinished, timeout=5000):
        page.regenerate(page.message_widgets()[-1].msg_id)
        answer = page.message_widgets()[-1]
        assert page.is_answering and not answer.prev_version_button.isEnabled()
    assert answer.prev_version_button.isEnabled()


def test_editing_then_flipping_a_version_never_deletes_the_hidden_branch(qtbot, gui_env, store):
    """Review finding: Edit on Q2 (under version 1 of A1), then a flip to version 2 and Send
    deleted Q2 and A2 unseen. Flipping now ends the edit; what is sent is a new message."""
    bridge = ScriptedBridge(["A1", "A2", "A1 redone", "A3"])
    page = _page(qtbot, gui_env, store, bridge=bridge)
    _send(qtbot, page, "Q1")
    _send(qtbot, page, "Q2")
    with qtbot.waitSignal(page.answerFinished, timeout=5000):
        page.regenerate(page.message_widgets()[1].msg_id)
    page.flip_version(page.message_widgets()[1].msg_id, -1)  # back to A1, Q2, A2
    page.edit_message(page.message_widgets()[2].msg_id)       # edit Q2
    page.flip_version(page.message_widgets()[1].msg_id, +1)  # to "A1 redone": Q2 is hidden
    page.input.setPlainText("Q2 edited")
    with qtbot.waitSignal(page.answerFinished, timeout=5000):
        page.send()
    assert {"Q2", "A2"} <= {m.content for m in store.all_messages(page.conversation_id)}
    assert [w.text for w in page.message_widgets()] == ["Q1", "A1 redone", "Q2 edited", "A3"]


def test_a_parent_cycle_in_a_damaged_file_does_not_hang_deleting_or_adding(store):
    conv = _chat(store, "Loop", "a", "b")
    first, second = store.messages(conv)
    store._db.execute("UPDATE messages SET parent_id=? WHERE id=?", (second.id, first.id))
    store.add_message(conv, "user", "after")  # walks the selected path: must end
    store.delete_from(conv, first.id)         # walks the subtree: must end
    assert store.message(first.id) is None
