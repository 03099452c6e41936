"""The chat page while models load (real tiny engines; the loads under test are held back
by a gate): the loaded model keeps answering, a superseded load is no failure and a
message typed before any model was ready goes to the one that ends up loaded."""

from __future__ import annotations

import threading

import pytest

from app.gui.chat_page import ChatPage
from app.services.chat_store import ChatStore
from engine.api import Engine
from tests.app.gui.conftest import load_options
from tests.app.model_info_fixtures import fake_info

TIMEOUT = 60_000


@pytest.fixture
def gated_bridge(qtbot):
    """A real bridge whose loads of the models in ``gated`` wait for ``gate`` (cancellable)."""
    from app.gui.bridge import EngineBridge

    gate, gated = threading.Event(), set()

    def factory(model, progress=None, **kwargs):
        if model in gated:
            while not gate.wait(0.01):
                progress("waiting for the test")
        return Engine.load(model, progress=progress, **kwargs)

    bridge = EngineBridge(engine_factory=factory)
    bridge.gate, bridge.gated = gate, gated
    yield bridge
    gate.set()
    bridge.shutdown()


def _page(qtbot, bridge, gui_env):
    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    page = ChatPage(bridge, store, gui_env["settings"])
    qtbot.addWidget(page)
    page.params.temperature.setValue(0.0)
    page.params.max_tokens.setValue(3)
    page.show()
    return page, store


def test_the_chat_answers_with_the_loaded_model_while_another_loads(qtbot, gated_bridge, gui_env, chat_model,
                                                                     tiny_models):
    """Review finding 4: Send goes to A, Regenerate works; B takes over once ready."""
    page, store = _page(qtbot, gated_bridge, gui_env)
    b = str(tiny_models["qwen2"])
    gated_bridge.gated.add(b)
    with qtbot.waitSignal(gated_bridge.modelLoaded, timeout=TIMEOUT) as loaded:
        gated_bridge.load(load_options(chat_model))
    a_name = loaded.args[0].name
    with qtbot.waitSignal(gated_bridge.modelLoading, timeout=TIMEOUT) as loading:
        gated_bridge.load(load_options(b))
    b_name = loading.args[0]
    assert page.model_label.text() == f"{a_name} · loading {b_name}…"
    assert page.send_button.isEnabled()
    with qtbot.waitSignal(page.answerFinished, timeout=TIMEOUT) as done:
        page.send("Who answers?")
    assert done.args[1].reason == "length"
    answer = store.messages(page.conversation_id)[-1]
    assert answer.role == "assistant" and answer.meta["model"] == a_name
    regen = page.message_widgets()[-1].regen_button
    assert regen.isEnabled()
    with qtbot.waitSignal(page.answerFinished, timeout=TIMEOUT) as again:
        regen.click()
    assert again.args[1].reason == "length" and store.messages(page.conversation_id)[-1].version_count == 2
    assert gated_bridge.is_loading and gated_bridge.model_info.name == a_name
    with qtbot.waitSignal(gated_bridge.modelLoaded, timeout=TIMEOUT):
        gated_bridge.gate.set()
    assert page.model_label.text().startswith(f"{b_name} ·")


def test_a_message_typed_while_a_superseded_load_ran_goes_to_the_last_one(qtbot, gated_bridge, gui_env,
                                                                         chat_model, tiny_models):
    """Review finding 6: while A loads (nothing serves yet) a message is typed; then B and
    C are asked for. No "Loading failed" is shown, and the message is answered by C."""
    page, store = _page(qtbot, gated_bridge, gui_env)
    a, b = str(tiny_models["qwen2"]), str(tiny_models["mistral"])
    gated_bridge.gated.update({a, b})
    failed, notices = [], []
    gated_bridge.loadFailed.connect(failed.append)
    page.notice.show_message = lambda text, real=page.notice.show_message: (notices.append(text), real(text))
    with qtbot.waitSignal(gated_bridge.modelLoading, timeout=TIMEOUT):
        gated_bridge.load(load_options(a))
    assert page.model_label.text().startswith("Loading ")
    page.input.setPlainText("Hello there")
    page.send()
    assert page.input.toPlainText() == "" and "still loading" in page.notice.text()
    gated_bridge.load(load_options(b))
    with qtbot.waitSignal(page.answerFinished, timeout=TIMEOUT) as done:
        gated_bridge.load(load_options(chat_model))
    assert done.args[1].reason == "length" and failed == []
    assert not any("failed" in n.lower() for n in notices)
    messages = store.messages(page.conversation_id)
    assert [m.content for m in messages if m.role == "user"] == ["Hello there"]
    assert messages[-1].meta["model"] == gated_bridge.model_info.name
    assert gated_bridge.model_info.path == chat_model


