"""Walk through every page of the real app in a real window and save PNGs.

Run under a virtual X server (packaging/screenshots.sh does the set-up):

    xvfb-run -s "-screen 0 1400x900x24" .venv/bin/python packaging/screenshots.py OUT_DIR

It loads the model (default: the bundled SmolLM2), sends a chat message and waits for the
streamed answer, opens the load dialog, the Models page (library), and the Performance
panel after the answer, runs a short comparison on the Compare page (bf16, int8, int4 of
the same model: four bundled prompts, 64 tokens each, perplexity over 1,024 tokens),
starts the Server page's OpenAI-compatible server and sends it a few requests (the live
log), saving one PNG per step (the whole screen, so window decorations and dialogs are in the
picture). Data and settings go to a temporary folder. ``--quick`` leaves the comparison
out (minutes on a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PySide6.QtCore import Qt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt", default="Write a Python function that adds two numbers.")
    ap.add_argument("--quick", action="store_true", help="leave the comparison out (minutes on a CPU)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hearth-shots-"))
    os.environ["HEARTH_DATA_DIR"] = str(tmp / "data")

    from PySide6.QtCore import QEventLoop, QSettings, QTimer
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
    compare = None if args.quick else run_comparison(win, wait)
    if compare is not None:
        shot("09-compare")
        compare.results_tabs.setCurrentIndex(1)
        shot("10-compare-charts")
    serve_a_few_requests(win, wait)
    shot("13-server")
    about = win.show_about()
    wait(lambda: about.engine_checked)
    shot("15-about")
    about.close()
    # The same window in the dark palette (what a dark system scheme switches to).
    app.styleHints().colorSchemeChanged.emit(Qt.ColorScheme.Dark)
    win.show_page("Chat")
    shot("07-chat-dark")
    win.show_page("Performance")
    shot("08-performance-dark")
    if compare is not None:
        win.show_page("Compare")
        compare.results_tabs.setCurrentIndex(0)
        shot("11-compare-dark")
        compare.results_tabs.setCurrentIndex(1)
        shot("12-compare-charts-dark")
    win.show_page("Server")
    shot("14-server-dark")
    about = win.show_about()
    wait(lambda: about.engine_checked)
    shot("16-about-dark")
    about.close()
    win.close()
    return 0


def serve_a_few_requests(win, wait) -> None:
    """Start the Server page's server (port 8000, or a free one when that is taken) and
    send it what a client would: the model list, a chat completion, a stream, and one for a
    model that is not loaded (a 404), so the log shows both kinds of line."""
    import json
    import socket
    import urllib.error
    import urllib.request

    panel = win.server_panel
    win.show_page("Server")
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8000))
            port = 8000
        except OSError:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    panel.port.setValue(port)
    panel.api_key.setText("sk-hearth-screenshot-key-0123456789")
    panel.origins.setText("http://localhost:3000")
    if not panel.start():
        raise SystemExit(f"the server did not start: {panel.error.text()}")
    base, name = win.server.url, win.bridge.model_info.name
    headers = {"Authorization": "Bearer sk-hearth-screenshot-key-0123456789"}
    done = threading.Event()

    def call(path: str, body: dict | None = None) -> None:
        """One request, its whole answer read (the standard library: the app's install has
        no HTTP client of its own); an error status is what some of them are for."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data, headers={**headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
        except urllib.error.HTTPError as e:
            e.read()

    def client() -> None:
        try:
            call("/models")
            chat = {"model": name, "max_tokens": 24, "temperature": 0,
                    "messages": [{"role": "user", "content": "Say hello in French."}]}
            call("/chat/completions", chat)
            call("/chat/completions", dict(chat, stream=True))
            call("/completions", {"model": "gpt-4o", "prompt": "Hi", "max_tokens": 4})
        finally:
            done.set()
    threading.Thread(target=client, daemon=True).start()
    wait(done.is_set)
    wait(lambda: panel.log.rowCount() >= 4, 10)


def run_comparison(win, wait):
    """A short comparison of the loaded model on the Compare page (the chat's model unloaded
    for it, as the page's question suggests, and loaded again after), left showing the
    prompt whose answers depart most from the reference's."""
    from app.gui.compare_page import UNLOAD
    from app.services.compare_metrics import divergent_spans
    from app.services.compare_plan import CompareConfig

    page = win.compare
    win.show_page("Compare")
    setup = page.setup
    setup.set_model(win.bridge.model_info.ref)
    setup.configs.set_configs([CompareConfig("bf16"), CompareConfig("int8"), CompareConfig("int4")])
    setup.sources["bundled"].setChecked(True)
    for i in range(setup.bundled.count()):  # the long-context recall prompt: minutes on a CPU
        item = setup.bundled.item(i)
        item.setCheckState(Qt.CheckState.Unchecked if i == setup.bundled.count() - 1 else Qt.CheckState.Checked)
    setup.max_tokens.setValue(64)
    setup.eval_tokens.setValue(1024)
    page.ask_unload = lambda _name: UNLOAD
    if not page.run():
        raise SystemExit(f"the comparison did not start: {setup.problem or page.message.text()}")
    wait(lambda: not page.running, 900)
    wait(lambda: win.bridge.model_info is not None)  # the chat's model, back
    result = page.result
    ref = result.reference

    def departures(p: int) -> int:
        return sum(len(divergent_spans(ref.prompts[p].text, r.prompts[p].text))
                   for r in result.results if r.ok and r is not ref and p < len(r.prompts))
    if ref is not None:
        page.columns.tabs.setCurrentIndex(max(range(len(result.plan.prompts)), key=departures))
    return page


if __name__ == "__main__":
    sys.exit(main())
