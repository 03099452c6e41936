"""The Compare page's list of saved comparisons (``app.services.compare_store``): reopen
one, delete one. Files that can't be read as a comparison are not listed; a line under
the list says which and why (the store never raises over them), so a damaged file can't
break the page.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QMessageBox, QPushButton,
                               QVBoxLayout, QWidget)

from app.services.compare_store import (ComparisonFileError, SavedComparison, delete_comparison,
                                        list_comparisons, load_comparison)


def saved_when(iso: str) -> str:
    """"2025-01-31 14:05" from an ISO 8601 time (as written, if it isn't one)."""
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return iso


class SavedComparisons(QWidget):
    """The saved comparisons, newest first. ``openRequested(ComparisonResult)`` when one is
    opened (double-click or Open). ``folder``: where they are (default: the data folder's);
    ``confirm_delete(name) -> bool`` replaces the question in tests."""

    openRequested = Signal(object)

    def __init__(self, folder: str | Path | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("compareSaved")
        self.folder = folder
        self.saved: list[SavedComparison] = []
        self.problems: list[str] = []
        self.confirm_delete = self._ask_delete
        self.list = QListWidget()
        self.list.setObjectName("compareSavedList")
        self.list.setWordWrap(True)
        self.list.itemDoubleClicked.connect(lambda *_: self.open_selected())
        self.list.itemSelectionChanged.connect(self._update_buttons)
        self.open_button = QPushButton("Open")
        self.open_button.setObjectName("compareOpenSaved")
        self.open_button.clicked.connect(self.open_selected)
        self.delete_button = QPushButton("Delete…")
        self.delete_button.setObjectName("compareDeleteSaved")
        self.delete_button.clicked.connect(self.delete_selected)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setObjectName("compareRefreshSaved")
        self.refresh_button.clicked.connect(self.refresh)
        self.message = QLabel()
        self.message.setObjectName("compareSavedMessage")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        buttons = QHBoxLayout()
        for b in (self.open_button, self.delete_button, self.refresh_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.list, 1)
        lay.addLayout(buttons)
        lay.addWidget(self.message)
        self._busy = False
        self._update_buttons()

    def refresh(self) -> None:
        """List the folder again (quick: one small JSON file per comparison)."""
        problems: list[str] = []
        self.saved = list_comparisons(self.folder, problems)
        self.problems = problems
        self.list.clear()
        for s in self.saved:
            what = ", ".join(s.labels)
            item = QListWidgetItem(f"{s.name}\n{saved_when(s.saved)} · {what}" + (" · cancelled" if s.cancelled
                                                                                 else ""))
            item.setToolTip(str(s.path))
            self.list.addItem(item)
        if problems:
            one = len(problems) == 1
            self.message.setText(f"{len(problems)} saved file{'' if one else 's'} could not be read and "
                                 f"{'is' if one else 'are'} not listed: " + " ".join(problems))
        elif not self.saved:
            self.message.setText("No saved comparisons yet: each comparison is saved here when it ends.")
        else:
            self.message.setText("")
        self._update_buttons()

    def set_busy(self, busy: bool) -> None:
        """While a comparison runs, opening another would replace its view: not then."""
        self._busy = busy
        self._update_buttons()

    def selected(self) -> SavedComparison | None:
        row = self.list.currentRow()
        return self.saved[row] if 0 <= row < len(self.saved) and self.list.currentItem().isSelected() else None

    def select_path(self, path: Path) -> None:
        for row, s in enumerate(self.saved):
            if Path(s.path) == Path(path):
                self.list.setCurrentRow(row)
                return

    def open_selected(self) -> None:
        s = self.selected()
        if s is None or self._busy:
            return
        try:
            result = load_comparison(s.path)
        except ComparisonFileError as e:
            self.message.setText(str(e))
            return
        self.openRequested.emit(result)

    def delete_selected(self) -> None:
        s = self.selected()
        if s is None or not self.confirm_delete(s.name):
            return
        try:
            delete_comparison(s.path)
        except ComparisonFileError as e:
            self.message.setText(str(e))
            return
        self.refresh()

    def _ask_delete(self, name: str) -> bool:
        answer = QMessageBox.question(self, "Delete comparison", f"Delete the saved comparison “{name}”?",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _update_buttons(self) -> None:
        chosen = self.selected() is not None
        self.open_button.setEnabled(chosen and not self._busy)
        self.delete_button.setEnabled(chosen)
