"""Walk through every page of the real app in a real window and save PNGs.

Run under a virtual X server (packaging/screenshots.sh does the set-up):

    xvfb-run -s "-screen 0 1400x900x24" .venv/bin/python packaging/screenshots.py OUT_DIR

It loads the model (default: the bundled SmolLM2), sends a chat message and waits for the
streamed answer, opens the load dialog, the Models page (library), and the Performance
panel after the answer, saving one PNG per step (the whole screen, so window decorations
and dialogs are in the picture). Data and settings go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt", default="Write a Python function that adds two numbers.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hearth-shots-"))
    os.environ["HEARTH_DATA_DIR"] = str(tmp / "data")

    from PySide6.QtCore import QEventLoop, QSettings, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from app.gui.app import apply_system_theme
    from app.gui.load_dialog import LoadDialog
    from app.gui.main_window import MainWindow

    app = QApplication(sys.argv[:1])
    from app.gui import binding_guard

    binding_guard.install()
    apply_system_theme(app)
    from app.gui.gc_guard import GuiThreadGC

    GuiThreadGC(app)
    settings = QSettings(str(tmp / "settings.ini"), QSettings.Format.IniFormat)
    settings.setValue("load/model", args.model)
    settings.setValue("load/attention", "torch")
    settings.setValue("load/max_model_len", 2048)
    settings.setValue("sampling/temperature", 0.0)
    settings.setValue("sampling/max_tokens", 120)
    win = MainWindow(settings=settings)
    win.resize(1360, 860)
    win.show()

    def wait(cond, timeout_s=180.0) -> None:
        end = time.time() + timeout_s
        loop = QEventLoop()
        while not cond() and time.time() < end:
            QTimer.singleShot(50, loop.quit)
            loop.exec()
        if not cond():
            raise SystemExit(f"timed out waiting ({timeout_s:.0f} s)")

    def pause(ms: int) -> None:
        loop = QEventLoop()
        QTimer.singleShot(ms, loop.quit)
        loop.exec()

    def shot(name: str, widget=None) -> None:
        pause(300)
        screen = app.primaryScreen()
        pix = screen.grabWindow(0) if widget is None else widget.grab()
        path = args.out / f"{name}.png"
        pix.save(str(path))
        print(f"saved {path} ({pix.width()}x{pix.height()})")

    shot("01-start-loading")
    wait(lambda: win.bridge.model_info is not None)
    shot("02-chat-ready")
    win.chat.input.setPlainText(args.prompt)
    win.chat.send()
    wait(lambda: not win.chat.is_answering)
    shot("03-chat-answer")
    win.show_page("Models")
    shot("04-models")
    dialog = LoadDialog(args.model, settings, win)
    dialog.show()
    shot("05-load-dialog")
    dialog.reject()
    # The Performance page while an answer streams (what used to crash the app).
    win.show_page("Chat")
    win.chat.params.max_tokens.setValue(400)
    win.chat.input.setPlainText("Tell me a long story about a lighthouse keeper.")
    win.chat.send()
    win.show_page("Performance")
    pause(2500)  # several ticks of live data
    if not win.chat.is_answering:
        print("note: the answer ended before the Performance shot")
    shot("06-performance-mid-answer")
    wait(lambda: not win.chat.is_answering)
    # The same window in the dark palette (what a dark system scheme switches to).
    app.styleHints().colorSchemeChanged.emit(Qt.ColorScheme.Dark)
    win.show_page("Chat")
    shot("07-chat-dark")
    win.show_page("Performance")
    shot("08-performance-dark")
    win.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
