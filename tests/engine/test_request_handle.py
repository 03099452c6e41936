"""``RequestHandle.result()``: the same Completion when called again (from any thread), and a
clear error rather than a truncated answer once events were read another way."""

from __future__ import annotations

import queue
import threading

import pytest

from engine.events import FinishedEvent, Timings, TokenEvent, Usage
from engine.requests import RequestHandle


def _handle() -> RequestHandle:
    events: queue.Queue = queue.Queue()
    for text, tid in (("Hello", 1), (" world", 2)):
        events.put(TokenEvent("r", text, (tid,)))
    events.put(FinishedEvent("r", "stop", Usage(3, 2), Timings(0.0, 1.0, 1.0, 1.0, 2.0)))
    return RequestHandle("r", events, engine=None)


def test_result_twice_and_from_two_threads_is_the_same_completion():
    h = _handle()
    got = []
    threads = [threading.Thread(target=lambda: got.append(h.result())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert got[0] is got[1] is h.result() and got[0].text == "Hello world" and got[0].token_ids == [1, 2]


@pytest.mark.parametrize("read", ["iterate", "poll"])
def test_result_after_events_were_read_says_so(read):
    h = _handle()
    if read == "iterate":
        next(iter(h))
    else:
        h.poll()
    with pytest.raises(RuntimeError, match="already read"):
        h.result()
