"""Help > About Hearth: the installed version, the real data folders, the engine's backends
as doctor_info reports them, and a copy button that copies all of it. (One test: the
engine check behind it takes seconds.)"""

from __future__ import annotations

import importlib.metadata

import pytest

from PySide6.QtWidgets import QApplication

from app.services.chat_store import ChatStore
from engine.api import doctor_info


def _open_about(qtbot, gui_env, bridge, monkeypatch):
    from app.gui.main_window import MainWindow

    monkeypatch.setenv("HEARTH_CACHE_DIR", str(gui_env["tmp"] / "hearth-cache"))
    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"),
                     settings=gui_env["settings"], autoload=False)
    qtbot.addWidget(win)
    help_menu = next(a.menu() for a in win.menuBar().actions() if a.text() == "&Help")
    about = next(a for a in help_menu.actions() if a.text() == "&About Hearth")
    about.trigger()
    dialog = win.about_dialog
    assert dialog is not None and dialog.isVisible()
    qtbot.waitUntil(lambda: dialog.engine_checked, timeout=60_000)
    return win, dialog


@pytest.mark.slow
def test_about_shows_the_version_the_data_folders_and_the_backends_and_copies_them(qtbot, gui_env, bridge, monkeypatch):
    win, dialog = _open_about(qtbot, gui_env, bridge, monkeypatch)
    assert dialog.engine_problem is None
    installed = importlib.metadata.version("hearth")
    assert dialog.version_label.text() == f"Version {installed}"

    shown = dialog.details.toPlainText()
    assert str(gui_env["data"] / "chats.sqlite3") in shown  # the window's own chat database
    assert str(gui_env["data"]) in shown
    assert str(gui_env["tmp"] / "hearth-cache") in shown  # HEARTH_CACHE_DIR, read now
    assert gui_env["settings"].fileName() in shown
    assert "Logs" in shown
    # Every attention backend and quantization method doctor_info knows, with its status.
    info = doctor_info()
    words = " ".join(shown.split())  # table cells come out one a line
    for name, reasons in {**info["attention"], **info["quantization"]}.items():
        status = "ok" if not reasons else f"unavailable: {reasons[0]}"
        assert f"{name} {' '.join(status.split())}" in words, name
    assert any(not r for r in info["attention"].values())  # something runs here: "ok" was checked
    assert info["cpu"]["name"] in shown and f"torch {info['versions']['torch']}" in words
    assert f"cpu kernel {' '.join(info['cpu_kernel']['summary'].split())}" in words  # (for a slow CPU load)

    # The same dialog comes back while open, not a second one.
    assert win.show_about() is dialog

    # "Copy details": the whole report as text, for a bug report.
    QApplication.clipboard().setText("")
    dialog.copy_button.click()
    copied = QApplication.clipboard().text()
    assert copied.startswith(f"Hearth {installed}\n")
    assert f"Chat history: {gui_env['data'] / 'chats.sqlite3'}" in copied
    assert "Attention backends (on cpu)" in copied and "  torch: ok" in copied
    assert dialog.copy_button.text() == "Copied"
