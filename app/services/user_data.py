"""Where the desktop app keeps the user's own files (chats, download queue, library list,
token file), and the helpers every one of those files shares.

``HEARTH_DATA_DIR`` overrides the platform's user data folder, so tests (and users with a
portable setup) can move it. Read on every call: a test may change it between calls.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("hearth.app.user_data")

#: Environment variable that moves the user data folder.
DATA_DIR_ENV = "HEARTH_DATA_DIR"


def data_dir_path() -> Path:
    """The user data folder, whether or not it exists (``data_dir`` creates it)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("hearth", appauthor=False))


def data_dir() -> Path:
    """Return the user data folder, creating it if needed.

    Raises:
        OSError: the folder cannot be created (the message names it).
    """
    path = data_dir_path()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create Hearth's data folder {path}: {exc.strerror or exc}. "
                      f"Set {DATA_DIR_ENV} to a writable folder.") from exc
    return path


def write_json_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a crash never leaves a half-written file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def aside_path(path: Path, why: str) -> Path | None:
    """A free name beside ``path`` for a copy of it kept for the user:
    ``<name>.<why>-<YYYYmmdd-HHMMSS>`` (a numbered suffix if that exists); None if none is
    free. Checked with os.path.lexists, which never raises (Path.exists does in a folder
    that can't be searched)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        aside = path.with_name(f"{path.name}.{why}-{stamp}" + (f"-{n}" if n else ""))
        if not os.path.lexists(aside):
            return aside
    return None


def move_aside(path: Path, why: str = "corrupt") -> Path | None:
    """Rename an unusable file to ``<name>.<why>-<YYYYmmdd-HHMMSS>`` beside it (see
    ``aside_path``), so it is kept for the user (or a recovery tool) rather than lost or
    overwritten; returns the new path, or None if it could not be moved."""
    aside = aside_path(path, why)
    if aside is None:
        return None
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.warning("cannot move %s aside: %s", path, exc)
        return None
    return aside
