"""Where export dialogs open: the last folder the user saved to, else a sensible default.

Shared by every export in the app (chat Markdown/JSON, Performance PNG/CSV), so a user
who saves a chart next to a chat export finds the same folder offered. Never the
process's working directory (where a desktop launcher happens to start the app).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

from PySide6.QtCore import QSettings, QStandardPaths
from PySide6.QtWidgets import QMessageBox, QWidget

EXPORT_DIR_KEY = "export/last_dir"
_DEFAULTS = {"documents": QStandardPaths.StandardLocation.DocumentsLocation,
             "pictures": QStandardPaths.StandardLocation.PicturesLocation}


def default_export_dir(kind: str = "documents") -> str:
    """The user's Documents (or Pictures) folder where it exists, else home."""
    folder = QStandardPaths.writableLocation(_DEFAULTS[kind])
    return folder if folder and Path(folder).is_dir() else str(Path.home())


def export_start_dir(settings: QSettings | None, kind: str = "documents") -> str:
    """Where a save dialog opens: the last folder used (if it still exists), else the default."""
    last = settings.value(EXPORT_DIR_KEY) if settings is not None else None
    if last and Path(str(last)).is_dir():
        return str(last)
    return default_export_dir(kind)


def remember_export_dir(settings: QSettings | None, saved_file: str | Path) -> None:
    """Remember the folder of a file just saved (no-op without settings)."""
    if settings is not None:
        settings.setValue(EXPORT_DIR_KEY, str(Path(saved_file).parent))


def export_target(chosen: str | Path, suffix: str,
                  confirm_overwrite: Callable[[Path], bool]) -> Path | None:
    """The file to write for a name chosen in a save dialog: ``suffix`` is added when the
    name has another or none. The dialog asked about replacing the name it returned, not
    the one with the suffix added, so replacing that one is asked here; None when the user
    declines."""
    path = Path(chosen)
    if path.suffix.lower() != f".{suffix}":
        path = path.with_name(f"{path.name}.{suffix}")
        if path.exists() and not confirm_overwrite(path):
            return None
    return path


class ExportResult(NamedTuple):
    """How an export went: ``saved`` or not, and the line to show (what was saved where,
    or why not and what to do)."""
    saved: bool
    message: str


def write_export(path: Path, write: Callable[[Path], str], settings: QSettings | None) -> ExportResult:
    """Run ``write(path)`` (it returns what was saved, e.g. "120 rows"); remember the folder
    on success."""
    try:
        what = write(path)
    except OSError as e:
        return ExportResult(False, f"Could not save {path}: {e.strerror or e}. Choose a folder you can "
                                   "write to.")
    remember_export_dir(settings, path)
    return ExportResult(True, f"Saved {what} to {path}")


def ask_overwrite(parent: QWidget) -> Callable[[Path], bool]:
    """The confirmation ``export_target`` needs, as a Yes/No question over ``parent``."""
    def confirm(path: Path) -> bool:
        answer = QMessageBox.question(parent, "Replace file?",
                                      f"{path.name} already exists in {path.parent}. Replace it?")
        return answer == QMessageBox.StandardButton.Yes
    return confirm
