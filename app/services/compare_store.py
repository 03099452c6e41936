"""Saved comparisons: one JSON file each in ``comparisons/`` under the user data folder
(``user_data.data_dir``; ``HEARTH_DATA_DIR`` moves it), named
``<YYYYmmdd-HHMMSS>-<name>.json``. Save a finished or cancelled comparison, list the saved
ones (newest first), reopen one, delete one. A file that can't be read as a comparison is
left where it is, skipped by ``list_comparisons`` (its reason added to ``problems``) and
refused by ``load_comparison`` with ``ComparisonFileError``: never a crash.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from app.services.compare_results import ComparisonResult
from app.services.user_data import data_dir, write_json_atomic
from engine.api import HearthError

log = logging.getLogger("hearth.app.compare_store")

FOLDER = "comparisons"
FORMAT = "hearth-comparison"
VERSION = 1


class ComparisonFileError(HearthError):
    """A saved comparison can't be written, read or understood; the message names the file
    and says what to do."""


@dataclass(frozen=True, slots=True)
class SavedComparison:
    """One saved comparison as a list shows it (``load_comparison(path)`` opens it)."""

    path: Path
    name: str
    saved: str  # ISO 8601, local time with offset
    model: str | None
    labels: tuple[str, ...]
    cancelled: bool


def comparisons_dir(folder: str | Path | None = None) -> Path:
    """The folder of saved comparisons (``folder``, or the data folder's), created if
    needed. ComparisonFileError when it can't be."""
    path = Path(folder) if folder is not None else None
    try:
        path = path or data_dir() / FOLDER
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ComparisonFileError(f"cannot create the folder for saved comparisons: {e.strerror or e}. Set "
                                  "HEARTH_DATA_DIR to a writable folder.") from None
    return path


def default_name(result: ComparisonResult) -> str:
    """"<model>: <label>, <label>, ..." (the name a save without one gets)."""
    return f"{result.model or 'model'}: {', '.join(r.label for r in result.results)}"


def save_comparison(result: ComparisonResult, name: str | None = None, folder: str | Path | None = None) -> Path:
    """Write ``result`` (sets its ``name``: ``name``, or ``default_name``) as a new file
    and return its path. ComparisonFileError when the disk refuses."""
    result.name = (name or "").strip() or default_name(result)
    now = datetime.now().astimezone()
    target = comparisons_dir(folder)
    stem = f"{now:%Y%m%d-%H%M%S}-{_slug(result.name)}"
    path = target / f"{stem}.json"
    for n in range(2, 100):
        if not os.path.lexists(path):
            break
        path = target / f"{stem}-{n}.json"
    doc = {"format": FORMAT, "version": VERSION, "saved": now.isoformat(timespec="seconds"), **result.to_dict()}
    try:
        write_json_atomic(path, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    except OSError as e:
        raise ComparisonFileError(f"cannot save the comparison as {path}: {e.strerror or e}. Free some space or set "
                                  "HEARTH_DATA_DIR to a writable folder.") from None
    return path


def load_comparison(path: str | Path) -> ComparisonResult:
    """Reopen a saved comparison. ComparisonFileError naming the file when it can't be
    read, isn't JSON, isn't a saved comparison, or was saved by a newer Hearth."""
    return _read(Path(path))[1]


def list_comparisons(folder: str | Path | None = None, problems: list[str] | None = None) -> list[SavedComparison]:
    """The saved comparisons, newest first. A file that can't be read is skipped; its
    reason is appended to ``problems`` (when given) and logged."""
    try:
        target = comparisons_dir(folder)
        files = sorted(target.glob("*.json"), reverse=True)
    except (ComparisonFileError, OSError) as e:
        _problem(problems, str(e))
        return []
    out = []
    for path in files:
        try:
            doc, result = _read(path)
        except ComparisonFileError as e:
            _problem(problems, str(e))
            continue
        out.append(SavedComparison(path, result.name or path.stem, str(doc.get("saved") or result.started),
                                   result.model, tuple(r.label for r in result.results), result.cancelled))
    out.sort(key=lambda s: s.saved, reverse=True)
    return out


def delete_comparison(path: str | Path) -> None:
    """Remove a saved comparison (gone already: nothing to do). ComparisonFileError when
    the disk refuses."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as e:
        raise ComparisonFileError(f"cannot delete the saved comparison {path}: {e.strerror or e}.") from None


def _read(path: Path) -> tuple[dict[str, Any], ComparisonResult]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ComparisonFileError(f"cannot read the saved comparison {path}: {e.strerror or e}.") from None
    except UnicodeDecodeError:
        raise ComparisonFileError(f"the saved comparison {path} is not UTF-8 text: it is damaged; delete it.") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        # (json's "Unterminated string starting at" names its own place: no "at at line")
        raise ComparisonFileError(f"the saved comparison {path} is damaged (not JSON: {e.msg.removesuffix(' at')} at "
                                  f"line {e.lineno}); delete it.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ComparisonFileError(f"{path} is not a saved Hearth comparison; move it out of {path.parent}.")
    version = doc.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ComparisonFileError(f"the saved comparison {path} is of version {version!r}, newer than this Hearth "
                                  f"reads ({VERSION}): open it with a newer Hearth.")
    try:
        return doc, ComparisonResult.from_dict(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ComparisonFileError(f"the saved comparison {path} is damaged ({type(e).__name__}: {e}); "
                                  "delete it.") from None


def _problem(problems: list[str] | None, message: str) -> None:
    log.warning("%s", message)
    if problems is not None:
        problems.append(message)


def _slug(name: str) -> str:
    """A file-name-safe short form of ``name`` (letters, digits, '-', '.', '_')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return slug[:60] or "comparison"
