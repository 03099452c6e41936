"""The status bar's Server toggle and the Server page: the server runs in the app on the
window's own engine host (an HTTP answer and a chat answer at the same time, from the one
loaded model), its request log, a load in the app changes what /v1/models lists, the
toggle and closing the window close the port, and refused starts (port in use, the
network without a key) say why and leave the toggle off.

Signals emitted from the server's or the engine's threads are never waited on with
``qtbot.waitSignal`` (that crashed PySide): lists filled by slots, and ``waitUntil``."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from app.server.listen import free_port
from app.services.chat_store import ChatStore
from tests.app.gui.conftest import load_options
from tests.app.server.conftest import port_open

TIMEOUT_MS = 60_000


def _window(qtbot, gui_env, bridge, model=None):
    from app.gui.main_window import MainWindow

    s = gui_env["settings"]
    if model is not None:
        for key, value in load_options(model).items():
            s.setValue(f"load/{key}", value)
    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"), settings=s,
                     autoload=model is not None)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    return win


def _click_toggle(qtbot, win) -> None:
    qtbot.mouseClick(win.server_toggle, Qt.MouseButton.LeftButton)


def _slow_steps(bridge, seconds: float = 0.03) -> list[int]:
    """Each engine step takes a while, so the chat's answer is surely still being written
    while the HTTP request runs (the tiny model answers in well under a second). Returns
    the list of how many requests each step ran (read on the engine's thread)."""
    engine = bridge.host.engine
    real_step = engine.step
    batch: list[int] = []

    def step() -> None:
        time.sleep(seconds)
        real_step()
        batch.append(engine.scheduler.num_running)
    engine.step = step
    return batch


def test_the_toggle_serves_the_apps_model_while_the_chat_answers(qtbot, gui_env, bridge, chat_model, tiny_models):
    win = _window(qtbot, gui_env, bridge, chat_model)
    qtbot.waitUntil(lambda: bridge.model_info is not None, timeout=TIMEOUT_MS)
    port = free_port()
    win.server_panel.port.setValue(port)
    _click_toggle(qtbot, win)
    assert win.server.running and win.server_toggle.isChecked()
    assert win.server_toggle.text() == f"Server: on · :{port}"
    assert win.server_panel.url_label.text() == f"Base URL: http://127.0.0.1:{port}/v1"
    qtbot.mouseClick(win.server_panel.copy_url_button, Qt.MouseButton.LeftButton)
    assert QGuiApplication.clipboard().text() == f"http://127.0.0.1:{port}/v1"
    assert not win.server_panel.form_box.isEnabled()  # settings locked while it runs

    # A chat answer in the window, and meanwhile an HTTP request on the same engine.
    batch = _slow_steps(bridge)
    finished: list = []
    win.chat.answerFinished.connect(lambda rid, ev: finished.append(ev))
    win.chat.params.temperature.setValue(0.0)
    win.chat.params.max_tokens.setValue(200)
    win.chat.send("Tell me a long story")
    qtbot.waitUntil(lambda: bool(win.chat._active and win.chat._active["text"]), timeout=TIMEOUT_MS)
    answers: list = []

    def ask() -> None:
        try:
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=60) as client:
                answers.append(client.chat.completions.create(
                    model=bridge.model_info.name, max_tokens=4, temperature=0,
                    messages=[{"role": "user", "content": "Hello"}]))
        except Exception as e:  # said in the assertion below
            answers.append(e)
    threading.Thread(target=ask, daemon=True).start()
    qtbot.waitUntil(lambda: bool(answers), timeout=TIMEOUT_MS)
    reply = answers[0]
    assert not isinstance(reply, Exception), reply
    assert reply.usage.completion_tokens == 4 and reply.model == bridge.model_info.name
    assert win.chat.is_answering and not finished  # both ran at once, on one engine,
    assert max(batch) == 2  # in the same batch
    win.chat.stop()
    qtbot.waitUntil(lambda: bool(finished), timeout=TIMEOUT_MS)

    # The request log and the counts.
    log = win.server_panel.log
    qtbot.waitUntil(lambda: log.rowCount() >= 1, timeout=10_000)
    row = [log.item(0, c).text() for c in range(log.columnCount())]
    assert row[1:4] == ["POST", "/v1/chat/completions", "200"]
    assert row[4] == f"{reply.usage.prompt_tokens} → 4" and row[5].endswith(("ms", "s"))
    assert win.server_panel.counts_label.text() == "Requests: 1 · ok 1 · errors 0"

    # Loading another model in the app changes what the server serves.
    win.load(load_options(str(tiny_models["qwen2"])))
    qtbot.waitUntil(lambda: bridge.model_info is not None and "qwen2" in bridge.model_info.name,
                    timeout=TIMEOUT_MS)
    served = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in served] == [bridge.model_info.name]
    assert bridge.model_info.name in win.server_panel.model_label.text()

    # The toggle stops it and closes the port; closing the window does too.
    _click_toggle(qtbot, win)
    qtbot.waitUntil(lambda: win.server.state == "off", timeout=TIMEOUT_MS)
    assert not win.server_toggle.isChecked() and win.server_toggle.text() == "Server: off"
    assert not port_open(port) and win.server_panel.form_box.isEnabled()
    _click_toggle(qtbot, win)
    assert win.server.running and port_open(port)
    win.close()
    assert not port_open(port)


