"""The whole app on the Performance page while answers stream, for a while (a soak run).

Run by tests/app/gui/test_perf_soak.py in a child process under Xvfb, so a crash of the
interpreter (the "none_dealloc" abort this guards against) fails the test instead of
killing pytest:

    python -m tests.app.gui.soak_app MODEL_DIR DATA_DIR SECONDS

It starts the app as `hearth` does (theme, binding guard, GUI-thread GC, MainWindow),
loads MODEL_DIR on the CPU, opens the Performance page with Ctrl+3, and keeps sending
chat messages for SECONDS while the page redraws; every few seconds it flips to the
Chat page and back, as a user watching both would. Prints one JSON line of counts last.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(model: str, data: str, seconds: float) -> int:
    os.environ["HEARTH_DATA_DIR"] = data
    from PySide6.QtCore import QSettings, Qt, QTimer
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication

    from app.gui import binding_guard
    from app.gui.app import apply_system_theme
    from app.gui.gc_guard import GuiThreadGC
    from app.gui.main_window import MainWindow

    app = QApplication(sys.argv[:1])
    binding_guard.install()
    apply_system_theme(app)
    gc_guard = GuiThreadGC(app)  # noqa: F841 (as in the app)
    settings = QSettings(os.path.join(data, "settings.ini"), QSettings.Format.IniFormat)
    for key, value in {"load/model": model, "load/device": "cpu", "load/attention": "torch",
                       "load/dtype": "float32", "load/max_model_len": 512,
                       "load/kv_cache_memory": "32MiB", "sampling/temperature": 0.9,
                       "sampling/max_tokens": 48}.items():
        settings.setValue(key, value)
    win = MainWindow(settings=settings)
    win.resize(1200, 780)
    win.show()

    counts = {"answers": 0, "errors": 0, "flips": 0, "draws": 0, "ticks": 0}
    started: dict[str, float] = {}
    prompts = ["Tell me a story about a lighthouse.", "List five fruits.",
               "Explain what a GPU does.", "Write a haiku about rain."]

    def on_answer(_rid, ev) -> None:
        counts["answers"] += 1
        counts["errors"] += ev.reason == "error"

    win.chat.answerFinished.connect(on_answer)
    failures: list[str] = []

    def on_load_failed(message: str) -> None:
        failures.append(message)
        app.quit()
    win.bridge.loadFailed.connect(on_load_failed)
    real_tick = win.perf.tick

    def tick() -> None:
        counts["ticks"] += 1
        real_tick()
    win.perf.timer.timeout.disconnect()
    win.perf.timer.timeout.connect(tick)

    def step() -> None:
        if win.bridge.model_info is None:
            return
        if "soak" not in started:
            started["soak"] = time.monotonic()
            win.activateWindow()
            QTest.keyClick(win, Qt.Key.Key_3, Qt.KeyboardModifier.ControlModifier)  # Performance
            counts["opened_with_ctrl_3"] = win.stack.currentWidget() is win.perf
            win.show_page("Performance")  # without a window manager the key may go nowhere
        elapsed = time.monotonic() - started["soak"]
        if elapsed >= seconds and not win.chat.is_answering:
            app.quit()
            return
        if not win.chat.is_answering and elapsed < seconds:
            win.chat.send(prompts[counts["answers"] % len(prompts)])
        if int(elapsed) % 15 == 14 and started.get("flip", -1) != int(elapsed):
            started["flip"] = int(elapsed)  # a look at the chat, then back to the charts
            win.show_page("Chat")
            QTimer.singleShot(400, lambda: win.show_page("Performance"))
            counts["flips"] += 1

    driver = QTimer()
    driver.timeout.connect(step)
    driver.start(100)
    QTimer.singleShot(int((seconds + 180) * 1000), app.quit)  # a load that never finishes
    app.exec()
    if failures:
        print(f"loading {model} failed: {failures[0]}", file=sys.stderr, flush=True)
        return 3
    counts["draws"] = win.perf.draw_count
    counts["soak_s"] = round(time.monotonic() - started.get("soak", time.monotonic()), 1)
    counts["performance_page_shown"] = win.stack.currentWidget() is win.perf
    win.close()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
