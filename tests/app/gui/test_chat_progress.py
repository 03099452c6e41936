"""A long prompt shows how much of it the model has read, in the answer's place, on screen."""

from __future__ import annotations

from functools import partial

import pytest
from PySide6.QtCore import QPoint, QRect

from app.gui.chat_page import ChatPage
from app.gui.chat_widgets import prompt_progress_text
from app.services.chat_store import ChatStore
from tests.app.gui.conftest import load_options

LOAD_TIMEOUT = 60_000
ANSWER_TIMEOUT = 120_000


@pytest.fixture
def chunked_bridge(qtbot):
    """A bridge whose engine reads prompts 8 tokens a step, so a short prompt takes many."""
    from app.gui.bridge import EngineBridge
    from engine.api import Engine

    b = EngineBridge(engine_factory=partial(Engine.load, max_num_batched_tokens=8))
    yield b
    b.shutdown()


def _inside(widget, viewport) -> bool:
    top_left = widget.mapTo(viewport, QPoint(0, 0))
    return viewport.rect().contains(QRect(top_left, widget.size()))


def test_a_long_prompt_shows_reading_progress_where_the_answer_will_be(qtbot, chunked_bridge, gui_env,
                                                                       chat_model):
    bridge = chunked_bridge
    with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT):
        bridge.load(load_options(chat_model, max_model_len=512))
    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    conv = store.create_conversation()
    for i in range(3):  # an earlier exchange that fills the screen
        store.add_message(conv.id, "user", "\n".join(f"question {i} line {n}" for n in range(15)))
        store.add_message(conv.id, "assistant", "\n".join(f"answer {i} line {n}" for n in range(15)))
    gui_env["settings"].setValue("chat/last_conversation", conv.id)
    page = ChatPage(bridge, store, gui_env["settings"])
    qtbot.addWidget(page)
    page.params.temperature.setValue(0.0)
    page.params.max_tokens.setValue(4)
    page.resize(900, 500)
    page.show()
    shown = []  # (done, total, what the answer showed) at each progress report

    def on_progress(rid, done, total):  # runs after the page's own slot
        widget = page._active["widget"] if page._active else None
        shown.append((done, total, widget.body.text() if widget else None))

    bridge.promptProgress.connect(on_progress)
    paste = " ".join(f"word{n % 50}" for n in range(130))  # ~360 tokens: long for a 512 context
    page.input.setPlainText(paste)
    with qtbot.waitSignal(page.answerFinished, timeout=ANSWER_TIMEOUT) as finished:
        page.send()
        qtbot.waitUntil(lambda: bool(shown) or page._active is None, timeout=ANSWER_TIMEOUT)
        assert shown, "no prompt progress before the answer ended"
        answer = page.message_widgets()[-1]
        # The transcript scrolled to the answer while the model reads the prompt.
        qtbot.waitUntil(lambda: _inside(answer, page.scroll.viewport()), timeout=5_000)
    total = finished.args[1].usage.prompt_tokens
    assert total > 300
    assert all(t == total for _, t, _ in shown)
    assert [d for d, _, _ in shown] == sorted(d for d, _, _ in shown)
    assert all(text == prompt_progress_text(d, total) for d, _, text in shown)
    assert prompt_progress_text(1024, 2900) == "Reading the prompt: 1,024 / 2,900 tokens"
    assert answer.text and answer.text in store.messages(conv.id)[-1].content