def test_refused_starts_say_why_and_leave_the_toggle_off(qtbot, gui_env, bridge):
    win = _window(qtbot, gui_env, bridge)
    panel = win.server_panel
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        panel.port.setValue(port)
        _click_toggle(qtbot, win)
        assert not win.server.running and not win.server_toggle.isChecked()
        assert win.server_toggle.text() == "Server: off"
        assert panel.error.isVisible() and f"{port}" in panel.error.text()
        error = panel.error.text()
        assert f"port {port} is already in use" in error and "choose another port" in error
        assert win.stack.currentWidget() is panel  # the toggle's failure shows the page that says why

    # Other machines need a key: refused without one, served with one.
    panel.port.setValue(free_port())
    assert panel.url_label.text() == f"Base URL when running: http://127.0.0.1:{panel.port.value()}/v1"
    panel.network.setChecked(True)
    panel.api_key.setText("")
    qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
    assert not win.server.running and not win.server_toggle.isChecked()
    assert "API key" in panel.error.text() and "Generate" in panel.error.text()
    qtbot.mouseClick(panel.generate_key, Qt.MouseButton.LeftButton)
    key = panel.api_key.text()
    assert key.startswith("sk-hearth-") and len(key) > 30
    assert panel.api_key.echoMode() == panel.api_key.EchoMode.Password  # hidden unless asked
    qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
    assert win.server.running and win.server.options.host == "0.0.0.0" and not panel.error.isVisible()
    url = f"http://127.0.0.1:{win.server.port}/v1/models"
    assert httpx.get(url, timeout=30).status_code == 401
    r = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200 and r.json()["data"] == []  # no model loaded
    qtbot.waitUntil(lambda: panel.log.rowCount() == 2, timeout=10_000)
    assert panel.counts_label.text() == "Requests: 2 · ok 1 · errors 1"
    assert panel.log.item(1, 3).text() == "401"  # newest first
    qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)  # now "Stop server"
    qtbot.waitUntil(lambda: win.server.state == "off", timeout=TIMEOUT_MS)

    # The choices are remembered.
    from app.gui.server_panel import ServerPanel

    again = ServerPanel(win.server, bridge, gui_env["settings"])
    qtbot.addWidget(again)
    assert (again.port.value(), again.api_key.text(), again.network.isChecked()) == (panel.port.value(), key, True)
    panel.origins.setText("http://localhost:3000")  # typed, never started: kept when the window closes
    win.close()
    assert gui_env["settings"].value("server/origins") == "http://localhost:3000"


def test_the_network_note_is_never_cut_the_page_scrolls_instead(qtbot, gui_env, bridge):
    """At the window's smallest the wrapped note under "Allow other machines on my network"
    needs four lines and the layout's minimum gave it one (cut, no scroll bar): the page now
    scrolls; at the default size it fits without scrolling."""
    win = _window(qtbot, gui_env, bridge)
    win.show_page("Server")
    panel = win.server_panel
    why = panel.network_why
    for size, scrolls in (((640, 413), True), ((1200, 780), False)):
        win.resize(*size)
        qtbot.waitUntil(lambda: win.width() == size[0])
        qtbot.wait(50)
        assert why.height() >= why.heightForWidth(why.width()) > 0, (size, why.height())
        assert (panel.scroll.verticalScrollBar().maximum() > 0) == scrolls, size
        assert panel.log.height() >= 60
