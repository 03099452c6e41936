"""The Server page: the OpenAI-compatible server on the app's loaded model.

Settings (saved under ``server/`` in the app's QSettings): the port, an optional API key
(hidden; a button makes a random one), "allow other machines on my network" (listens on
0.0.0.0, so it requires the key: without one anyone who can reach the machine could use
the model) and the web origins CORS lets in. While the server runs they are locked, the
base URL is shown with a copy button, and a live log lists each request (time, method,
path, status, tokens, duration) under its counts (total, ok, errors).

The page and the status bar's toggle drive one ``ServerController``; a start that fails
(the port in use, no key for the network) says why here and leaves the server off."""

from __future__ import annotations

import time

from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QFormLayout, QFrame, QGroupBox, QHBoxLayout,
                               QHeaderView, QLabel, QLineEdit, QPushButton, QScrollArea, QSpinBox, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from app.gui.chat_widgets import is_dark
from app.gui.server_control import ON, STOPPING, ServerController
from app.server.background import ServeOptions
from app.server.listen import ALL_INTERFACES, lan_address, new_api_key, parse_origins
from app.server.observe import RequestRecord
from engine.api import InvalidRequestError

__all__ = ["ServerPanel", "DEFAULT_PORT", "MAX_LOG_ROWS"]

DEFAULT_PORT = 8000
#: The log keeps this many requests (the oldest go first); the counts keep counting.
MAX_LOG_ROWS = 1000
LOG_COLUMNS = ("Time", "Method", "Path", "Status", "Tokens (prompt → generated)", "Duration")
NETWORK_WHY = ("Listens on every network interface (0.0.0.0), so other computers on your network can use "
               "the model. That needs an API key: without one, anyone who can reach this machine could.")
NEEDS_KEY = ("Other machines need an API key: type one or click Generate, then start again (without a key, "
             "anyone on your network could use the model).")