def test_cancelling_a_load_says_cancelled_not_failed(qtbot, gated_bridge, gui_env, chat_model, tiny_models):
    page, _ = _page(qtbot, gated_bridge, gui_env)
    with qtbot.waitSignal(gated_bridge.modelLoaded, timeout=TIMEOUT) as loaded:
        gated_bridge.load(load_options(chat_model))
    b = str(tiny_models["qwen2"])
    gated_bridge.gated.add(b)
    with qtbot.waitSignal(gated_bridge.modelLoading, timeout=TIMEOUT):
        gated_bridge.load(load_options(b))
    with qtbot.waitSignal(gated_bridge.loadFailed, timeout=TIMEOUT):
        gated_bridge.cancel_load()
    assert page.notice.text() == "Loading cancelled."
    assert page.model_label.text().startswith(f"{loaded.args[0].name} ·") and page.send_button.isEnabled()


def test_after_a_failed_load_brought_the_old_model_back_the_page_serves_it(qtbot, gui_env):
    """Review 2 finding 6: on one card the working model made room, the new one failed and
    the working one was loaded again: the page says so, serves it, and gives back the
    message typed for the failed one."""
    from engine.api import OutOfMemoryError
    from tests.app.gui.test_bridge_loading import one_card_bridge

    gate = threading.Event()
    bridge = one_card_bridge({"acme/huge"}, {"acme/huge": OutOfMemoryError("the weights need 80 GiB")}, gate)
    try:
        page, _ = _page(qtbot, bridge, gui_env)
        with qtbot.waitSignal(bridge.modelLoaded, timeout=TIMEOUT):
            bridge.load(load_options("acme/working"))
        bridge.load(load_options("acme/huge"))  # waits at the gate, acme/working unloaded
        qtbot.waitUntil(lambda: page.model_label.text() == "Loading acme/huge…" and bridge.model_info is None,
                        timeout=TIMEOUT)
        page.send("For the big one")
        assert "still loading" in page.notice.text()
        with qtbot.waitSignal(bridge.modelLoaded, timeout=TIMEOUT):
            gate.set()
        assert page.notice.text() == ("Loading acme/huge failed: the weights need 80 GiB. "
                                      "acme/working was loaded again.")
        assert page.model_label.text().startswith("acme/working ·") and page.send_button.isEnabled()
        assert page._model_ready and page.input.toPlainText() == "For the big one"
    finally:
        gate.set()
        bridge.shutdown()


def test_an_answer_is_saved_under_the_model_that_gave_it(qtbot, gui_env):
    """Review 2, swap-time races: a Send that reaches the worker just after a swap is
    answered by the new model; requestStarted names it, and the answer is saved so."""
    from PySide6.QtCore import QTimer

    from app.gui.bridge_signals import BridgeSignals
    from engine.api import FinishedEvent, Timings, Usage

    class SwappedBridge(BridgeSignals):
        model_info = fake_info("acme/a")  # what the page knew when it sent
        is_loading = False

        def submit(self, **_) -> str:
            QTimer.singleShot(0, self._answer)
            return "r1"

        def _answer(self) -> None:
            self.requestStarted.emit("r1", {"model": "acme/b", "dropped": 0})
            self.tokenReceived.emit("r1", "Hi")
            self.requestFinished.emit("r1", FinishedEvent("r1", "stop", Usage(1, 1), Timings(0, 1, 1, 1, 2)))

    page, store = _page(qtbot, SwappedBridge(), gui_env)
    page._on_model_loaded(page.bridge.model_info)
    with qtbot.waitSignal(page.answerFinished, timeout=TIMEOUT):
        page.send("Who are you?")
    answer = store.messages(page.conversation_id)[-1]
    assert answer.content == "Hi" and answer.meta["model"] == "acme/b"


def test_a_message_typed_while_loading_goes_to_the_chat_it_was_typed_in(qtbot, gated_bridge, gui_env, chat_model):
    """Typed in chat A while the model loads, then chat B opened: once loaded the message and
    its answer are in A (opened again), B is untouched. One typed in an empty new chat that
    was dropped when B was opened goes to a new chat, not into B."""
    page, store = _page(qtbot, gated_bridge, gui_env)
    a = store.create_conversation("Chat A")
    store.add_message(a.id, "user", "About eggs")
    b = store.create_conversation("Chat B")
    store.add_message(b.id, "user", "About cars")
    page._reload_list(select=a.id)
    page.open_conversation(a.id)
    gated_bridge.gated.add(chat_model)
    with qtbot.waitSignal(gated_bridge.modelLoading, timeout=TIMEOUT):
        gated_bridge.load(load_options(chat_model))
    page.send("A follow-up about eggs")
    assert "still loading" in page.notice.text()
    page.open_conversation(b.id)
    page.input.setPlainText("A draft for B")
    with qtbot.waitSignal(page.answerFinished, timeout=TIMEOUT):
        gated_bridge.gate.set()
    assert page.conversation_id == a.id
    assert page.input.toPlainText() == "A draft for B"  # not wiped by the pending message's send
    assert [m.content for m in store.messages(a.id) if m.role == "user"] == ["About eggs", "A follow-up about eggs"]
    assert store.messages(a.id)[-1].role == "assistant"
    assert [m.content for m in store.messages(b.id)] == ["About cars"]


