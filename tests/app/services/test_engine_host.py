"""The engine host with a real tiny engine (CPU, the torch attention backend): every event
of concurrent requests reaches every subscriber in order, pushed from the engine's thread;
a subscriber that raises is dropped and nothing else notices; the asyncio adapter."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from app.services.engine_host import EngineHost
from app.services.host_async import AsyncEngineHost
from app.services.host_events import ModelLoaded, RequestStarted, StatsUpdated
from engine.api import FinishedEvent, PromptProgressEvent, Request, SamplingParams, TokenEvent
from tests.app.services.host_recorder import Recorder

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def tiny_options(model) -> dict:
    return {"model": str(model), "device": "cpu", "attention": "torch", "dtype": "float32",
            "max_model_len": 256, "kv_cache_memory": "16MiB", "quantization": "none"}


def prompt(i: int) -> list[int]:
    return [(37 * i + 11 * n) % 49000 + 3 for n in range(5 + 7 * i)]


@pytest.fixture(scope="module")
def host(tiny_models):
    h = EngineHost()
    loaded = Recorder()
    unsubscribe = h.subscribe(loaded)
    h.load(tiny_options(tiny_models["llama-tied"]))
    loaded.wait_for(ModelLoaded)
    unsubscribe()
    yield h
    assert h.shutdown()


def expected(host, prompts) -> list:
    """What each request gives read from its engine handle (``result()``), one at a time."""
    return [host.engine.submit(Request(prompt_token_ids=p, params=GREEDY)).result() for p in prompts]


def request_events(recorder: Recorder, rid: str) -> list:
    return [e for e in recorder.of(rid) if not isinstance(e, StatsUpdated)]


def test_every_event_of_eight_concurrent_requests_reaches_two_subscribers_in_order(host):
    first, second = Recorder(), Recorder()
    unsubscribe = [host.subscribe(first), host.subscribe(second)]
    prompts = [prompt(i) for i in range(8)]
    try:
        rids = [host.submit(Request(prompt_token_ids=p, params=GREEDY, prompt_progress=True)) for p in prompts]
        for rec in (first, second):
            rec.wait(lambda evs: sum(isinstance(e, FinishedEvent) for e in evs) == 8)
    finally:
        for u in unsubscribe:
            u()
    want = expected(host, prompts)
    for rid, completion in zip(rids, want):
        seen = request_events(first, rid)
        assert seen == request_events(second, rid)  # the same events, in the same order
        started, *rest = seen
        assert isinstance(started, RequestStarted) and started.dropped == 0
        kinds = [type(e) for e in rest]
        tokens_from = kinds.index(TokenEvent)
        assert set(kinds[:tokens_from]) == {PromptProgressEvent}
        assert set(kinds[tokens_from:-1]) == {TokenEvent} and kinds[-1] is FinishedEvent  # exactly one end
        ids = [t for e in rest if isinstance(e, TokenEvent) for t in e.token_ids]
        text = "".join(e.text for e in rest if isinstance(e, TokenEvent))
        fin = rest[-1]
        assert ids == completion.token_ids and text == completion.text
        assert (fin.reason, fin.usage.completion_tokens) == (completion.finish_reason, 12)
    # Tokens are pushed by the engine's own thread, as they are produced (no polling).
    threads = {t for e, t in zip(first.events, first.threads) if isinstance(e, TokenEvent)}
    assert threads == {"hearth-engine"}


def test_a_subscriber_that_raises_is_dropped_and_the_rest_go_on(host, caplog):
    calls = []

    def broken(ev) -> None:
        calls.append(ev)
        raise RuntimeError("subscriber bug")

    before, after = Recorder(), Recorder()
    unsubscribe = [host.subscribe(before), host.subscribe(broken), host.subscribe(after)]
    try:
        with caplog.at_level(logging.ERROR, logger="hearth.host"):
            rids = [host.submit(Request(prompt_token_ids=prompt(i), params=GREEDY)) for i in range(3)]
            for rec in (before, after):
                rec.wait(lambda evs: sum(isinstance(e, FinishedEvent) for e in evs) == 3)
    finally:
        for u in unsubscribe:
            u()
    assert len(calls) == 1 and "subscriber failed" in caplog.text
    for rid in rids:
        assert request_events(before, rid) == request_events(after, rid)
        fin = request_events(after, rid)[-1]
        assert (fin.reason, fin.usage.completion_tokens, fin.error) == ("length", 12, None)


def test_the_asyncio_adapter_streams_each_request_on_the_event_loop(host):
    prompts = [prompt(i) for i in range(3)]

    async def main():
        loop = asyncio.get_running_loop()
        on_loop = []
        async with AsyncEngineHost(host) as client:
            streams = [client.submit(Request(prompt_token_ids=p, params=GREEDY)) for p in prompts]
            first = []
            async for ev in streams[0]:
                on_loop.append(asyncio.get_running_loop() is loop)
                first.append(ev)
            rest = await asyncio.gather(*(s.result() for s in streams[1:]))
            stopped = client.submit(Request(prompt_token_ids=prompts[0],
                                            params=SamplingParams(max_tokens=200, ignore_eos=True)))
            async for ev in stopped:
                if isinstance(ev, TokenEvent):
                    stopped.abort()
            return first, rest, ev, on_loop, client._queues

    first, rest, aborted, on_loop, left = asyncio.run(main())
    want = expected(host, prompts)
    assert isinstance(first[0], RequestStarted) and isinstance(first[-1], FinishedEvent)
    assert [t for e in first if isinstance(e, TokenEvent) for t in e.token_ids] == want[0].token_ids
    assert [(c.token_ids, c.finish_reason) for c in rest] == [(w.token_ids, w.finish_reason) for w in want[1:]]
    assert aborted.reason == "abort" and aborted.usage.completion_tokens < 200
    assert all(on_loop) and left == {}  # every request's route is gone with its end


def test_an_unload_after_answers_lets_the_running_answer_finish_and_can_be_taken_back(tiny_models):
    """A comparison takes the chat's model away: the answer being written ends as it would
    (not cut as 'abort'), then the model goes; taken back while it waits, the model stays."""
    from app.services.host_events import ModelUnloaded

    h = EngineHost()
    rec = Recorder()
    h.subscribe(rec)
    options = tiny_options(tiny_models["llama-tied"])
    long = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    try:
        h.load(options)
        rec.wait_for(ModelLoaded)
        rid = h.submit(Request(prompt_token_ids=prompt(3), params=long))
        rec.wait(lambda evs: any(isinstance(e, TokenEvent) and e.request_id == rid for e in evs))
        h.unload(after_answers=True)
        refused = h.submit(Request(prompt_token_ids=prompt(5), params=GREEDY))  # new ones can't hold it up
        rec.wait_for(ModelUnloaded)
        fin_refused = rec.wait(lambda evs: [e for e in evs if isinstance(e, FinishedEvent) and e.request_id == refused])[0]
        assert fin_refused.reason == "error" and "being unloaded for a comparison" in fin_refused.error
        ends = [(i, e) for i, e in enumerate(rec.events) if isinstance(e, FinishedEvent) and e.request_id == rid]
        unloaded_at = next(i for i, e in enumerate(rec.events) if isinstance(e, ModelUnloaded))
        ((at, fin),) = ends
        assert (fin.reason, fin.usage.completion_tokens) == ("length", 80) and at < unloaded_at
        h.load(options)
        rec.wait_for(ModelLoaded, count=2)
        rid = h.submit(Request(prompt_token_ids=prompt(4), params=long))
        rec.wait(lambda evs: any(isinstance(e, TokenEvent) and e.request_id == rid for e in evs))
        h.unload(after_answers=True)
        h.keep_loaded(options)
        rec.wait(lambda evs: any(isinstance(e, FinishedEvent) and e.request_id == rid for e in evs))
        assert h.engine is not None and sum(isinstance(e, ModelUnloaded) for e in rec.events) == 1
        assert sum(isinstance(e, ModelLoaded) for e in rec.events) == 2  # kept, not loaded again
    finally:
        assert h.shutdown()


def test_a_load_withdraws_an_unload_after_answers_and_a_refused_one_does_not(tiny_models):
    """A comparison's unload waits for the chat's answer; the user loads a model meanwhile.
    One refused at once (fp8 on the CPU) changes nothing: the unload still comes after the
    answer. One that goes ahead replaces the model instead: UnloadWithdrawn, no ModelUnloaded,
    and new requests are answered again (not refused as 'being unloaded')."""
    from app.services.host_events import LoadFailed, ModelLoading, ModelUnloaded, UnloadWithdrawn

    h = EngineHost()
    rec = Recorder()
    h.subscribe(rec)
    options = tiny_options(tiny_models["llama-tied"])
    long = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)

    def started(rid):
        rec.wait(lambda evs: any(isinstance(e, TokenEvent) and e.request_id == rid for e in evs))

    def finished(rid):
        return rec.wait(lambda evs: [e for e in evs if isinstance(e, FinishedEvent) and e.request_id == rid])[0]

    def held_answer(rid) -> threading.Event:
        """The answer is running and can't end (its engine waits after each step) until the
        event returned is set: the unload surely waits for it, however slow the machine."""
        started(rid)
        gate = threading.Event()
        h.engine.add_step_listener(lambda _info: gate.wait(60))
        return gate

    try:
        h.load(options)
        rec.wait_for(ModelLoaded)
        rid = h.submit(Request(prompt_token_ids=prompt(3), params=long))
        gate = held_answer(rid)
        h.unload(after_answers=True)
        h.load(dict(options, quantization="fp8"))  # refused before anything changes
        (failed,) = rec.wait_for(LoadFailed)
        assert "fp8" in failed.message, failed
        gate.set()
        rec.wait_for(ModelUnloaded)
        fin = finished(rid)
        assert fin.reason == "length"  # it ended as it would, then the model went:
        order = [e for e in rec.events if isinstance(e, (LoadFailed, ModelUnloaded)) or e is fin]
        assert [type(e) for e in order] == [LoadFailed, FinishedEvent, ModelUnloaded], order  # refused while it waited
        assert not any(isinstance(e, UnloadWithdrawn) for e in rec.events)
        h.load(options)
        rec.wait_for(ModelLoaded, count=2)
        rid = h.submit(Request(prompt_token_ids=prompt(4), params=long))
        gate = held_answer(rid)
        h.unload(after_answers=True)
        h.load(dict(options, max_model_len=128))  # the user's load for the chat, while it waits
        rec.wait_for(UnloadWithdrawn)
        gate.set()
        rec.wait_for(ModelLoaded, count=3)
        assert sum(isinstance(e, ModelUnloaded) for e in rec.events) == 1
        (withdrawn,) = [e for e in rec.events if isinstance(e, UnloadWithdrawn)]
        assert withdrawn.name.startswith("tiny-llama-tied"), withdrawn
        assert sum(isinstance(e, ModelLoading) for e in rec.events) == 3 and h.engine.max_model_len == 128
        after = h.submit(Request(prompt_token_ids=prompt(1), params=GREEDY))
        assert finished(after).reason == "length", finished(after)
    finally:
        assert h.shutdown()


def test_an_unload_after_answers_cuts_an_answer_that_runs_too_long(tiny_models):
    from app.services.host_events import ModelUnloaded

    h = EngineHost(answer_wait_s=0.02)
    rec = Recorder()
    h.subscribe(rec)
    try:
        h.load(tiny_options(tiny_models["llama-tied"]))
        rec.wait_for(ModelLoaded)
        rid = h.submit(Request(prompt_token_ids=prompt(3), params=SamplingParams(max_tokens=200, temperature=0.0,
                                                                                 ignore_eos=True)))
        rec.wait(lambda evs: any(isinstance(e, TokenEvent) and e.request_id == rid for e in evs))
        h.unload(after_answers=True)
        rec.wait_for(ModelUnloaded)
        fin = rec.wait(lambda evs: [e for e in evs if isinstance(e, FinishedEvent) and e.request_id == rid])[0]
        assert fin.reason == "error" and "unloaded for a comparison" in fin.error
    finally:
        assert h.shutdown()


def test_an_engine_that_dies_is_said_once_and_a_new_load_answers(tiny_models, monkeypatch):
    """A step that ends the engine (a tensor-parallel rank that ended) fails its request and
    every later one with the reason, the host says it once as an EngineError (the window's
    status bar), and loading the model again answers."""
    from app.services.host_events import EngineError
    from engine.runner.model_runner import ModelRunner
    from tests.engine.rank_ended import WHY, end_steps

    h = EngineHost(stats_interval_s=0.01)
    rec = Recorder()
    h.subscribe(rec)
    try:
        h.load(tiny_options(tiny_models["llama-tied"]))
        rec.wait_for(ModelLoaded)
        plain = end_steps(monkeypatch)
        first = h.submit(Request(prompt_token_ids=prompt(1), params=GREEDY))
        rec.finished(first)
        later = h.submit(Request(prompt_token_ids=prompt(2), params=GREEDY))
        rec.finished(later)
        rec.wait_for(EngineError)
        for rid in (first, later):
            (fin,) = [e for e in rec.of(rid) if isinstance(e, FinishedEvent)]
            assert fin.reason == "error" and fin.error == WHY
        threading.Event().wait(0.2)  # stats ticks go on: the death is said once
        assert [e.message for e in rec.events if isinstance(e, EngineError)] == [WHY]
        monkeypatch.setattr(ModelRunner, "execute", plain)
        h.load(tiny_options(tiny_models["llama-tied"]))
        rec.wait(lambda evs: sum(isinstance(e, ModelLoaded) for e in evs) == 2)
        again = h.submit(Request(prompt_token_ids=prompt(3), params=GREEDY))
        rec.finished(again)
        (fin,) = [e for e in rec.of(again) if isinstance(e, FinishedEvent)]
        assert fin.reason == "length" and fin.usage.completion_tokens == 12
    finally:
        assert h.shutdown()
