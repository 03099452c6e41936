"""The main window: navigation (Chat, Models, Performance), the status bar, loading.

On start it shows the chat page with the input focused and starts loading the last used
model (the bundled default the first time), so a new user can type at once; a message
typed before the model is ready is sent when it is.
"""

from __future__ import annotations

from PySide6.QtCore import QSettings
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QListWidget, QMainWindow, QPushButton,
                               QStackedWidget, QToolButton, QWidget)

from app.gui.bridge import EngineBridge
from app.gui.chat_page import ChatPage
from app.gui.load_dialog import LoadDialog, save_load_options, saved_load_options
from app.services.chat_store import ChatStore

PAGES = ("Chat", "Models", "Performance")


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
        self.store = store or ChatStore()

        from app.gui.models_page import ModelsPage
        from app.gui.perf_panel import PerfPanel

        self.chat = ChatPage(self.bridge, self.store, self.settings)
        self.models = ModelsPage(self.bridge)
        self.perf = PerfPanel(self.bridge, telemetry=telemetry)
        self.models.loadRequested.connect(self.ask_load)

        self.nav = QListWidget()
        self.nav.setObjectName("navigation")
        self.nav.addItems(PAGES)
        self.nav.setFixedWidth(130)
        self.stack = QStackedWidget()
        for page in (self.chat, self.models, self.perf):
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
        if autoload:
            self.bridge.load(saved_load_options(self.settings))

    # -- layout pieces -----------------------------------------------------------------
    def _build_status_bar(self) -> None:
        sb = self.statusBar()
        self.status_model = QLabel("No model")
        self.status_model.setObjectName("statusModel")
        self.status_quant = QLabel("")
        self.status_backend = QLabel("")
        self.status_device = QLabel("")
        self.status_progress = QLabel("")
        self.status_progress.setObjectName("statusProgress")
        self.cancel_load_button = QPushButton("Cancel loading")
        self.cancel_load_button.setObjectName("cancelLoadButton")
        self.cancel_load_button.clicked.connect(self.bridge.cancel_load)
        self.cancel_load_button.hide()
        self.server_toggle = QToolButton()
        self.server_toggle.setObjectName("serverToggle")
        self.server_toggle.setText("Server: off")
        self.server_toggle.setCheckable(True)
        self.server_toggle.setEnabled(False)
        self.server_toggle.setToolTip("The local OpenAI-compatible server is not part of this build "
                                      "yet; this toggle will start and stop it.")
        sb.addWidget(self.status_model)
        sb.addWidget(self.status_progress, 1)
        sb.addWidget(self.cancel_load_button)
        for w in (self.status_quant, self.status_backend, self.status_device, self.server_toggle):
            sb.addPermanentWidget(w)

    def _build_menus(self) -> None:
        file = self.menuBar().addMenu("&File")
        load = QAction("&Load model…", self)
        load.setShortcut(QKeySequence("Ctrl+L"))
        load.triggered.connect(lambda: self.ask_load((self.bridge.model_info or {}).get("path", "default")))
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
        quit_.triggered.connect(self.close)
        file.addAction(quit_)
        view = self.menuBar().addMenu("&View")
        for i, name in enumerate(PAGES):
            act = QAction(name, self)
            act.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            act.triggered.connect(lambda _=False, n=name: self.show_page(n))
            view.addAction(act)

    def show_page(self, name: str) -> None:
        self.nav.setCurrentRow(PAGES.index(name))

    # -- loading -----------------------------------------------------------------------
    def ask_load(self, model_ref: str) -> None:
        dialog = LoadDialog(model_ref, self.settings, self)
        if dialog.exec():
            self.load(dialog.options())

    def load(self, options: dict) -> None:
        save_load_options(self.settings, options)
        self.bridge.load(options)
        self.show_page("Chat")

    def _on_loading(self, name: str) -> None:
        self.status_model.setText(f"Loading {name}…")
        self.status_progress.setText("")
        self.cancel_load_button.show()

    def _on_progress(self, message: str) -> None:
        self.status_progress.setText(message)

    def _on_loaded(self, info: dict) -> None:
        self.cancel_load_button.hide()
        self.status_progress.setText("")
        impl = " (transformers fallback)" if info.get("implementation") == "transformers-fallback" else ""
        self.status_model.setText(f"{info.get('name', '?')}{impl}")
        self.status_quant.setText(f"quant: {info.get('quantization', 'none')} · {info.get('dtype', '')}")
        self.status_backend.setText(f"attention: {info.get('attention', '?')}")
        self.status_device.setText(f"device: {info.get('device', '?')} · weights "
                                   f"{_gib(info.get('weight_bytes'))} · KV {_gib(info.get('kv_cache_bytes'))}")
        self.statusBar().showMessage("Model ready", 4000)

    def _on_failed(self, message: str) -> None:
        self.cancel_load_button.hide()
        self.status_progress.setText("")
        self.status_model.setText("No model")
        self.statusBar().showMessage(f"Loading failed: {message}", 20000)

    def _on_unloaded(self) -> None:
        self.status_model.setText("No model")
        for w in (self.status_quant, self.status_backend, self.status_device):
            w.setText("")

    # -- closing -----------------------------------------------------------------------
    def closeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.chat.shutdown()
        for page in (self.models, self.perf):
            stop = getattr(page, "shutdown", None)
            if stop is not None:
                stop()
        self.bridge.shutdown()
        super().closeEvent(event)

