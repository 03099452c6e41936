"""Where export dialogs open: the last folder the user saved to, else a sensible default.

Shared by every export in the app (chat Markdown/JSON, Performance PNG/CSV), so a user
who saves a chart next to a chat export finds the same folder offered. Never the
process's working directory (where a desktop launcher happens to start the app).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths

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
