"""The main window: start-up state, object names, status bar, load dialog, errors."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import QApplication, QWidget

from app.gui.load_dialog import LoadDialog, save_load_options
from app.services.chat_store import ChatStore
from engine.api import Choice
from tests.app.gui.conftest import load_options

OBJECT_NAMES = ("chatInput", "sendButton", "stopButton", "modelSearch", "downloadButton",
                "loadButton", "perfPanel", "serverToggle")


def _window(qtbot, gui_env, bridge, model):
    from app.gui.main_window import MainWindow

    s = gui_env["settings"]
    for key, value in load_options(model).items():
        s.setValue(f"load/{key}", value if value is not None else "")
    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"), settings=s)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    return win


def test_start_up_shows_chat_loading_the_last_model_with_input_focused(qtbot, gui_env, bridge, chat_model):
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000) as blocker:
        win = _window(qtbot, gui_env, bridge, chat_model)
        assert "Hearth" in win.windowTitle()
        assert win.stack.currentWidget() is win.chat
        win.activateWindow()
        qtbot.waitUntil(lambda: QApplication.focusWidget() is win.chat.input, timeout=5000)
    info = blocker.args[0]
    assert info.path == chat_model and info.attention == "torch"
    # the load choices are listed in the background once that first load has ended
    qtbot.waitUntil(lambda: win.choices_warmed is not None, timeout=5000)
    for name in OBJECT_NAMES:
        assert win.findChild(QWidget, name) is not None, f"no widget named {name!r}"
    assert win.perf.objectName() == "perfPanel"
    assert "tiny-llama-tied" in win.status_model.text()
    assert "torch" in win.status_backend.text() and "cpu" in win.status_device.text()
    assert win.server_toggle.text().startswith("Server")
    # The chat works from the window too.
    win.chat.params.temperature.setValue(0.0)
    win.chat.params.max_tokens.setValue(4)
    win.chat.input.setPlainText("hi")
    with qtbot.waitSignal(win.chat.answerFinished, timeout=60_000) as done:
        qtbot.keyClick(win.chat.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert done.args[1].usage.completion_tokens == 4


def test_a_failed_load_is_explained_and_another_model_loads(qtbot, gui_env, bridge, chat_model, tmp_path):
    with qtbot.waitSignal(bridge.loadFailed, timeout=60_000) as failed:
        win = _window(qtbot, gui_env, bridge, str(tmp_path / "missing-model"))
    assert "missing-model" in failed.args[0]
    assert "Loading failed" in win.statusBar().currentMessage()
    assert win.status_model.text() == "No model"
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
        win.load(load_options(chat_model))
    assert "tiny-llama-tied" in win.status_model.text()


def test_load_dialog_greys_out_what_cannot_run_here(qtbot, gui_env):
    def c(kind, name, *reasons):
        return Choice(kind, name, name, reasons=reasons)

    choices = {
        "device": (c("device", "auto"), c("device", "cpu")),
        "attention": (c("attention", "torch"), c("attention", "triton", "needs a CUDA GPU"),
                      c("attention", "flash-attn", "not installed")),
        "quantization": (c("quantization", "none"), c("quantization", "int4", "not implemented yet")),
        "dtype": (c("dtype", "auto"), c("dtype", "float32")),
        "kv_cache_dtype": (c("kv_cache_dtype", "auto"), c("kv_cache_dtype", "fp8")),
    }
    gui_env["settings"].setValue("load/attention", "triton")  # saved on a GPU machine
    dlg = LoadDialog("some/model", gui_env["settings"], choices=choices)
    qtbot.addWidget(dlg)
    model = dlg.attention.model()
    enabled = {dlg.attention.itemData(i): model.item(i).isEnabled() for i in range(dlg.attention.count())}
    assert enabled == {"torch": True, "triton": False, "flash-attn": False}
    assert model.item(dlg.attention.findData("triton")).toolTip() == "needs a CUDA GPU"
    assert dlg.attention.currentData() == "torch"  # the saved/default choice falls back to a usable one
    assert "triton: needs a CUDA GPU" in dlg.reasons.text()
    assert not dlg.quantization.model().item(dlg.quantization.findData("int4")).isEnabled()
    dlg.context.setValue(1024)
    dlg.kv_memory.setText("lots")
    dlg._accept()
    assert dlg.result() == 0 and "lots" in dlg.error.text()  # a bad size is explained, not accepted
    dlg.kv_memory.setText("2GiB")
    assert dlg.kv_dtype.currentData() == "auto"
    dlg.kv_dtype.setCurrentIndex(dlg.kv_dtype.findData("fp8"))
    dlg._accept()
    save_load_options(gui_env["settings"], dlg.options())  # as the window does once it loaded
    opts = dlg.options()
    assert opts["model"] == "some/model" and opts["max_model_len"] == 1024
    assert opts["kv_cache_memory"] == "2GiB" and opts["attention"] == "torch"
    assert opts["kv_cache_dtype"] == "fp8"
    assert gui_env["settings"].value("load/kv_cache_memory") == "2GiB"
    assert gui_env["settings"].value("load/kv_cache_dtype") == "fp8"


def test_theme_follows_the_system_colour_scheme(qtbot):
    """The palette switches when the system scheme changes (signal emitted as the platform
    would; the offscreen platform has no scheme of its own)."""
    from PySide6.QtGui import QGuiApplication, QPalette

    from app.gui.app import apply_system_theme

    app = QApplication.instance()
    hints = QGuiApplication.styleHints()
    before = app.palette()
    try:
        apply_system_theme(app)
        hints.colorSchemeChanged.emit(Qt.ColorScheme.Dark)
        assert app.palette().color(QPalette.ColorRole.Window).lightness() < 80
        assert app.palette().color(QPalette.ColorRole.Text).lightness() > 180
        hints.colorSchemeChanged.emit(Qt.ColorScheme.Light)
        assert app.palette().color(QPalette.ColorRole.Window).lightness() > 180
    finally:
        app.setPalette(before)


def _bare_window(qtbot, gui_env, bridge):
    """A window that loads nothing at start."""
    from app.gui.main_window import MainWindow

    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"),
                     settings=gui_env["settings"], autoload=False)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    return win


def _linked_copy(src, dest, skip=()):
    """``dest``: a folder of links to ``src``'s files (a model copy that costs nothing)."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            (dest / f.name).symlink_to(f)
    return dest


