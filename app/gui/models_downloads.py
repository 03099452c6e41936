"""The downloads list of the Models page: one row per download, live progress, actions.

Rows are driven by ``DownloadStatus`` snapshots arriving through ``DownloadEvents`` (a
queued signal), so the manager's worker threads never touch a widget.

Pause keeps the partial file and Resume continues from it. Cancel asks first whether to
keep the partial file (Retry then continues from it) or delete it; the question is the
panel's ``ask_cancel`` attribute, so tests answer it without a modal box.
"""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QMessageBox, QProgressBar, QPushButton, QScrollArea,
                               QVBoxLayout, QWidget)

from app.gui.models_format import download_line, human_bytes

_SCALE = 1000  # progress bar resolution (0.1 %)
#: Answers of the Cancel question: keep the partial file, delete it, or None (don't cancel).
KEEP, DELETE = "keep", "delete"


def ask_cancel(status, parent: QWidget | None = None) -> str | None:
    """Ask whether a cancelled download's partial file stays: ``KEEP``, ``DELETE`` or
    ``None`` (the user changed their mind: don't cancel)."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("Cancel download")
    box.setText(f"Cancel the download of {status.repo_id}?")
    box.setInformativeText(f"{human_bytes(status.bytes_done)} are on disk. Keep the partial file and Retry "
                           "continues from there; delete it and a new download starts again.")
    keep = box.addButton("Keep partial file", QMessageBox.ButtonRole.AcceptRole)
    delete = box.addButton("Delete it", QMessageBox.ButtonRole.DestructiveRole)
    back = box.addButton("Don't cancel", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(keep)
    box.setEscapeButton(back)
    box.exec()
    return {keep: KEEP, delete: DELETE}.get(box.clickedButton())


class DownloadRow(QFrame):
    """One download: name, bar, "bytes · speed · ETA" line, and Pause / Resume / Cancel /
    Retry / Load / Clear as the state allows."""

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
        self.pause_button = QPushButton("Pause")
        self.pause_button.setObjectName("pauseDownloadButton")
        self.pause_button.setToolTip("Stop for now and keep what is downloaded; Resume continues from there.")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setObjectName("resumeDownloadButton")
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
        for b in (self.pause_button, self.resume_button, self.cancel_button, self.retry_button, self.load_button,
                  self.clear_button):
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
        self.pause_button.setVisible(status.state in ("queued", "running"))
        self.resume_button.setVisible(status.state == "paused")
        self.cancel_button.setVisible(status.state in ("queued", "running", "paused"))
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
        #: ``ask_cancel(status, parent) -> KEEP | DELETE | None``: replaced in tests.
        self.ask_cancel = ask_cancel
        self.rows: dict[str, DownloadRow] = {}
        self.empty = QLabel("No downloads yet. Find a model and press Download.")
        self.empty.setObjectName("downloadsEmpty")
        # Why the saved download list could not be (fully) used at start-up (it was moved
        # aside, so nothing is lost): said once, above the list.
        self.problem = QLabel(getattr(manager, "load_problem", None) or "")
        self.problem.setObjectName("downloadsProblem")
        self.problem.setWordWrap(True)
        self.problem.setTextFormat(Qt.TextFormat.PlainText)
        self.problem.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.problem.setVisible(bool(self.problem.text()))
        inner = QWidget()
        self._list = QVBoxLayout(inner)
        self._list.addWidget(self.empty)
        self._list.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(inner)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.problem)
        lay.addWidget(scroll)
        for status in manager.list():
            self.apply(status)
        events.statusChanged.connect(self.apply)

    def apply(self, status) -> None:
        """Create or update the row of ``status``."""
        row = self.rows.get(status.id)
        if row is None:
            row = DownloadRow(status)
            row.pause_button.clicked.connect(lambda: self._manager.pause(row.download_id))
            row.resume_button.clicked.connect(lambda: self._manager.resume(row.download_id))
            row.cancel_button.clicked.connect(lambda: self._cancel(row))
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

    def _cancel(self, row: DownloadRow) -> None:
        """Cancel, asking first whether the partial file stays when there is one."""
        status = self._manager.get(row.download_id) or row.status
        if status.bytes_done <= 0:
            self._manager.cancel(row.download_id)  # nothing on disk yet: nothing to ask about
            return
        answer = self.ask_cancel(status, self)
        if answer in (KEEP, DELETE):
            self._manager.cancel(row.download_id, keep_partial=answer == KEEP)

    def _clear(self, download_id: str) -> None:
        self._manager.remove(download_id)
        row = self.rows.pop(download_id, None)
        if row is not None:
            row.deleteLater()
        self.empty.setVisible(not self.rows)
