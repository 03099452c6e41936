"""The download queue's file (``downloads.json``): read whatever shape it is in, write it
atomically.

A file that can't be used (not JSON, not UTF-8, the wrong shape, entries missing keys or
of the wrong types) never stops the download manager from starting (issue 12: a JSON list
raised AttributeError at start-up). It is moved aside under a timestamped name, so
nothing is lost, the usable entries are kept, and the problem is described in words for
the app to show.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from app.services.user_data import move_aside, write_json_atomic

log = logging.getLogger("hearth.app.downloads")

FORMAT_VERSION = 1
_REQUIRED_TEXT = ("id", "repo_id")
_OPTIONAL_TEXT = ("revision", "current_file", "error", "error_kind", "error_url", "path")


def read_queue(path: Path, states: tuple[str, ...]) -> tuple[list[dict], str | None]:
    """The usable entries of the queue file at ``path`` (dicts of ``DownloadStatus``
    fields, ``files`` a tuple or None) and ``None``, or the entries that could be used and
    a sentence saying what was wrong, where the file went, and that the queue goes on
    without the rest. A missing file is an empty queue, not a problem."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        log.warning("cannot read the download queue %s: %s", path, exc)
        return [], (f"The download list {path} could not be read ({exc.strerror or exc}): the list starts "
                    "empty. Check the file's permissions.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both
        return [], _set_aside(path, f"it is not a JSON file: {exc}")
    entries = data.get("downloads") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        what = type(data).__name__ if not isinstance(data, dict) else "an object without a list of downloads"
        return [], _set_aside(path, f"it holds {_article(what)}, not a download list")
    items, reasons = [], []
    for entry in entries:
        try:
            items.append(_status_fields(entry, states))
        except ValueError as exc:
            reasons.append(str(exc))
    if not reasons:
        return items, None
    aside = move_aside(path)
    where = f"the original file was kept as {aside.name} beside it" if aside else "it could not be kept"
    log.warning("download queue %s: %d entries left out (%s)", path, len(reasons), "; ".join(reasons))
    return items, (f"{len(reasons)} of the {len(entries)} entries in the download list {path} could not be "
                   f"used ({reasons[0]}) and were left out; {where}.")


def write_queue(path: Path, items: list[dict]) -> None:
    """Replace the queue file with ``items`` (atomically: a crash never half-writes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json.dumps({"version": FORMAT_VERSION, "downloads": items}, indent=1))


def _status_fields(entry: object, states: tuple[str, ...]) -> dict:
    """``DownloadStatus`` fields from one entry; ValueError says what is wrong with it.
    Fields this version doesn't know (a newer version's) are ignored."""
    if not isinstance(entry, dict):
        raise ValueError(f"an entry is {_article(type(entry).__name__)}, not an object")
    out: dict = {}
    for key in _REQUIRED_TEXT:
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ValueError(f"an entry has no {key}")
    for key in (*_REQUIRED_TEXT, *_OPTIONAL_TEXT):
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} of {entry['id']} is not text")
        out[key] = value
    state = entry.get("state", states[0])
    if state not in states:
        raise ValueError(f"{entry['id']} has an unknown state {state!r}")
    out["state"] = state
    for key, optional in (("bytes_done", False), ("bytes_total", True)):
        value = entry.get(key, None if optional else 0)
        if (value is None and not optional) or (value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0)):
            raise ValueError(f"{key} of {entry['id']} is not a number of bytes")
        out[key] = value
    files = entry.get("files")
    if files is not None and (not isinstance(files, list) or not all(isinstance(f, str) for f in files)):
        raise ValueError(f"files of {entry['id']} is not a list of file names")
    out["files"] = tuple(files) if files else None
    out["partial_kept"] = bool(entry.get("partial_kept", False))
    return out


def _set_aside(path: Path, reason: str) -> str:
    aside = move_aside(path)
    log.warning("download queue %s is unusable (%s); moved to %s", path, reason, aside)
    where = f"it was moved to {aside.name} beside it" if aside else "it could not be moved aside"
    return f"The download list {path} could not be used ({reason}); {where} and the list starts empty."


_KINDS = {"int": "number", "float": "number", "bool": "true or false", "str": "text", "NoneType": "null",
          "list": "list"}


def _article(type_name: str) -> str:
    """``"int"`` -> ``"a number"``: a JSON value's kind, in words."""
    noun = _KINDS.get(type_name, type_name)
    return noun if noun in ("text", "null", "true or false") else (
        f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}")