def test_library_models_show_their_repo_id_and_long_names_never_widen_the_window(
        qtbot, gui_env, bridge, chat_model):
    """Item 1: a Hub cache snapshot (as the Library loads it) is named by its repo id, not
    its commit hash; a very long name is elided in the status bar, whole in its tooltip,
    and the window keeps its width."""
    from pathlib import Path

    win = _bare_window(qtbot, gui_env, bridge)
    assert win.width() == 1200
    deep = gui_env["tmp"] / ("a-rather-long-folder-name-" * 6) / "huggingface" / "hub"
    commit = ("f374231cc2e0" * 4)[:40]
    snapshot = _linked_copy(Path(chat_model), deep / "models--acme--tiny-chat" / "snapshots" / commit)
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000) as loaded:
        win.load(load_options(str(snapshot)))
    assert loaded.args[0].name == "acme/tiny-chat" and loaded.args[0].path == str(snapshot)
    assert win.status_model.text() == "acme/tiny-chat"
    assert win.chat.model_label.text().startswith("acme/tiny-chat ·")
    assert win.width() == 1200

    long_name = "tiny-chat-" + "with-a-name-nobody-would-type-" * 8
    folder = _linked_copy(Path(chat_model), gui_env["tmp"] / long_name)
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
        win.load(load_options(str(folder)))
    QApplication.processEvents()
    assert win.status_model.text() == long_name
    assert win.status_model.toolTip() == long_name  # shown elided, whole on hover
    assert win.width() == 1200


def test_only_a_load_that_succeeded_is_what_the_next_start_loads(qtbot, gui_env, bridge, chat_model):
    """A load that fails (or is cancelled) must not become the start-up model: the next start
    would open with no model, or begin a calibration nobody asked for."""
    from pathlib import Path

    from app.gui.load_dialog import saved_load_options

    settings = gui_env["settings"]
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
        win = _window(qtbot, gui_env, bridge, chat_model)
    broken = _linked_copy(Path(chat_model), gui_env["tmp"] / "no-tokenizer-2",
                          skip=("tokenizer.json", "tokenizer_config.json"))
    with qtbot.waitSignal(bridge.loadFailed, timeout=60_000):
        win.load({**load_options(str(broken)), "quantization": "int8"})
    assert saved_load_options(settings)["model"] == chat_model
    assert settings.value("load/quant") != "int8"
    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000) as loaded:
        win.load({**load_options(chat_model), "quantization": "int8"})
    assert saved_load_options(settings)["model"] == chat_model and settings.value("load/quant") == "int8"
    # a model that loads while the window waits for another (a load started elsewhere replaced
    # the window's, or arrived before it) is not saved as the one the window asked for
    win._loading_options = {**load_options(str(broken)), "quantization": "int4"}
    win._on_loaded(loaded.args[0])
    assert saved_load_options(settings)["model"] == chat_model and settings.value("load/quant") == "int8"


