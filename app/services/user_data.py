"""Where the desktop app keeps the user's own files (download queue, library list, token file).

``HEARTH_DATA_DIR`` overrides the platform's user data folder, so tests (and users with a
portable setup) can move it. Read on every call: a test may change it between calls.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that moves the user data folder.
DATA_DIR_ENV = "HEARTH_DATA_DIR"


def data_dir() -> Path:
    """Return the user data folder, creating it if needed.

    Raises:
        OSError: the folder cannot be created (the message names it).
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir("hearth", appauthor=False))
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
