"""The main window: navigation (Chat, Models, Performance, Compare, Server), the status bar,
loading.

On start it shows the chat page with the input focused and starts loading the last used
model (the bundled default the first time), so a new user can type at once; a message
typed before the model is ready is sent when it is.

While another model loads, the loaded one keeps answering (the bridge swaps them when
the new one is ready); the status bar says both. Quitting while an answer is being
written, a model loads or a download runs asks first (``confirm_quit``, replaceable in
tests).

The load dialog lists every choice with the reason it can't run here; the first listing
imports the checks' libraries (bitsandbytes alone takes seconds), so the window makes it
once in the background (``warm_choices``: as it opens, or after the first load when it
starts one) and the dialog opens at once.

The status bar's "Server" toggle starts and stops the OpenAI-compatible server (the
Server page holds its settings and log) on the window's own engine host: HTTP clients and
the chat share the loaded model. Closing the window stops the server first.
"""

from __future__ import annotations

import threading

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import (QApplication, QHBoxLayout, QListWidget, QMainWindow, QMessageBox,
                               QPushButton, QStackedWidget, QToolButton, QWidget)

from app.gui.app import THEMES, apply_theme
from app.gui.bridge import LOAD_CANCELLED, EngineBridge
from app.gui.chat_page import ChatPage
from app.gui.default_model_offer import DefaultModelInstaller, ask_to_install, needs_default_model
from app.gui.elided_label import ElidedLabel
from app.gui.status_bar import StatusBar
from app.gui.load_dialog import LoadDialog, machine_choices, save_load_options, saved_load_options
from app.services.chat_store import ChatStore
from app.services.host_loading import load_failure_text

from engine.api import ModelInfo

PAGES = ("Chat", "Models", "Performance", "Compare", "Server")
SERVER_TIP = ("Start or stop the local OpenAI-compatible server on the loaded model (settings and the "
              "request log: the Server page)")
THEME_KEY = "ui/theme"


def warm_choices() -> threading.Thread:
    """List the load choices once on a background thread (the dialog's later listings are
    then quick: the imports and the bitsandbytes kernel checks are cached per process)."""

    def run() -> None:
        try:
            machine_choices("auto")
        except Exception:  # noqa: BLE001 - the dialog lists them again and shows what went wrong
            pass

    thread = threading.Thread(target=run, name="hearth-warm-choices", daemon=True)
    thread.start()
    return thread


def _gib(n) -> str:
    return f"{(n or 0) / 2**30:.2f} GiB"