def test_a_failed_load_keeps_the_working_model_serving(qtbot, gui_env, bridge, chat_model):
    """Item 2: a repo without a tokenizer fails before the working model is given up; the
    status bar and the chat page keep showing it, and it still answers."""
    from pathlib import Path

    with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000) as loaded:
        win = _window(qtbot, gui_env, bridge, chat_model)
    working = loaded.args[0].name
    weights = win.status_device.text()
    broken = _linked_copy(Path(chat_model), gui_env["tmp"] / "no-tokenizer",
                          skip=("tokenizer.json", "tokenizer_config.json"))
    with qtbot.waitSignal(bridge.loadFailed, timeout=60_000) as failed:
        win.load(load_options(str(broken)))
    assert "tokenizer" in failed.args[0]
    assert bridge.model_info.name == working and not bridge.is_loading
    assert win.status_model.text() == working and win.status_device.text() == weights
    assert "Loading failed" in win.statusBar().currentMessage()
    assert f"still using {working}" in win.statusBar().currentMessage()
    assert win.chat.model_label.text().startswith(working)
    assert "Loading failed" in win.chat.notice.text()
    win.chat.params.temperature.setValue(0.0)
    win.chat.params.max_tokens.setValue(3)
    with qtbot.waitSignal(win.chat.answerFinished, timeout=60_000) as done:
        win.chat.send("Still there?")
    assert done.args[1].reason == "length" and done.args[1].usage.completion_tokens == 3


def test_a_failed_load_that_brought_the_old_model_back_says_so_in_the_status_bar(qtbot, gui_env):
    """Review 2 finding 6: the working model made room and was loaded again; "Model ready"
    must not replace the message that says what failed."""
    import threading

    from engine.api import OutOfMemoryError
    from tests.app.gui.test_bridge_loading import one_card_bridge

    bridge = one_card_bridge(set(), {"acme/huge": OutOfMemoryError("the weights need 80 GiB")}, threading.Event())
    try:
        with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000):
            win = _window(qtbot, gui_env, bridge, "acme/working")
        with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000) as back:
            win.load(load_options("acme/huge"))
        assert back.args[1] and win.status_model.text() == "acme/working"
        assert win.statusBar().currentMessage() == ("Loading acme/huge failed: the weights need 80 GiB. "
                                                    "acme/working was loaded again.")
        assert win.cancel_load_button.isHidden()
    finally:
        bridge.shutdown()


def test_the_server_toggle_explains_itself_on_hover(qtbot, gui_env, bridge):
    """Item 11: hovering says what it does, also while another window has the focus
    (under Xvfb without a window manager the main window is never "active", and Qt showed
    no tooltip at all there)."""
    from PySide6.QtCore import QPoint
    from PySide6.QtWidgets import QLabel, QToolTip

    from app.gui.main_window import SERVER_TIP

    win = _bare_window(qtbot, gui_env, bridge)
    other = QLabel("another window")
    qtbot.addWidget(other)
    other.show()
    other.activateWindow()
    qtbot.waitUntil(lambda: other.isActiveWindow(), timeout=5000)
    assert not win.isActiveWindow() and win.server_toggle.isEnabled()
    qtbot.mouseMove(win, QPoint(5, 5))
    qtbot.mouseMove(win.server_toggle, QPoint(4, 4))
    qtbot.mouseMove(win.server_toggle, QPoint(6, 6))
    qtbot.waitUntil(lambda: QToolTip.isVisible() and QToolTip.text() == SERVER_TIP, timeout=5000)
    QToolTip.hideText()


class _SpontaneousClose(QCloseEvent):
    """A close event as the window system sends it (Qt marks those spontaneous; a close()
    from code, e.g. a test's teardown, is not, and never asks)."""

    def spontaneous(self) -> bool:
        return True


