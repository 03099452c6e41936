"""Keyboard and layout of the chat page: focus stays in the message box, Esc stops an
answer wherever focus is, Tab reaches every control, and a 640x480 window stays usable."""

from __future__ import annotations

from PySide6.QtCore import QPoint, QRect, Qt
from PySide6.QtWidgets import QApplication, QWidget

from app.gui.chat_page import ChatPage
from app.services.chat_store import ChatStore
from tests.app.gui.conftest import load_options

LOAD_TIMEOUT = 60_000
ANSWER_TIMEOUT = 60_000


def _load(qtbot, bridge, model):
    with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT):
        bridge.load(load_options(model))


def _page(qtbot, bridge, gui_env, max_tokens=12, store=None):
    store = store or ChatStore(gui_env["data"] / "chats.sqlite3")
    page = ChatPage(bridge, store, gui_env["settings"])
    qtbot.addWidget(page)
    page.params.temperature.setValue(0.0)
    page.params.max_tokens.setValue(max_tokens)
    page.resize(1000, 700)
    page.show()
    page.activateWindow()
    qtbot.waitUntil(page.isActiveWindow)
    return page, store


def _streaming(page) -> bool:
    return page._active is not None and len(page._active["text"]) > 0


def _slow_steps(bridge, seconds: float = 0.03) -> None:
    """Make each engine step of the loaded model take a while, so an answer is still
    streaming when the test stops it (the tiny model writes its whole answer in well under
    a second, which a busy machine can spend between two lines of a test)."""
    import time

    engine = bridge.host.engine
    real_step = engine.step
    engine.step = lambda: (time.sleep(seconds), real_step())[1]


def test_focus_returns_to_the_message_box_after_send_and_stop(qtbot, bridge, gui_env, chat_model):
    _load(qtbot, bridge, chat_model)
    _slow_steps(bridge)
    page, _ = _page(qtbot, bridge, gui_env, max_tokens=400)
    page.input.setPlainText("Tell me a long story")
    qtbot.mouseClick(page.send_button, Qt.MouseButton.LeftButton)
    assert page.input.hasFocus()
    qtbot.waitUntil(lambda: _streaming(page), timeout=ANSWER_TIMEOUT)
    with qtbot.waitSignal(page.answerFinished, timeout=ANSWER_TIMEOUT) as finished:
        qtbot.mouseClick(page.stop_button, Qt.MouseButton.LeftButton)
    assert finished.args[1].reason == "abort"
    assert page.input.hasFocus() and not page.params.system_prompt.hasFocus()


def _window(qtbot, bridge, gui_env):
    from app.gui.main_window import MainWindow

    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    window = MainWindow(bridge=bridge, store=store, settings=gui_env["settings"], autoload=False)
    qtbot.addWidget(window)
    return window


def test_esc_stops_after_regenerate_and_from_anywhere_in_the_page(qtbot, bridge, gui_env, chat_model):
    _load(qtbot, bridge, chat_model)
    _slow_steps(bridge)
    window = _window(qtbot, bridge, gui_env)  # in the window, focus can leave the page
    window.show()
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow)
    page = window.chat
    page.params.temperature.setValue(0.0)
    page.params.max_tokens.setValue(3)
    page.input.setPlainText("One")
    with qtbot.waitSignal(page.answerFinished, timeout=ANSWER_TIMEOUT):
        page.send()
    page.params.max_tokens.setValue(400)
    # Clicking Regenerate rebuilds the transcript, deleting the button that had focus (it
    # used to fall to the navigation list, outside the page, where Esc did nothing).
    qtbot.mouseClick(page.message_widgets()[-1].regen_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: _streaming(page), timeout=ANSWER_TIMEOUT)
    with qtbot.waitSignal(page.answerFinished, timeout=ANSWER_TIMEOUT) as finished:
        qtbot.keyClick(QApplication.focusWidget() or page, Qt.Key.Key_Escape)
    assert finished.args[1].reason == "abort"
    assert page.input.hasFocus()
    # Esc from the system prompt (focus elsewhere in the page) stops too.
    page.input.setPlainText("Another")
    page.send()
    qtbot.waitUntil(lambda: _streaming(page), timeout=ANSWER_TIMEOUT)
    page.params.system_prompt.setFocus()
    with qtbot.waitSignal(page.answerFinished, timeout=ANSWER_TIMEOUT) as finished:
        qtbot.keyClick(page.params.system_prompt, Qt.Key.Key_Escape)
    assert finished.args[1].reason == "abort"


def test_tab_moves_on_and_ctrl_tab_types_a_tab(qtbot, bridge, gui_env):
    page, _ = _page(qtbot, bridge, gui_env)
    page.input.setFocus()
    qtbot.keyClick(page.input, Qt.Key.Key_Tab)
    assert page.input.toPlainText() == "" and not page.input.hasFocus()
    page.input.setFocus()
    qtbot.keyClick(page.input, Qt.Key.Key_Tab, Qt.KeyboardModifier.ControlModifier)
    assert page.input.toPlainText() == "\t" and page.input.hasFocus()