class MainWindow(QMainWindow):
    def __init__(self, bridge: EngineBridge | None = None, store: ChatStore | None = None,
                 settings: QSettings | None = None, telemetry=None, autoload: bool = True) -> None:
        super().__init__()
        self.setWindowTitle("Hearth")
        self.setObjectName("mainWindow")
        self.settings = settings or QSettings("Hearth", "Hearth")
        self.bridge = bridge or EngineBridge(self)
        # open() never fails: a damaged, read-only or full chat history still opens (the
        # chat page's banner says how it stands), so the window always comes up.
        self.store = store or ChatStore.open()

        from app.gui.compare_page import ComparePage
        from app.gui.models_page import ModelsPage
        from app.gui.perf_panel import PerfPanel
        from app.gui.server_control import ServerController
        from app.gui.server_panel import ServerPanel

        self.chat = ChatPage(self.bridge, self.store, self.settings)
        self.models = ModelsPage(self.bridge)
        self.perf = PerfPanel(self.bridge, telemetry=telemetry, settings=self.settings)
        self.compare = ComparePage(self.bridge, self.settings)
        self.server = ServerController(getattr(self.bridge, "host", None), self)
        self.server_panel = ServerPanel(self.server, self.bridge, self.settings)
        self.chat.model_away = lambda: (
            "A comparison is running on the Compare page: it loads its own models, and the chat's comes "
            "back when it ends (or stop it there)." if self.compare.running else None)
        self.perf.away_note = lambda: (
            "A comparison is running on the Compare page: it loads its own models, which these charts don't follow, "
            "so TTFT, decode and KV cache stay empty here (its columns show them); memory and CPU include it."
            if self.compare.running else None)
        self.models.loadRequested.connect(self.ask_load)

        self.nav = QListWidget()
        self.nav.setObjectName("navigation")
        self.nav.addItems(PAGES)
        self.nav.setFixedWidth(130)
        self.stack = QStackedWidget()
        for page in (self.chat, self.models, self.perf, self.compare, self.server_panel):
            self.stack.addWidget(page)
        self.nav.currentRowChanged.connect(self.stack.setCurrentIndex)
        central = QWidget()
        lay = QHBoxLayout(central)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.nav)
        lay.addWidget(self.stack, 1)
        self.setCentralWidget(central)

        self._build_status_bar()
        self._build_menus()
        b = self.bridge
        b.modelLoading.connect(self._on_loading)
        b.loadProgress.connect(self._on_progress)
        b.modelLoaded.connect(self._on_loaded)
        b.loadFailed.connect(self._on_failed)
        b.modelUnloaded.connect(self._on_unloaded)
        b.engineError.connect(lambda msg: self.statusBar().showMessage(f"Engine error: {msg}", 15000))

        geometry = self.settings.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(1200, 780)
        self.show_page("Chat")
        self.chat.input.setFocus()
        # the load choices, listed once in the background: after the first load, whose
        # batch-1 tuner times kernels on the GPU (nothing else should run there meanwhile)
        self.choices_warmed: threading.Thread | None = None
        self.about_dialog = None  # Help > About Hearth, while open
        self.default_model_installer = None  # while the default model is being installed
        self._loading_options: dict | None = None  # what load() asked for, saved once it has loaded
        options = saved_load_options(self.settings) if autoload else None
        if options is not None and needs_default_model(options):
            # An installed Hearth's first start: offer the default model once the window shows.
            QTimer.singleShot(0, lambda: self.offer_default_model(options))
        elif options is not None:
            self.bridge.load(options)
        else:
            self._warm_choices()

    def _warm_choices(self) -> None:
        if self.choices_warmed is None:
            self.choices_warmed = warm_choices()

    # -- layout pieces -----------------------------------------------------------------
    def _build_status_bar(self) -> None:
        self.setStatusBar(StatusBar())  # messages elided beside the labels, not painted over them
        sb = self.statusBar()
        # Elided labels: a long model name or progress line must never widen the window.
        self.status_model = ElidedLabel("No model", max_hint=360)
        self.status_model.setObjectName("statusModel")
        self.status_quant = ElidedLabel("", max_hint=220)
        self.status_backend = ElidedLabel("", max_hint=160)
        self.status_device = ElidedLabel("", max_hint=320)
        self.status_progress = ElidedLabel("", mode=Qt.TextElideMode.ElideRight)
        self.status_progress.setObjectName("statusProgress")
        self.cancel_load_button = QPushButton("Cancel loading")
        self.cancel_load_button.setObjectName("cancelLoadButton")
        self.cancel_load_button.clicked.connect(self.cancel_loading)
        self.cancel_load_button.hide()
        self.server_toggle = QToolButton()
        self.server_toggle.setObjectName("serverToggle")
        self.server_toggle.setText("Server: off")
        self.server_toggle.setCheckable(True)
        self.server_toggle.setToolTip(SERVER_TIP)
        self.server_toggle.setAccessibleDescription(SERVER_TIP)
        self.server_toggle.clicked.connect(self.toggle_server)
        self.server.stateChanged.connect(self._on_server_state)
        self.server_panel.messageChanged.connect(self._on_server_message)
        # Qt shows tooltips only in the active window unless told otherwise, so hovering
        # anything while another window has the focus said nothing.
        self.setAttribute(Qt.WidgetAttribute.WA_AlwaysShowToolTips)
        sb.addWidget(self.status_model)
        sb.addWidget(self.status_progress, 1)
        sb.give_way(self.status_progress)  # a message shows in its place (Cancel loading stays)
        sb.addWidget(self.cancel_load_button)
        for w in (self.status_quant, self.status_backend, self.status_device, self.server_toggle):
            sb.addPermanentWidget(w)

    def _build_menus(self) -> None:
        file = self.menuBar().addMenu("&File")
        load = QAction("&Load model…", self)
        load.setShortcut(QKeySequence("Ctrl+L"))
        load.triggered.connect(lambda: self.ask_load(self._loaded_ref()))
        file.addAction(load)
        unload = QAction("&Unload model", self)
        unload.triggered.connect(self.bridge.unload)
        file.addAction(unload)
        new_chat = QAction("&New chat", self)
        new_chat.setShortcut(QKeySequence("Ctrl+N"))
        new_chat.triggered.connect(lambda: (self.show_page("Chat"), self.chat.new_conversation()))
        file.addAction(new_chat)
        file.addSeparator()
        quit_ = QAction("&Quit", self)
        quit_.setShortcut(QKeySequence.StandardKey.Quit)
        quit_.triggered.connect(self.request_quit)
        file.addAction(quit_)
        view = self.menuBar().addMenu("&View")
        for i, name in enumerate(PAGES):
            act = QAction(name, self)
            act.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            act.triggered.connect(lambda _=False, n=name: self.show_page(n))
            view.addAction(act)
        view.addSeparator()
        view.addAction(self.chat.params_action)  # the chat's parameters panel, shown or hidden
        self._build_theme_menu(view.addMenu("&Theme"))
        help_ = self.menuBar().addMenu("&Help")
        about = QAction("&About Hearth", self)
        about.setMenuRole(QAction.MenuRole.AboutRole)
        about.triggered.connect(self.show_about)
        help_.addAction(about)

    def _build_theme_menu(self, menu) -> None:
        """System / Light / Dark, exclusive, remembered in the settings and applied live."""
        saved = str(self.settings.value(THEME_KEY, "system") or "system")
        choice = saved if saved in THEMES else "system"
        group = QActionGroup(self)
        group.setExclusive(True)
        self.theme_actions: dict[str, QAction] = {}
        for key, label in THEMES.items():
            act = QAction(label, self, checkable=True)
            act.setChecked(key == choice)
            act.triggered.connect(lambda _=False, k=key: self.set_theme(k))
            group.addAction(act)
            menu.addAction(act)
            self.theme_actions[key] = act
        if choice != "system":  # "system" is what the app starts with (app.run_gui)
            apply_theme(QApplication.instance(), choice)

    def set_theme(self, choice: str) -> None:
        """Apply ``choice`` ("system", "light" or "dark") now and remember it."""
        self.settings.setValue(THEME_KEY, choice)
        self.theme_actions[choice].setChecked(True)
        apply_theme(QApplication.instance(), choice)

    def show_about(self):
        """Help > About Hearth: the version, where the data lives, the engine's backends
        (one dialog, not modal: raised again if already open). Returns it."""
        from app.gui.about_dialog import AboutDialog

        dialog = self.about_dialog
        if dialog is None or not dialog.isVisible():
            dialog = AboutDialog(self, chat_db=self.store.path, settings_file=self.settings.fileName())
            dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
            dialog.destroyed.connect(lambda: setattr(self, "about_dialog", None))
            self.about_dialog = dialog
        dialog.show()
        dialog.raise_()
        dialog.activateWindow()
        return dialog

    def show_page(self, name: str) -> None:
        self.nav.setCurrentRow(PAGES.index(name))

    # -- the server --------------------------------------------------------------------
    def toggle_server(self) -> None:
        """The status bar's toggle: start the server with the Server page's settings, or
        stop it. A start that fails shows the Server page, which says why."""
        self.server_panel.toggle()
        self._on_server_state(self.server.state)  # a refused start: back to off at once

    def _on_server_state(self, state: str) -> None:
        from app.gui.server_control import ON, STOPPING

        t = self.server_toggle
        t.setChecked(state == ON)
        t.setEnabled(state != STOPPING)
        if state == ON:
            t.setText(f"Server: on · :{self.server.port}")
            t.setToolTip(f"Serving at {self.server.url}: click to stop (the Server page shows each request)")
        else:
            t.setText("Server: stopping…" if state == STOPPING else "Server: off")
            t.setToolTip(SERVER_TIP)

    def _on_server_message(self, message: str) -> None:
        """The server could not start (or stopped by itself): show the page that says why."""
        if message:
            self.show_page("Server")
            self.statusBar().showMessage(f"Server: {message}", 15000)

    # -- loading -----------------------------------------------------------------------
    def ask_load(self, model_ref: str) -> None:
        dialog = LoadDialog(model_ref, self.settings, self)
        if dialog.exec():
            self.load(dialog.options())

    def load(self, options: dict) -> None:
        # remembered for the next start once it has loaded: a load that fails or is cancelled
        # must not become the model the app opens with (nor start an unasked calibration)
        self._loading_options = dict(options)
        self.bridge.load(options)
        self.show_page("Chat")

    def _loaded_ref(self) -> str:
        """What to offer in the load dialog: what the loaded model was loaded from."""
        info = self.bridge.model_info
        return (info.ref or info.path or "default") if info else "default"

    def cancel_loading(self) -> None:
        """Cancel loading (the button): say so at once; the load stops between two weight
        tensors at the latest."""
        self.bridge.cancel_load()
        self.status_progress.setText("Cancelling…")
        self.cancel_load_button.setEnabled(False)

    def _on_loading(self, name: str) -> None:
        # The loaded model's figures stay: it serves until the new one is ready.
        info = self.bridge.model_info
        self.status_model.setText(f"{info.name} · loading {name}…" if info else f"Loading {name}…")
        self.status_progress.setText("")
        self.statusBar().clearMessage()  # a message ("Model ready") would hide the progress
        self.cancel_load_button.setEnabled(True)
        self.cancel_load_button.show()

    def _on_progress(self, message: str) -> None:
        self.status_progress.setText(message)

    def _on_loaded(self, info: ModelInfo, reloaded: bool = False) -> None:
        asked = self._loading_options
        # only the load the window asked for, once it has loaded (not the previous model back
        # after a failure, nor a load started elsewhere that replaced the window's)
        if asked is not None and not reloaded and (info.ref or "default") == (asked.get("model") or "default"):
            self._loading_options = None
            save_load_options(self.settings, asked)
        self.cancel_load_button.hide()
        self.status_progress.setText("")
        self._warm_choices()
        self._show_model(info)
        if not reloaded:  # back after a failed load: that failure's message stays
            self.statusBar().showMessage("Model ready", 4000)

    def _show_model(self, info: ModelInfo) -> None:
        impl = " (transformers fallback)" if info.implementation == "transformers-fallback" else ""
        self.status_model.setText(f"{info.name}{impl}")
        self.status_quant.setText(f"quant: {info.quantization} · {info.dtype}")
        self.status_quant.set_detail(info.quant_detail or f"weights in {info.dtype}, not quantized")
        self.status_backend.setText(f"attention: {info.attention}")
        self.status_device.setText(f"device: {info.device} · weights "
                                   f"{_gib(info.weight_bytes)} · KV {_gib(info.kv_cache_bytes)}")

    def _on_failed(self, message: str) -> None:
        self._loading_options = None
        self.cancel_load_button.hide()
        self.status_progress.setText("")
        self._warm_choices()
        info = self.bridge.model_info  # the model that was loaded before, if any, still is
        if info:
            self._show_model(info)
            message += f" — still using {info.name}"
        else:
            self._show_no_model()
        if message.startswith(LOAD_CANCELLED):
            self.statusBar().showMessage("Loading cancelled" + message[len(LOAD_CANCELLED):], 20000)
        else:
            self.statusBar().showMessage(load_failure_text(message), 20000)

    def _on_unloaded(self) -> None:
        self._show_no_model()

    def _show_no_model(self) -> None:
        self.status_model.setText("No model")
        for w in (self.status_quant, self.status_backend, self.status_device):
            w.setText("")

    # -- the default model, when it isn't installed ---------------------------------------
    def confirm_install_default_model(self) -> bool:
        """Ask whether to install the default model (tests replace this)."""
        return ask_to_install(self)

    def offer_default_model(self, options: dict) -> None:
        """Offer to install the missing default model; once installed, load ``options``."""
        if not self.confirm_install_default_model():
            self._warm_choices()
            self.statusBar().showMessage("No model loaded: pick one on the Models page, or run `hearth setup` "
                                         "to install the default model", 30000)
            return
        self.status_model.setText("Installing the default model…")
        installer = DefaultModelInstaller(self)
        installer.progress.connect(self.status_progress.setText)
        installer.finished.connect(lambda result: self._on_default_model_installed(result, options))
        self.default_model_installer = installer
        installer.start()

    def _on_default_model_installed(self, result, options: dict) -> None:
        self.default_model_installer = None
        self.status_progress.setText("")
        if isinstance(result, str):  # what went wrong, and what to do
            self._show_no_model()
            self._warm_choices()
            self.statusBar().showMessage(f"The default model was not installed: {result.splitlines()[0]}", 60000)
            QMessageBox.warning(self, "The default model was not installed", result)
            return
        self.statusBar().showMessage("Default model installed", 4000)
        self._loading_options = None  # a load the user asked for meanwhile is replaced by this one
        self.bridge.load(options)

    # -- closing -----------------------------------------------------------------------
    def unfinished_work(self) -> str | None:
        """What quitting now would interrupt, as a sentence (None: nothing)."""
        parts = []
        if self.chat.is_answering:
            parts.append("An answer is still being written; it will be kept as far as it got.")
        if self.store.unsaved_changes and not self.store.retry_saving():
            parts.append("Chats of this session could not be saved to the disk and will be lost.")
        if getattr(self.bridge, "is_loading", False):
            name = getattr(self.bridge, "loading_name", None) or "A model"
            parts.append(f"{name} is still loading; quitting stops it.")
        if self.compare.running:
            parts.append("A comparison is running; quitting cancels it (the finished configurations "
                         "are saved).")
        running = sum(1 for d in self.models.downloads.list() if d.active)
        if running:
            parts.append(f"{running} download{'s are' if running > 1 else ' is'} still running; "
                         "they pick up where they stopped the next time Hearth starts.")
        return " ".join(parts) or None

    def confirm_quit(self, message: str) -> bool:
        """Ask whether to quit anyway (tests replace this)."""
        box = QMessageBox(QMessageBox.Icon.Question, "Quit Hearth?", f"{message}\n\nQuit anyway?",
                          QMessageBox.StandardButton.Cancel, self)
        quit_button = box.addButton("Quit", QMessageBox.ButtonRole.AcceptRole)
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.exec()
        return box.clickedButton() is quit_button

    def request_quit(self) -> bool:
        """Quit (File > Quit, Ctrl+Q), asking first if that would interrupt something.
        Returns whether the window closed."""
        work = self.unfinished_work()
        if work and not self.confirm_quit(work):
            return False
        return self.close()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        # The window's close button (a spontaneous event) asks like Quit; a close() from
        # code (after request_quit asked, or a test tearing down) doesn't.
        if event.spontaneous():
            work = self.unfinished_work()
            if work and not self.confirm_quit(work):
                event.ignore()
                return
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.hide()  # gone at once, even if the engine takes a moment to stop
        self.server.shutdown()  # before the engine: its answers end, its port closes
        self.server_panel.save_settings()  # also what was typed but never started
        self.chat.shutdown()
        for page in (self.compare, self.models, self.perf):
            stop = getattr(page, "shutdown", None)
            if stop is not None:
                stop()
        self.bridge.shutdown()
        super().closeEvent(event)