def test_a_message_typed_in_a_new_chat_while_loading_does_not_land_in_another(qtbot, gated_bridge, gui_env,
                                                                             chat_model):
    page, store = _page(qtbot, gated_bridge, gui_env)
    b = store.create_conversation("Chat B")
    store.add_message(b.id, "user", "About cars")
    page._reload_list(select=b.id)
    page.new_conversation()
    fresh = page.conversation_id
    assert fresh not in (None, b.id)
    gated_bridge.gated.add(chat_model)
    with qtbot.waitSignal(gated_bridge.modelLoading, timeout=TIMEOUT):
        gated_bridge.load(load_options(chat_model))
    page.send("A new question")
    page.open_conversation(b.id)  # the empty new chat is dropped as a leftover
    with qtbot.waitSignal(page.answerFinished, timeout=TIMEOUT):
        gated_bridge.gate.set()
    assert page.conversation_id != b.id
    assert [m.content for m in store.messages(b.id)] == ["About cars"]
    assert [m.content for m in store.messages(page.conversation_id) if m.role == "user"] == ["A new question"]


def test_while_another_chat_answers_the_page_says_why_it_cannot_send(qtbot, gated_bridge, gui_env, chat_model):
    """An answer streams in chat A and chat B is opened: Send's tooltip and Ctrl+Enter's notice
    name A (the message stays in the box), Stop's tooltip says it stops A's answer."""
    page, store = _page(qtbot, gated_bridge, gui_env)
    a = store.create_conversation("Chat A")
    b = store.create_conversation("Chat B")
    page._reload_list(select=a.id)
    page.open_conversation(a.id)
    with qtbot.waitSignal(gated_bridge.modelLoaded, timeout=TIMEOUT):
        gated_bridge.load(load_options(chat_model))
    with qtbot.waitSignal(page.answerFinished, timeout=TIMEOUT):
        page.send("Tell me a story")  # the answer arrives through the event loop: still going below
        page.open_conversation(b.id)
        assert not page.send_button.isEnabled() and "\u201cChat A\u201d" in page.send_button.toolTip()
        assert "\u201cChat A\u201d" in page.stop_button.toolTip()
        page.input.setPlainText("Meanwhile, in B")
        page.send()
        assert "\u201cChat A\u201d" in page.notice.text() and page.input.toPlainText() == "Meanwhile, in B"
    assert page.send_button.isEnabled() and page.send_button.toolTip() == "Send (Ctrl+Enter)"
    assert [m.content for m in store.messages(b.id)] == []


def test_a_failed_load_gives_a_waiting_message_back_in_the_chat_it_was_typed_in(qtbot, gated_bridge, gui_env,
                                                                              tiny_models):
    """Typed in chat A while the model loaded, then chat B opened and a draft begun there:
    the load is cancelled, and the message comes back in A's box (it came back in whichever
    chat was open, over the draft), the draft after it."""
    page, store = _page(qtbot, gated_bridge, gui_env)
    a = str(tiny_models["qwen2"])
    gated_bridge.gated.add(a)
    with qtbot.waitSignal(gated_bridge.modelLoading, timeout=TIMEOUT):
        gated_bridge.load(load_options(a))
    page.new_conversation()
    chat_a = page.conversation_id
    store.add_message(chat_a, "user", "an earlier message")  # (a chat with something in it stays)
    page.send("Hello there")
    assert page.input.toPlainText() == "" and "still loading" in page.notice.text()
    page.new_conversation()
    assert page.conversation_id != chat_a
    page.input.setPlainText("half a thought")
    with qtbot.waitSignal(gated_bridge.loadFailed, timeout=TIMEOUT):
        gated_bridge.cancel_load()
    assert page.conversation_id == chat_a
    assert page.input.toPlainText() == "Hello there\n\nhalf a thought"
    assert [m.content for m in store.messages(chat_a) if m.role == "user"] == ["an earlier message"]