class ServerPanel(QWidget):
    """The Server page over ``controller``; ``bridge`` says which model is served,
    ``settings`` (a QSettings, or None) keeps the choices. ``messageChanged(text)``: what
    the page says about the last start (an error, or empty)."""

    messageChanged = Signal(str)

    def __init__(self, controller: ServerController, bridge, settings=None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("serverPanel")
        self.controller = controller
        self.bridge = bridge
        self.settings = settings
        self._build_ui()
        self._load_settings()
        controller.stateChanged.connect(self._show_state)
        controller.failed.connect(self.show_error)
        controller.requestLogged.connect(self._add_record)
        for name in ("modelLoaded", "modelUnloaded"):
            getattr(bridge, name).connect(lambda *_: self._show_model())
        self._show_state(controller.state)
        self._show_model()

    # -- construction ----------------------------------------------------------------------
    def _build_ui(self) -> None:
        # In a scroll area: at the window's smallest the wrapped network note needs more
        # lines than the layout's minimum gives, and was cut (now the page scrolls instead).
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll = QScrollArea()
        self.scroll.setObjectName("serverScroll")
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        content = QWidget()
        self.scroll.setWidget(content)
        outer.addWidget(self.scroll)
        root = QVBoxLayout(content)
        top = QHBoxLayout()
        self.state_label = QLabel()
        self.state_label.setObjectName("serverState")
        font = self.state_label.font()
        font.setPointSizeF(font.pointSizeF() * 1.3)
        font.setBold(True)
        self.state_label.setFont(font)
        top.addWidget(self.state_label)
        top.addStretch(1)
        self.start_button = QPushButton("Start server")
        self.start_button.setObjectName("serverStartButton")
        self.start_button.clicked.connect(self.toggle)
        top.addWidget(self.start_button)
        root.addLayout(top)

        url_row = QHBoxLayout()
        self.url_label = QLabel()
        self.url_label.setObjectName("serverUrl")
        self.url_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        url_row.addWidget(self.url_label)
        self.copy_url_button = QPushButton("Copy")
        self.copy_url_button.setObjectName("serverCopyUrl")
        self.copy_url_button.setToolTip("Copy the base URL (what OpenAI clients call base_url)")
        self.copy_url_button.clicked.connect(self.copy_url)
        url_row.addWidget(self.copy_url_button)
        url_row.addStretch(1)
        root.addLayout(url_row)
        self.lan_label = QLabel()
        self.lan_label.setObjectName("serverLanUrl")
        self.lan_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        root.addWidget(self.lan_label)
        self.model_label = QLabel()
        self.model_label.setObjectName("serverModel")
        self.model_label.setWordWrap(True)
        root.addWidget(self.model_label)
        self.error = QLabel()
        self.error.setObjectName("serverError")
        self.error.setWordWrap(True)
        self.error.hide()
        root.addWidget(self.error)

        self.form_box = QGroupBox("Settings (locked while the server runs)")
        form = QFormLayout(self.form_box)
        self.port = QSpinBox()
        self.port.setObjectName("serverPort")
        self.port.setRange(1, 65535)
        self.port.setValue(DEFAULT_PORT)
        self.port.setToolTip("The TCP port to listen on (default 8000)")
        self.port.setMinimumWidth(110)
        self.port.valueChanged.connect(lambda _: self._show_state(self.controller.state))
        port_row = QHBoxLayout()
        port_row.addWidget(self.port)
        port_row.addStretch(1)
        form.addRow("Port", port_row)
        key_row = QHBoxLayout()
        self.api_key = QLineEdit()
        self.api_key.setObjectName("serverApiKey")
        self.api_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.api_key.setPlaceholderText("none: any program on this machine may call")
        self.api_key.setToolTip("Clients send it as 'Authorization: Bearer <key>' (the api_key of the "
                                "OpenAI SDKs); every route but /health needs it. Hearth keeps it in its "
                                "settings file on this computer, as plain text: use a key made for this "
                                "server only")
        key_row.addWidget(self.api_key, 1)
        self.show_key = QPushButton("Show")
        self.show_key.setObjectName("serverShowKey")
        self.show_key.setCheckable(True)
        self.show_key.toggled.connect(self._show_key)
        key_row.addWidget(self.show_key)
        self.generate_key = QPushButton("Generate")
        self.generate_key.setObjectName("serverGenerateKey")
        self.generate_key.setToolTip("Make a new random key")
        self.generate_key.clicked.connect(lambda: self.api_key.setText(new_api_key()))
        key_row.addWidget(self.generate_key)
        self.copy_key = QPushButton("Copy")
        self.copy_key.setObjectName("serverCopyKey")
        self.copy_key.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.api_key.text().strip()))
        key_row.addWidget(self.copy_key)
        form.addRow("API key", key_row)
        self.network = QCheckBox("Allow other machines on my network")
        self.network.setObjectName("serverNetwork")
        self.network.setToolTip(NETWORK_WHY)
        self.network_why = QLabel(NETWORK_WHY)
        self.network_why.setObjectName("serverNetworkWhy")
        self.network_why.setWordWrap(True)
        self.network_why.setForegroundRole(QPalette.ColorRole.PlaceholderText)  # muted, in both themes
        network_box = QVBoxLayout()
        network_box.setSpacing(2)
        network_box.addWidget(self.network)
        network_box.addWidget(self.network_why)
        form.addRow("Network", network_box)
        self.origins = QLineEdit()
        self.origins.setObjectName("serverOrigins")
        self.origins.setPlaceholderText("none: web pages may not call the server")
        self.origins.setToolTip("Web pages (origins, e.g. http://localhost:3000) whose scripts may call the "
                                "server (CORS); separate several with commas. * allows any page.")
        form.addRow("CORS origins", self.origins)
        root.addWidget(self.form_box)

        counts_row = QHBoxLayout()
        self.counts_label = QLabel()
        self.counts_label.setObjectName("serverCounts")
        counts_row.addWidget(self.counts_label, 1)
        clear = QPushButton("Clear log")
        clear.setObjectName("serverClearLog")
        clear.clicked.connect(self.clear_log)
        counts_row.addWidget(clear)
        root.addLayout(counts_row)
        self.log = QTableWidget(0, len(LOG_COLUMNS))
        self.log.setObjectName("serverLog")
        self.log.setHorizontalHeaderLabels(LOG_COLUMNS)
        self.log.verticalHeader().hide()
        self.log.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.log.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        header = self.log.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        root.addWidget(self.log, 1)
        self._show_counts()

    def _load_settings(self) -> None:
        s = self.settings
        if s is None:
            return
        try:
            port = int(s.value("server/port", DEFAULT_PORT))
        except (TypeError, ValueError):
            port = DEFAULT_PORT
        self.port.setValue(port if 1 <= port <= 65535 else DEFAULT_PORT)
        self.api_key.setText(str(s.value("server/api_key", "") or ""))
        self.network.setChecked(str(s.value("server/network", "false")).lower() == "true")
        self.origins.setText(str(s.value("server/origins", "") or ""))

    def save_settings(self) -> None:
        s = self.settings
        if s is None:
            return
        s.setValue("server/port", self.port.value())
        s.setValue("server/api_key", self.api_key.text().strip())
        s.setValue("server/network", "true" if self.network.isChecked() else "false")
        s.setValue("server/origins", self.origins.text().strip())

    # -- actions ---------------------------------------------------------------------------
    def options(self) -> ServeOptions:
        """The server's options from the form; raises ``InvalidRequestError`` saying what
        to fix (the network without a key, an origin that is not one)."""
        key = self.api_key.text().strip() or None
        if self.network.isChecked() and key is None:
            raise InvalidRequestError(NEEDS_KEY)
        try:
            origins = parse_origins(self.origins.text())
        except InvalidRequestError as e:
            raise InvalidRequestError(f"CORS origins: {e}") from None
        return ServeOptions(host=ALL_INTERFACES if self.network.isChecked() else "127.0.0.1",
                            port=self.port.value(), api_key=key, allowed_origins=origins)

    def start(self) -> bool:
        """Start the server with the form's settings (saved first); False, with the reason
        shown, when it can't start."""
        self.show_error("")
        try:
            options = self.options()
        except InvalidRequestError as e:
            self.show_error(str(e))
            return False
        self.save_settings()
        return self.controller.start(options)

    def toggle(self) -> None:
        """Start, or stop when running (the page's button and the status bar's toggle)."""
        if self.controller.state == ON:
            self.controller.stop()
        elif self.controller.state != STOPPING:
            self.start()

    def copy_url(self) -> None:
        url = self.controller.url or self._url_to_be()
        QGuiApplication.clipboard().setText(url)

    def clear_log(self) -> None:
        self.log.setRowCount(0)
        self.controller.clear_counts()
        self._show_counts()

    def show_error(self, message: str) -> None:
        self.error.setText(message)
        self.error.setVisible(bool(message))
        self.messageChanged.emit(message)

    # -- showing ---------------------------------------------------------------------------
    def _url_to_be(self) -> str:
        return f"http://127.0.0.1:{self.port.value()}/v1"

    def _show_key(self, shown: bool) -> None:
        self.api_key.setEchoMode(QLineEdit.EchoMode.Normal if shown else QLineEdit.EchoMode.Password)
        self.show_key.setText("Hide" if shown else "Show")

    def _show_state(self, state: str) -> None:
        running = state == ON
        self.form_box.setEnabled(state not in (ON, STOPPING))
        self.start_button.setEnabled(state != STOPPING)
        self.start_button.setText("Stop server" if running else "Stopping…" if state == STOPPING
                                  else "Start server")
        if running:
            self.state_label.setText("● Running")
            self.url_label.setText(f"Base URL: {self.controller.url}")
            opts = self.controller.options
            lan = lan_address() if opts is not None and opts.host == ALL_INTERFACES else None
            self.lan_label.setText(f"Other machines: http://{lan}:{self.controller.port}/v1"
                                   if lan else "")
            self.lan_label.setVisible(bool(lan))
            self.show_error("")
        else:
            self.state_label.setText("Stopping…" if state == STOPPING else "○ Stopped")
            self.url_label.setText(f"Base URL when running: {self._url_to_be()}")
            self.lan_label.hide()
        self._apply_colours()

    def _show_model(self) -> None:
        info = self.bridge.model_info
        self.model_label.setText(f"Serves the model loaded in Hearth: {info.name} (context {info.max_model_len:,} "
                                 "tokens). Loading another model changes what the server answers with."
                                 if info else "No model is loaded: requests get a 503 until you load one.")

    def _add_record(self, record: RequestRecord) -> None:
        log = self.log
        if log.rowCount() >= MAX_LOG_ROWS:
            log.removeRow(log.rowCount() - 1)
        log.insertRow(0)  # newest first
        tokens = (f"{record.prompt_tokens:,} → {record.completion_tokens:,}"
                  if record.prompt_tokens or record.completion_tokens else "—")
        cells = (time.strftime("%H:%M:%S", time.localtime(record.started)), record.method, record.path,
                 str(record.status), tokens, _duration(record.duration_s))
        for col, text in enumerate(cells):
            item = QTableWidgetItem(text)
            if col >= 3:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            if not record.ok:
                item.setForeground(QColor(self._colours()["error"]))
            log.setItem(0, col, item)
        self._show_counts()

    def _colours(self) -> dict[str, str]:
        """Red for errors and green for "running", readable on the light and dark palettes."""
        dark = is_dark(self.palette())
        return {"error": "#f28b82" if dark else "#d93025", "ok": "#81c995" if dark else "#188038"}

    def _apply_colours(self) -> None:
        c = self._colours()
        self.error.setStyleSheet(f"color: {c['error']}")
        self.state_label.setStyleSheet(f"color: {c['ok']}" if self.controller.state == ON else "")
        for row in range(self.log.rowCount()):
            status = self.log.item(row, 3)
            if status is not None and int(status.text()) >= 400:
                for col in range(self.log.columnCount()):
                    self.log.item(row, col).setForeground(QColor(c["error"]))

    def _show_counts(self) -> None:
        c = self.controller
        self.counts_label.setText(f"Requests: {c.total:,} · ok {c.ok:,} · errors {c.errors:,}")

    def changeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange):
            self._apply_colours()
        super().changeEvent(event)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
