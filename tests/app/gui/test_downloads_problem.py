"""The Downloads tab says why the saved download list could not be used (issue 12 item
9c: a ``downloads.json`` of the wrong shape stopped the download manager at start-up)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from app.gui.models_downloads import DownloadsPanel  # noqa: E402
from app.gui.models_workers import DownloadEvents  # noqa: E402
from app.services.downloads import DownloadManager  # noqa: E402


def _panel(qtbot, state_file):
    manager = DownloadManager(state_file, autostart=False)
    events = DownloadEvents(manager)
    panel = DownloadsPanel(manager, events)
    qtbot.addWidget(panel)
    panel.show()
    return manager, events, panel


def test_an_unusable_download_list_is_explained_above_the_list(qtbot, tmp_path):
    state_file = tmp_path / "downloads.json"
    state_file.write_text("[1, 2, 3]")
    manager, events, panel = _panel(qtbot, state_file)
    try:
        assert panel.problem.isVisible()
        text = panel.problem.text()
        assert "could not be used" in text and "downloads.json.corrupt-" in text, text
        assert panel.empty.isVisible() and panel.rows == {}
    finally:
        events.detach()
        manager.shutdown()


def test_a_good_download_list_shows_no_problem(qtbot, tmp_path):
    manager, events, panel = _panel(qtbot, tmp_path / "downloads.json")
    try:
        assert not panel.problem.isVisible()
    finally:
        events.detach()
        manager.shutdown()