def _focus_owner(widget: QWidget) -> QWidget:
    while widget.focusProxy() is not None:
        widget = widget.focusProxy()
    return widget


def test_every_control_is_reachable_with_tab(qtbot, bridge, gui_env):
    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    conv = store.create_conversation()
    store.add_message(conv.id, "user", "Show me code")
    store.add_message(conv.id, "assistant", "Here:\n\n```python\nprint(1)\n```\n")
    gui_env["settings"].setValue("chat/last_conversation", conv.id)
    page, _ = _page(qtbot, bridge, gui_env, store=store)
    page.input.setPlainText("typed")
    expected = {_focus_owner(w) for w in page.findChildren(QWidget)
                if w.isVisible() and w.isEnabled() and w.focusPolicy() & Qt.FocusPolicy.TabFocus}
    page.input.setFocus()
    seen = []
    for _ in range(200):
        qtbot.keyClick(QApplication.focusWidget(), Qt.Key.Key_Tab)
        seen.append(QApplication.focusWidget())
        if seen[-1] is page.input:
            break
    assert seen[-1] is page.input, "Tab never came back to the message box"
    missing = {w.objectName() or type(w).__name__ for w in expected - set(seen)}
    assert not missing
    answer = page.message_widgets()[-1]
    assert {answer.copy_button, answer.body, page.send_button,
            page.params.system_prompt, page.params_button, page.conversation_list} <= set(seen)
    # The messages come right before the message box: Shift+Tab from it reaches the answer.
    assert seen[-2] is answer.body
    assert page.input.toPlainText() == "typed"  # Tab never typed into it


def test_parameters_panel_hides_and_the_choice_is_remembered(qtbot, bridge, gui_env):
    page, store = _page(qtbot, bridge, gui_env)
    assert page.params_visible() and page.params.isVisible()
    qtbot.mouseClick(page.params_button, Qt.MouseButton.LeftButton)
    assert not page.params_visible() and not page.params.isVisible()
    assert not page.params_action.isChecked()  # a View menu entry shows the same state
    again = ChatPage(bridge, store, gui_env["settings"])
    qtbot.addWidget(again)
    again.show()
    assert not again.params_visible() and not again.params.isVisible()
    again.params_action.trigger()
    assert again.params.isVisible()


def _inside(widget, viewport) -> bool:
    top_left = widget.mapTo(viewport, QPoint(0, 0))
    return viewport.rect().contains(QRect(top_left, widget.size()))


def test_a_640x480_window_keeps_the_transcript_usable(qtbot, bridge, gui_env):
    store = ChatStore(gui_env["data"] / "chats.sqlite3")
    conv = store.create_conversation()
    store.add_message(conv.id, "user", "Show me code")
    store.add_message(conv.id, "assistant", "Here:\n\n```python\nprint('a fairly long line of code')\n```\n",
                      meta={"model": "SmolLM2-135M-Instruct", "tokens": 20, "finish": "length"})
    gui_env["settings"].setValue("chat/last_conversation", conv.id)
    window = _window(qtbot, bridge, gui_env)
    window.resize(640, 480)
    window.show()
    qtbot.waitExposed(window)
    page = window.chat
    viewport = page.scroll.viewport()
    # The parameters panel steps aside by itself; the user's choice is kept for wide windows.
    qtbot.waitUntil(lambda: not page.params.isVisible())
    assert gui_env["settings"].value("chat/params_visible") == "true"
    assert (window.width(), window.height()) == (640, 480)  # no page forces it bigger
    assert window.minimumSizeHint().height() <= 480
    assert viewport.width() >= 360
    assert page.scroll.horizontalScrollBar().maximum() == 0
    answer = page.message_widgets()[-1]
    assert _inside(answer.copy_button, viewport) and _inside(answer.regen_button, viewport)
    assert page.params_action in window.menuBar().actions()[1].menu().actions()  # View menu
    # Shown by hand while narrow, it fits too: the page never outgrows the window.
    qtbot.mouseClick(page.params_button, Qt.MouseButton.LeftButton)
    assert page.params.isVisible() and page.minimumSizeHint().width() <= page.width()
    assert window.width() == 640 and viewport.width() >= 220
    page.set_params_visible(False)
    window.resize(1200, 780)
    assert not page.params.isVisible()  # hidden by the user: stays hidden
    page.set_params_visible(True)
    window.resize(640, 480)
    qtbot.waitUntil(lambda: not page.params.isVisible())
    window.resize(1200, 780)
    qtbot.waitUntil(page.params.isVisible)  # back once there is room
    qtbot.waitUntil(lambda: page.splitter.sizes()[0] >= 200)  # and the list gets its width back
    # Narrowed, then widened again while another page shows: back when the chat shows again.
    window.resize(640, 480)
    qtbot.waitUntil(lambda: not page.params.isVisible())
    window.show_page("Models")
    window.resize(1200, 780)
    qtbot.wait(50)
    window.show_page("Chat")
    qtbot.waitUntil(page.params.isVisible)
