"""Retries end (issue 12 item 4): a server that ignored Range and sent short bodies made
949 full re-downloads in 60 s with no backoff, and the download stayed "running".

Retries count attempts that make no net progress (past the most of the file ever on
disk), back off exponentially with a cap, and end in a failed state that says why; a
server that ignores Range is named as such. The waits are recorded, not slept.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from app.services.downloads import DONE, FAILED, DownloadManager
from engine.api import DOWNLOAD_MAX_RETRY_WAIT_S as MAX_RETRY_WAIT_S
from tests.app.hub_fixtures import TINY, fake_hub, repo_files

__all__ = ["fake_hub"]

WEIGHTS = "model.safetensors"
# Short: a download that never ends must fail the test quickly, not hang it.
TIMEOUT = 15


@pytest.fixture
def manager():
    """``make(**kwargs)``: a manager whose retry waits are recorded in ``waits``, not slept."""
    made: list[DownloadManager] = []
    waits: list[float] = []

    def sleep(stop: threading.Event, seconds: float) -> bool:
        waits.append(seconds)
        return stop.is_set()

    def make(**kwargs) -> DownloadManager:
        m = DownloadManager(retry_sleep=sleep, **kwargs)
        made.append(m)
        return m

    make.waits = waits
    yield make
    for m in made:
        m.shutdown()


@pytest.mark.parametrize("clean", [False, True], ids=["connection-drops", "clean-short-responses"])
def test_a_server_that_ignores_range_and_sends_short_bodies_fails_with_backoff(fake_hub, manager, clean):
    fake_hub.ignore_ranges = True
    fake_hub.short_bodies(WEIGHTS, 300_000, clean=clean)
    m = manager(max_retries=3, retry_wait_s=1.0)
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == FAILED, status
    # The first response got up to 300 kB (a dropped connection loses the chunk in
    # flight); every later one started over and got no further.
    gets = fake_hub.ranges(WEIGHTS)
    assert len(gets) == 4, gets                       # 1 + max_retries, then it gave up
    assert gets[0] is None and gets[1].startswith("bytes=") and len(set(gets[1:])) == 1, gets
    assert manager.waits == [1.0, 2.0, 4.0]           # exponential backoff between them
    msg = status.error
    assert "ignores" in msg and "Range" in msg and WEIGHTS in msg, msg
    assert "Retry" in msg and "continues where it stopped" not in msg, msg  # (it starts over)


def test_a_server_that_honours_range_but_cuts_every_response_still_finishes(fake_hub, manager):
    # Every response ends early, but each one adds to the file: that is progress, not a
    # failure, however few retries are allowed.
    fake_hub.short_bodies(WEIGHTS, 200_000)
    m = manager(max_retries=1, retry_wait_s=1.0)
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == DONE, status.error
    assert len(fake_hub.ranges(WEIGHTS)) > 3          # cut three times at least
    assert (Path(status.path) / WEIGHTS).read_bytes() == repo_files()[TINY][WEIGHTS]
    assert set(manager.waits) == {1.0}                # never more than the first wait


def test_a_server_that_sends_nothing_fails_without_blaming_range(fake_hub, manager):
    # Empty (but clean) responses: no progress at all, and Range is not the problem.
    fake_hub.short_bodies(WEIGHTS, 0, clean=True)
    m = manager(max_retries=2, retry_wait_s=0.5)
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == FAILED, status
    assert len(fake_hub.ranges(WEIGHTS)) == 3 and manager.waits == [0.5, 1.0]
    assert "ended" in status.error and WEIGHTS in status.error and "Range" not in status.error, status.error


def test_the_backoff_is_capped(fake_hub, manager):
    fake_hub.ignore_ranges = True
    fake_hub.short_bodies(WEIGHTS, 100_000)
    m = manager(max_retries=9, retry_wait_s=1.0)
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == FAILED
    assert manager.waits == [min(2.0 ** i, MAX_RETRY_WAIT_S) for i in range(9)]
    assert max(manager.waits) == MAX_RETRY_WAIT_S


def test_a_server_that_ignores_range_but_sends_the_whole_file_succeeds(fake_hub, manager):
    # One dropped connection, then a 200 with the whole file: started over once, done.
    fake_hub.ignore_ranges = True
    fake_hub.interrupt(WEIGHTS, after_bytes=300_000)
    m = manager(max_retries=1, retry_wait_s=1.0)
    status = m.wait(m.enqueue(TINY), TIMEOUT)
    assert status.state == DONE, status.error
    assert (Path(status.path) / WEIGHTS).read_bytes() == repo_files()[TINY][WEIGHTS]