def test_quitting_asks_while_an_answer_streams_or_downloads_run(qtbot, gui_env, bridge, monkeypatch):
    """Item 15: Ctrl+Q and the window's close button ask first; nothing running, no question."""
    from types import SimpleNamespace

    from app.gui.chat_page import ChatPage

    win = _bare_window(qtbot, gui_env, bridge)
    asked, answer = [], {"quit": False}
    win.confirm_quit = lambda message: asked.append(message) or answer["quit"]
    quit_action = next(a for a in win.menuBar().actions()[0].menu().actions() if "Quit" in a.text())

    monkeypatch.setattr(ChatPage, "is_answering", property(lambda self: True))
    quit_action.trigger()
    assert win.isVisible() and "answer is still being written" in asked[-1]

    monkeypatch.setattr(ChatPage, "is_answering", property(lambda self: False))
    downloads = [SimpleNamespace(active=True), SimpleNamespace(active=True), SimpleNamespace(active=False)]
    monkeypatch.setattr(win.models.downloads, "list", lambda: downloads)
    close_button = _SpontaneousClose()  # what the title bar's close button sends
    win.closeEvent(close_button)
    assert not close_button.isAccepted() and "2 downloads are still running" in asked[-1]
    assert win.isVisible()

    answer["quit"] = True
    quit_action.trigger()
    assert not win.isVisible() and len(asked) == 3

    downloads.clear()
    asked.clear()
    win.show()
    quit_action.trigger()
    assert not win.isVisible() and asked == []


def test_view_menu_theme_applies_at_once_and_is_remembered(qtbot, gui_env, bridge):
    """Item 15: View > Theme > Dark changes the palette now and is saved as ui/theme; a new
    window starts with it."""
    from PySide6.QtGui import QPalette

    from app.gui.app import apply_theme
    from app.gui.main_window import MainWindow

    app = QApplication.instance()
    before = app.palette()
    try:
        win = _bare_window(qtbot, gui_env, bridge)
        assert win.theme_actions["system"].isChecked()
        win.theme_actions["dark"].trigger()
        assert app.palette().color(QPalette.ColorRole.Window).lightness() < 80
        assert gui_env["settings"].value("ui/theme") == "dark"
        assert win.theme_actions["dark"].isChecked() and not win.theme_actions["system"].isChecked()
        win.theme_actions["light"].trigger()
        assert app.palette().color(QPalette.ColorRole.Window).lightness() > 180
        win.theme_actions["dark"].trigger()
        app.setPalette(before)
        again = MainWindow(bridge=bridge, store=win.store, settings=gui_env["settings"], autoload=False)
        qtbot.addWidget(again)
        assert again.theme_actions["dark"].isChecked()
        assert app.palette().color(QPalette.ColorRole.Window).lightness() < 80
    finally:
        apply_theme(app, "system")  # follow the system again, as other tests expect
        app.setPalette(before)


def test_while_a_model_loads_the_status_bar_names_both_and_cancel_answers_at_once(
        qtbot, gui_env, chat_model, tiny_models):
    """Review finding 7: Cancel loading says so at once; the loaded model stays and says so."""
    import threading

    from app.gui.bridge import EngineBridge
    from engine.api import Engine

    gate, second = threading.Event(), str(tiny_models["qwen2"])

    def factory(model, progress=None, **kwargs):
        while model == second and not gate.wait(0.01):
            progress("waiting for the test")
        return Engine.load(model, progress=progress, **kwargs)

    bridge = EngineBridge(engine_factory=factory)
    try:
        with qtbot.waitSignal(bridge.modelLoaded, timeout=60_000) as loaded:
            win = _window(qtbot, gui_env, bridge, chat_model)
        working = loaded.args[0].name
        with qtbot.waitSignal(bridge.modelLoading, timeout=60_000) as loading:
            win.load(load_options(second))
        assert win.status_model.text() == f"{working} · loading {loading.args[0]}…"
        assert win.cancel_load_button.isVisible() and win.cancel_load_button.isEnabled()
        assert f"{loading.args[0]} is still loading" in win.unfinished_work()
        with qtbot.waitSignal(bridge.loadFailed, timeout=60_000):
            qtbot.mouseClick(win.cancel_load_button, Qt.MouseButton.LeftButton)
            assert win.status_progress.text() == "Cancelling…" and not win.cancel_load_button.isEnabled()
        message = win.statusBar().currentMessage()
        assert message.startswith("Loading cancelled") and f"still using {working}" in message
        assert win.status_model.text() == working and win.unfinished_work() is None
    finally:
        gate.set()
        bridge.shutdown()


