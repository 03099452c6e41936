"""A download queue file of any shape never stops the download manager from starting
(issue 12 item 9c: a JSON list in ``downloads.json`` raised AttributeError at start-up).

A file that can't be used is moved aside under a timestamped name (kept, not lost), the
queue starts empty, and ``load_problem`` says what happened, for the app to show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.services.downloads import PAUSED, QUEUED, DownloadManager

GOOD = {"id": "abc123", "repo_id": "acme/tiny-chat", "state": "paused", "bytes_done": 10, "bytes_total": 100,
        "files": None, "revision": None}

CORRUPT = {
    "not json": b"{{{ this is not json",
    "not utf-8": b"\xff\xfe\x00garbage",
    "a list": b"[]",
    "a number": b"42",
    "a string": b'"downloads"',
    "downloads not a list": json.dumps({"version": 1, "downloads": 5}).encode(),
    "no downloads key": json.dumps({"version": 1}).encode(),
}


def _aside(folder: Path) -> list[Path]:
    return sorted(folder.glob("downloads.json.corrupt-*"))


@pytest.fixture
def state_file(tmp_path) -> Path:
    return tmp_path / "downloads.json"


@pytest.mark.parametrize("name", list(CORRUPT))
def test_an_unusable_file_is_moved_aside_and_the_queue_starts_empty(state_file, name):
    state_file.write_bytes(CORRUPT[name])
    m = DownloadManager(state_file, autostart=False)
    try:
        assert m.list() == []
        (aside,) = _aside(state_file.parent)
        assert aside.read_bytes() == CORRUPT[name]          # kept as it was
        assert m.load_problem is not None
        assert str(state_file) in m.load_problem and aside.name in m.load_problem, m.load_problem
        # A fresh, valid file replaces it.
        assert json.loads(state_file.read_text())["downloads"] == []
    finally:
        m.shutdown()
    # The next start finds nothing wrong.
    again = DownloadManager(state_file, autostart=False)
    assert again.load_problem is None and again.list() == []
    again.shutdown()


BAD_ENTRIES = [
    5, "x", None, [1, 2],
    {"repo_id": "acme/x"},                                  # no id
    {"id": "i1"},                                           # no repo
    {"id": "i2", "repo_id": "acme/x", "state": "exploded"},
    {"id": "i3", "repo_id": "acme/x", "bytes_done": "many"},
    {"id": "i4", "repo_id": "acme/x", "files": "model.gguf"},
    {"id": "i5", "repo_id": 7},
]


def test_bad_entries_are_left_out_and_the_good_ones_kept(state_file):
    state_file.write_text(json.dumps({"version": 1, "downloads": [GOOD, *BAD_ENTRIES]}))
    m = DownloadManager(state_file, autostart=False)
    try:
        (status,) = m.list()
        assert (status.id, status.state, status.bytes_done) == ("abc123", PAUSED, 10)
        (aside,) = _aside(state_file.parent)
        assert len(json.loads(aside.read_text())["downloads"]) == 1 + len(BAD_ENTRIES)
        assert f"{len(BAD_ENTRIES)} of the {1 + len(BAD_ENTRIES)}" in m.load_problem, m.load_problem
        # The good entry is saved at once, so it survives even if nothing else changes.
        assert [d["id"] for d in json.loads(state_file.read_text())["downloads"]] == ["abc123"]
    finally:
        m.shutdown()


def test_a_good_file_has_no_problem_and_unknown_fields_are_ignored(state_file):
    state_file.write_text(json.dumps({"version": 1, "downloads": [{**GOOD, "state": "running",
                                                                   "added_by_a_newer_version": 1}]}))
    m = DownloadManager(state_file, autostart=False)
    try:
        (status,) = m.list()
        assert status.state == QUEUED and m.load_problem is None and _aside(state_file.parent) == []
    finally:
        m.shutdown()
