"""Where Hearth keeps its files on disk.

Everything Hearth writes (converted models, caches) lives under one folder so a user can
find it, measure it and delete it. ``HEARTH_CACHE_DIR`` moves it, e.g. to a bigger disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from engine.errors import ModelLoadError

#: Environment variable that overrides the cache folder.
CACHE_DIR_ENV = "HEARTH_CACHE_DIR"


def _ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create Hearth's cache folder {path}: {exc.strerror or exc}. "
            f"Set {CACHE_DIR_ENV} to a writable folder."
        ) from exc
    return path


def cache_dir() -> Path:
    """Return Hearth's cache folder, creating it if needed.

    ``$HEARTH_CACHE_DIR`` when set, else the platform's user cache folder
    (``~/.cache/hearth`` on Linux). Read on every call so tests and users can change it
    without restarting.
    """
    override = os.environ.get(CACHE_DIR_ENV)
    base = Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("hearth"))
    return _ensure_dir(base)


def models_cache_dir() -> Path:
    """Return the folder holding converted models (``cache_dir()/models``), creating it if needed."""
    return _ensure_dir(cache_dir() / "models")
