"""The downloads list of the Models page: one row per download, live progress, actions.

Rows are driven by ``DownloadStatus`` snapshots arriving through ``DownloadEvents`` (a
queued signal), so the manager's worker threads never touch a widget.
"""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QProgressBar, QPushButton, QScrollArea,
                               QVBoxLayout, QWidget)

from app.gui.models_format import download_line

_SCALE = 1000  # progress bar resolution (0.1 %)


class DownloadRow(QFrame):
    """One download: name, bar, "bytes · speed · ETA" line, Cancel / Retry / Load / Clear."""

    def __init__(self, status, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.download_id = status.id
        self.status = status
        self.name = QLabel()
        self.name.setObjectName("downloadName")
        self.bar = QProgressBar()
        self.bar.setObjectName("downloadProgress")
        self.bar.setRange(0, _SCALE)
        self.line = QLabel()
        self.line.setObjectName("downloadStatus")
        self.line.setWordWrap(True)
        self.line.setTextFormat(Qt.TextFormat.RichText)
        self.line.setOpenExternalLinks(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("cancelDownloadButton")
        self.retry_button = QPushButton("Retry")
        self.retry_button.setObjectName("retryDownloadButton")
        self.load_button = QPushButton("Load")
        self.load_button.setObjectName("downloadLoadButton")
        self.clear_button = QPushButton("Clear")
        self.clear_button.setObjectName("clearDownloadButton")
        top = QHBoxLayout()
        top.addWidget(self.name, 1)
        for b in (self.cancel_button, self.retry_button, self.load_button, self.clear_button):
            top.addWidget(b)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.bar)
        lay.addWidget(self.line)
        self.apply(status)

    def apply(self, status) -> None:
        """Show ``status`` (a ``DownloadStatus``)."""
        self.status = status
        what = status.repo_id + (f" · {', '.join(status.files)}" if status.files else "")
        self.name.setText(what)
        if status.state == "running" and not status.bytes_total:
            self.bar.setRange(0, 0)  # busy: the file list is still being read
        else:
            self.bar.setRange(0, _SCALE)
            frac = 1.0 if status.state == "done" else (status.fraction or 0.0)
            self.bar.setValue(int(round(frac * _SCALE)))
        text = html.escape(download_line(status))
        if status.state == "failed" and status.error_url:
            text += f' <a href="{html.escape(status.error_url)}">Open {html.escape(status.repo_id)} on the Hub</a>'
        self.line.setText(text)
        self.cancel_button.setVisible(status.state in ("queued", "running"))
        self.retry_button.setVisible(status.state in ("failed", "cancelled"))
        self.load_button.setVisible(status.state == "done" and bool(status.path))
        self.clear_button.setVisible(status.state in ("done", "failed", "cancelled"))


class DownloadsPanel(QWidget):
    """All downloads, newest at the top. ``loadRequested(path)`` from a finished row's Load;
    ``downloadFinished(status)`` when one completes (the library refreshes on it)."""

    loadRequested = Signal(str)
    downloadFinished = Signal(object)

    def __init__(self, manager, events, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._manager = manager
        self.rows: dict[str, DownloadRow] = {}
        self.empty = QLabel("No downloads yet. Find a model and press Download.")
        self.empty.setObjectName("downloadsEmpty")
        inner = QWidget()
        self._list = QVBoxLayout(inner)
        self._list.addWidget(self.empty)
        self._list.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(inner)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(scroll)
        for status in manager.list():
            self.apply(status)
        events.statusChanged.connect(self.apply)

    def apply(self, status) -> None:
        """Create or update the row of ``status``."""
        row = self.rows.get(status.id)
        if row is None:
            row = DownloadRow(status)
            row.cancel_button.clicked.connect(lambda: self._manager.cancel(row.download_id))
            row.retry_button.clicked.connect(lambda: self._manager.retry(row.download_id))
            row.load_button.clicked.connect(lambda: self.loadRequested.emit(row.status.path))
            row.clear_button.clicked.connect(lambda: self._clear(row.download_id))
            self.rows[status.id] = row
            self._list.insertWidget(0, row)
            self.empty.hide()
        was_done = row.status.state == "done"
        row.apply(status)
        if status.state == "done" and not was_done:
            self.downloadFinished.emit(status)

    def _clear(self, download_id: str) -> None:
        self._manager.remove(download_id)
        row = self.rows.pop(download_id, None)
        if row is not None:
            row.deleteLater()
        self.empty.setVisible(not self.rows)
