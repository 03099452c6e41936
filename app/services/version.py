"""Hearth's version (``hearth --version``, the About dialog). Cheap: no engine, no Qt."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

#: The distribution Hearth is installed as.
DIST = "hearth"
_CHECKOUT_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def hearth_version() -> str:
    """The installed package's version; from a source checkout that was never installed,
    the one its pyproject.toml declares; "unknown" when neither says."""
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return _checkout_version(_CHECKOUT_PYPROJECT) or "unknown"


def _checkout_version(pyproject: Path) -> str | None:
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    # The [project] table's version line (tomllib is 3.11+; Hearth runs on 3.10 too).
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M) if project else None
    return found.group(1) if found else None
