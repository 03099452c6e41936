"""``Engine.submit(request, on_event=…)``: a request's events pushed to a callback on the
engine's thread as they are produced (what the engine host and, through it, the desktop
app and the server use instead of polling the handle)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from engine.api import Engine, FinishedEvent, Request, TokenEvent
from tests.engine.test_step_listener import engine, greedy  # noqa: F401 - the same tiny engine fixture

TIMEOUT_S = 60


def wait_until(predicate, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Collector:
    """An on_event callback that records the events and the thread each came on."""

    def __init__(self) -> None:
        self.events: list = []
        self.threads: set[str] = set()
        self.finished = threading.Event()

    def __call__(self, ev) -> None:
        self.events.append(ev)
        self.threads.add(threading.current_thread().name)
        if isinstance(ev, FinishedEvent):
            self.finished.set()


def test_pushed_events_are_the_ones_a_handle_gives_in_order_on_the_engine_thread(engine):
    prompts = [list(range(10 + i, 20 + 2 * i)) for i in range(4)]
    expected = [engine.submit(Request(prompt_token_ids=p, params=greedy(6))).result() for p in prompts]
    collectors = [Collector() for _ in prompts]
    handles = [engine.submit(Request(prompt_token_ids=p, params=greedy(6), prompt_progress=True), on_event=c)
               for p, c in zip(prompts, collectors)]
    for c, h, want in zip(collectors, handles, expected):
        assert c.finished.wait(TIMEOUT_S)
        kinds = [type(e).__name__ for e in c.events]
        first_token = kinds.index("TokenEvent")
        assert set(kinds[:first_token]) == {"PromptProgressEvent"}  # progress, then tokens ...
        assert set(kinds[first_token:-1]) == {"TokenEvent"} and kinds[-1] == "FinishedEvent"  # ... then one end
        ids = [t for e in c.events if isinstance(e, TokenEvent) for t in e.token_ids]
        fin = c.events[-1]
        assert ids == want.token_ids and fin.reason == want.finish_reason == "length"
        assert fin.usage.completion_tokens == 6 and fin.request_id == h.request_id
        assert c.threads == {"hearth-engine"}  # pushed by the engine's loop thread itself
        assert h.done


def test_a_handle_with_a_callback_can_not_also_be_read(engine):
    c = Collector()
    handle = engine.submit(Request(prompt_token_ids=[1, 2, 3], params=greedy(2)), on_event=c)
    assert c.finished.wait(TIMEOUT_S)
    for read in (handle.result, handle.poll, lambda: next(iter(handle))):
        with pytest.raises(RuntimeError, match="on_event callback"):
            read()


def test_a_callback_that_raises_ends_its_request_and_nothing_else(engine, caplog):
    calls = []

    def broken(ev) -> None:
        calls.append(ev)
        raise RuntimeError("subscriber bug")

    other = Collector()
    with caplog.at_level(logging.ERROR, logger="hearth.engine"):
        bad = engine.submit(Request(prompt_token_ids=list(range(5, 15)), params=greedy(40)), on_event=broken)
        good = engine.submit(Request(prompt_token_ids=list(range(7, 12)), params=greedy(8)), on_event=other)
        assert other.finished.wait(TIMEOUT_S)
        # The broken callback was called once, then no more; its request was aborted (its
        # KV blocks freed), not left generating its 40 tokens for no one.
        wait_until(lambda: bad.done and engine.stats().num_running == 0)
    assert len(calls) == 1 and engine.stats().kv_blocks_used == 0
    assert "event callback of request" in caplog.text
    fin = other.events[-1]
    assert (fin.reason, fin.usage.completion_tokens, fin.error) == ("length", 8, None)
    assert good.done
    (after,) = engine.generate([Request(prompt_token_ids=[5, 6, 7], params=greedy(3))])
    assert (after.finish_reason, after.completion_tokens) == ("length", 3)


def test_shutdown_pushes_each_unfinished_request_its_end():
    eng = Engine.load("shape:tiny", device="cpu", max_model_len=64, block_size=16)
    c = Collector()
    gate = threading.Event()
    real_step = eng.step
    eng.step = lambda: (gate.wait(TIMEOUT_S), real_step())[1]  # hold the engine mid-request
    eng.submit(Request(prompt_token_ids=list(range(3, 13)), params=greedy(30)), on_event=c)
    threading.Timer(0.2, gate.set).start()
    eng.shutdown()
    gate.set()
    assert c.finished.is_set()
    fin = c.events[-1]
    assert isinstance(fin, FinishedEvent) and fin.reason == "abort" and fin.error == "engine shut down"
    assert sum(isinstance(e, FinishedEvent) for e in c.events) == 1
