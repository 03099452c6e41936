"""The main window: start-up state, object names, status bar, load dialog, errors."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QWidget

from app.gui.load_dialog import LoadDialog
from app.services.chat_store import ChatStore
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
    assert info["path"] == chat_model and info["attention"] == "torch"
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
    choices = {
        "devices": [{"id": "auto", "label": "Automatic"}, {"id": "cpu", "label": "CPU"}],
        "attention": {"torch": [], "triton": ["needs a CUDA GPU"], "flash-attn": ["not installed"]},
        "quantization": {"none": [], "int4": ["not implemented yet"]},
        "dtypes": ["auto", "float32"],
        "kv_cache_dtypes": {"auto": [], "fp8": []},
    }
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
        hints.colorSchemeChanged.disconnect()
        app.setPalette(before)