def test_the_window_lists_the_load_choices_once_in_the_background(qtbot, gui_env, bridge, monkeypatch):
    """The first listing imports the checks' libraries (seconds for bitsandbytes): the
    window makes it on a thread of its own (here, with no load to wait for, as it opens),
    not when the dialog opens."""
    import threading

    import app.gui.main_window as mw
    from app.gui.main_window import MainWindow

    calls = []
    monkeypatch.setattr(mw, "machine_choices", lambda device: calls.append((device, threading.current_thread())))
    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"), settings=gui_env["settings"],
                     autoload=False)
    qtbot.addWidget(win)
    win.choices_warmed.join(10)
    assert calls == [("auto", win.choices_warmed)]


def test_a_message_sent_during_a_comparison_says_where_the_model_went(qtbot, gui_env, bridge, monkeypatch):
    """A comparison unloads the chat's model and loads its own: the chat said "No model is
    loaded: load one on the Models page", which would stop the comparison. It says why now."""
    from app.gui.compare_page import ComparePage
    from app.gui.main_window import MainWindow

    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"), settings=gui_env["settings"],
                     autoload=False)
    qtbot.addWidget(win)
    win.show()
    win.chat.send("Hello?")
    assert win.chat.notice.text().startswith("No model is loaded")
    monkeypatch.setattr(ComparePage, "running", property(lambda self: True))
    win.chat.send("Hello?")
    assert "A comparison is running on the Compare page" in win.chat.notice.text()
    assert "comes back when it ends" in win.chat.notice.text()


def test_a_long_status_message_is_elided_before_the_models_labels(qtbot, gui_env, bridge):
    """QStatusBar painted a long message up to the permanent labels and cut it mid-word there
    (it seemed to run into them), and hid Cancel loading meanwhile: the message now ends in
    "…" in its own label left of them, the whole text its tooltip, and the load's progress
    line comes back when it clears."""
    from app.gui.main_window import MainWindow
    from tests.app.model_info_fixtures import fake_info

    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"), settings=gui_env["settings"],
                     autoload=False)
    qtbot.addWidget(win)
    win.resize(1000, 700)
    win.show()
    qtbot.waitExposed(win)
    win._show_model(fake_info(device="cpu"))
    win.status_progress.setText("loading weights: layer 3 of 30")
    win.cancel_load_button.show()
    sb = win.statusBar()
    text = "Loading failed: " + "something long went wrong while reading the weights " * 4
    sb.showMessage(text, 1500)
    label = sb.message_label
    qtbot.waitUntil(label.isVisible)
    assert sb.currentMessage() == text and label.toolTip().startswith(text)
    first_permanent = min(w.mapTo(win, w.rect().topLeft()).x() for w in (win.status_quant, win.server_toggle))
    assert label.mapTo(win, label.rect().topRight()).x() < first_permanent
    assert not win.status_progress.isVisible() and win.cancel_load_button.isVisible()
    qtbot.waitUntil(lambda: sb.currentMessage() == "", timeout=8000)
    assert not label.isVisible() and win.status_progress.isVisible()


def test_the_performance_page_says_why_it_stays_empty_during_a_comparison(qtbot, gui_env, bridge, monkeypatch):
    """A comparison loads its own engines, which the Performance page doesn't chart: it
    showed "—" everywhere with the CPU at 100 % and no word why."""
    from app.gui.compare_page import ComparePage
    from app.gui.main_window import MainWindow

    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"), settings=gui_env["settings"],
                     autoload=False)
    qtbot.addWidget(win)
    win.show()
    win.show_page("Performance")
    running = [False]
    monkeypatch.setattr(ComparePage, "running", property(lambda self: running[0]))
    win.perf.tick()
    assert not win.perf.away_label.isVisible()
    running[0] = True
    win.perf.tick()
    assert win.perf.away_label.isVisible() and "comparison is running" in win.perf.away_label.text()
    running[0] = False
    win.perf.tick()
    assert not win.perf.away_label.isVisible()
