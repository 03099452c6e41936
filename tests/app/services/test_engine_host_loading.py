"""The engine host's loading, without Qt (FakeEngines; the desktop app's side of the same
rules is tests/app/gui/test_bridge_loading.py): the loaded model serves until the new one
is ready and its answers have finished; one unloaded to make room comes back when the
load fails; a superseded load is not a failure; cancel and shutdown end a load at once."""

from __future__ import annotations

import threading

import pytest

from app.services.engine_host import EngineHost
from app.services.host_events import (LoadFailed, LoadProgress, LoadSuperseded, ModelLoaded, ModelLoading,
                                      ModelUnloaded, RequestStarted, StatsUpdated)
from app.services.host_loading import LOAD_CANCELLED
from engine.api import (FinishedEvent, InvalidRequestError, LoadCancelledError, ModelCheck, OutOfMemoryError, Request,
                        SamplingParams)
from tests.app.services.fake_engine import fake_loads
from tests.app.services.host_recorder import Recorder

LOADS = (ModelLoading, ModelLoaded, LoadFailed, LoadSuperseded, ModelUnloaded, FinishedEvent)


@pytest.fixture
def fake_host():
    """A host over FakeEngines (``fake_loads``: ``host.state`` says what the loads did and
    makes them fail, wait or not fit); ``host.rec`` records its events."""
    state: dict = {}
    factory, check = fake_loads(state)
    host = EngineHost(factory, check, answer_wait_s=60)
    host.state, host.rec = state, Recorder()
    host.subscribe(host.rec)
    yield host
    state["gate"].set()
    assert host.shutdown()


def load(host, model: str, **options) -> dict:
    done = len([e for e in host.rec.events if isinstance(e, ModelLoaded)])
    host.load(dict(model=model, quantization="none", **options))
    return host.rec.wait_for(ModelLoaded, done + 1)[-1].info


def ask(host, text: str = "Hello", max_tokens: int = 5) -> str:
    return host.submit(Request(prompt=text, params=SamplingParams(max_tokens=max_tokens)))


def outcomes(rec: Recorder, since: int = 0) -> list:
    """The load and request outcomes among the events from ``since`` on, as (name, detail)."""
    out = []
    for e in rec.events[since:]:
        if isinstance(e, LOADS):
            detail = {ModelLoading: "name", ModelLoaded: "info", LoadFailed: "message", LoadSuperseded: "name",
                      FinishedEvent: "reason"}.get(type(e))
            value = getattr(e, detail) if detail else None
            out.append((type(e).__name__, value.name if isinstance(e, ModelLoaded) else value))
    return out


def test_a_swap_waits_for_the_answer_being_written_on_the_old_model(fake_host):
    load(fake_host, "acme/a")
    old = fake_host.state["made"][0]
    rid = ask(fake_host)
    fake_host.rec.wait_for(RequestStarted)
    since = len(fake_host.rec.events)
    fake_host.load(dict(model="acme/b", quantization="none", device="cpu"))
    fake_host.rec.wait(lambda evs: any(isinstance(e, LoadProgress) and "switching once the answer" in e.message
                                       for e in evs))
    assert fake_host.model_info.name == "acme/a" and not old.shut_down  # B is ready and waits
    old.write(rid, "Once upon a time")
    old.finish(rid)
    fake_host.rec.wait_for(ModelLoaded, 2)
    assert outcomes(fake_host.rec, since) == [("ModelLoading", "acme/b"), ("FinishedEvent", "length"),
                                              ("ModelLoaded", "acme/b")]
    assert old.shut_down and fake_host.model_info.name == "acme/b"


def test_a_swap_cuts_an_answer_that_runs_too_long_with_an_error_saying_why():
    state: dict = {}
    host = EngineHost(*fake_loads(state), answer_wait_s=0.2)
    rec = Recorder()
    host.subscribe(rec)
    try:
        load_with = dict(quantization="none", device="cpu")
        host.load(dict(model="acme/a", **load_with))
        rec.wait_for(ModelLoaded)
        rid = ask(host, max_tokens=50)
        rec.wait_for(RequestStarted)
        state["made"][0].write(rid, "and on")
        host.load(dict(model="acme/b", **load_with))
        rec.wait_for(ModelLoaded, 2)
        fin = rec.finished(rid)
        assert fin.reason == "error" and "cut off" in fin.error and "acme/b took over from acme/a" in fin.error
        assert state["made"][0].shut_down
        assert [type(e) for e in rec.of(rid)].count(FinishedEvent) == 1  # the engine's own end is not passed on
    finally:
        assert host.shutdown()


def test_on_one_gpu_the_old_model_makes_room_and_comes_back_when_the_new_one_fails(fake_host):
    load(fake_host, "acme/working", dtype="float16", max_model_len=4096)
    since = len(fake_host.rec.events)
    fake_host.state["fail"]["acme/huge"] = OutOfMemoryError("the weights need 80 GiB")
    fake_host.load(dict(model="acme/huge", quantization="none"))
    back = fake_host.rec.wait_for(ModelLoaded, 2)[-1]
    assert fake_host.state["old_shut_when_loading"][1] == [True]  # unloaded before loading
    assert fake_host.state["loads"][-1] == ("acme/working", {"dtype": "float16", "max_model_len": 4096,
                                                             "quantization": "none", "device": "auto"})
    assert outcomes(fake_host.rec, since) == [
        ("ModelLoading", "acme/huge"), ("ModelUnloaded", None), ("ModelLoading", "acme/huge"),
        ("ModelLoading", "acme/working"),
        ("LoadFailed", "Loading acme/huge failed: the weights need 80 GiB. acme/working was loaded again."),
        ("ModelLoaded", "acme/working")]
    assert back.reloaded and back.info.name == "acme/working" and fake_host.model_info.name == "acme/working"


def test_a_superseded_load_is_not_a_failure_and_the_last_one_loads(fake_host):
    fake_host.state["gated"].update({"acme/a", "acme/b", "acme/c"})
    fake_host.load(dict(model="acme/a", quantization="none"))
    fake_host.rec.wait_for(ModelLoading)
    fake_host.load(dict(model="acme/b", quantization="none"))
    fake_host.load(dict(model="acme/c", quantization="none"))
    fake_host.rec.wait_for(ModelLoading, 2)
    fake_host.state["gate"].set()
    fake_host.rec.wait_for(ModelLoaded)
    names = outcomes(fake_host.rec)
    assert sorted(n for kind, n in names if kind == "LoadSuperseded") == ["acme/a", "acme/b"]
    assert "LoadFailed" not in [kind for kind, _ in names] and names[-1] == ("ModelLoaded", "acme/c")
    assert [e.model_info.name for e in fake_host.state["made"]] == ["acme/c"]


def test_cancelling_while_the_new_model_waits_for_an_answer_keeps_the_old_one(fake_host):
    load(fake_host, "acme/a")
    old = fake_host.state["made"][0]
    rid = ask(fake_host)
    fake_host.rec.wait_for(RequestStarted)
    fake_host.load(dict(model="acme/b", quantization="none", device="cpu"))
    fake_host.rec.wait(lambda evs: any(isinstance(e, LoadProgress) and "switching once" in e.message for e in evs))
    fake_host.cancel_load()
    assert fake_host.rec.wait_for(LoadFailed)[0].message == LOAD_CANCELLED
    assert fake_host.state["made"][1].shut_down and not old.shut_down
    old.finish(rid)
    assert fake_host.rec.finished(rid).reason == "length" and fake_host.model_info.name == "acme/a"


def test_a_request_sent_as_the_old_model_makes_room_is_answered_by_the_new_one(fake_host):
    load(fake_host, "acme/a")
    fake_host.state["gated"].add("acme/b")
    fake_host.load(dict(model="acme/b", quantization="none"))
    fake_host.rec.wait_for(ModelUnloaded)
    rid, stopped = ask(fake_host), ask(fake_host, "Never mind")
    fake_host.abort(stopped)
    assert fake_host.rec.finished(stopped).reason == "abort"
    fake_host.state["gate"].set()
    started = fake_host.rec.wait_for(RequestStarted)[0]
    assert (started.request_id, started.model, started.dropped) == (rid, "acme/b", 0)
    fake_host.state["made"][-1].finish(rid)
    assert fake_host.rec.finished(rid).reason == "length"


def test_a_request_with_no_model_and_none_loading_ends_with_an_error(fake_host):
    rid = ask(fake_host)
    fin = fake_host.rec.finished(rid)
    assert fin.reason == "error" and "no model is loaded" in fin.error


def test_stats_are_pushed_while_a_model_is_loaded():
    state: dict = {}
    host = EngineHost(*fake_loads(state), stats_interval_s=0.01)
    rec = Recorder()
    host.subscribe(rec)
    try:
        host.load(dict(model="acme/a", quantization="none"))
        rec.wait_for(StatsUpdated, 3)  # once at the swap, then on the timer
    finally:
        assert host.shutdown()


def test_quitting_during_a_load_stops_it_without_waiting_for_it(monkeypatch):
    """Shutdown cancels the load; one that can't stop (a download in progress) is left
    behind rather than holding the app up."""
    import app.services.engine_host as host_module

    # Long enough for the cooperative load to see the cancel on a busy 2-core machine
    # (it polls every 10 ms), far shorter than the stuck one's 30 s.
    monkeypatch.setattr(host_module, "LOAD_JOIN_TIMEOUT_S", 3)
    started, never = threading.Event(), threading.Event()

    def factory(model, progress=None, should_stop=None, **_):
        started.set()
        if model == "acme/stuck":
            never.wait(30)  # checks nothing, like a download
            return None
        while not should_stop():  # as the bring-up between weight tensors
            never.wait(0.01)
        raise LoadCancelledError("loading cancelled")

    for model in ("acme/cooperative", "acme/stuck"):
        started.clear()
        host = EngineHost(factory, lambda m, device=None, **_: ModelCheck(m, "cpu", 1, 1, 10, True))
        host.load(dict(model=model, quantization="none"))
        assert started.wait(60)
        assert host.shutdown()
        assert host._load_thread is not None and host._load_thread.is_alive() == (model == "acme/stuck")
    never.set()


class _Crash(BaseException):
    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_load_that_dies_of_a_base_exception_still_ends(fake_host):
    """The result is posted in a finally, so the next load can run."""
    fake_host.state["fail"]["acme/crash"] = _Crash()
    fake_host.load(dict(model="acme/crash", quantization="none"))
    assert "unexpectedly" in fake_host.rec.wait_for(LoadFailed)[0].message
    assert load(fake_host, "acme/next").name == "acme/next"


def test_a_quantization_that_is_not_there_yet_is_refused(fake_host, monkeypatch):
    """A planned choice (listed with the reason it can't run) is refused with that reason."""
    from engine import choices

    monkeypatch.setitem(choices._REGISTRY, "quantization", dict(choices._REGISTRY["quantization"]))
    choices.register(choices.Choice("quantization", "planned-q", "a planned quantization", ("pq",),
                                    bytes_per_param=1, check=choices._not_yet))
    fake_host.load(dict(model="acme/a", quantization="pq"))
    message = fake_host.rec.wait_for(LoadFailed)[0].message
    assert "'planned-q' can't be used here" in message and "not implemented yet" in message


def test_the_host_asks_the_choices_registry_not_a_list_of_its_own(fake_host, monkeypatch):
    """A quantization the registry says can run here loads (the next issue registers
    them): the host keeps no rule of its own."""
    from engine import choices

    monkeypatch.setitem(choices._REGISTRY, "quantization", dict(choices._REGISTRY["quantization"]))
    choices.register(choices.Choice("quantization", "test-q", "a test quantization", bytes_per_param=1))
    fake_host.load(dict(model="acme/a", quantization="test-q"))
    assert fake_host.rec.wait_for(ModelLoaded)[0].info.name == "acme/a"
    assert not [e for e in fake_host.rec.events if isinstance(e, LoadFailed)]


def test_a_request_id_in_use_is_refused_without_touching_the_live_request(fake_host):
    """Its events would be taken for the live request's: the second submit is refused."""
    load(fake_host, "acme/a")
    rid = fake_host.submit(Request(prompt="Hello", request_id="mine", params=SamplingParams(max_tokens=5)))
    fake_host.rec.wait(lambda evs: fake_host.rec.of(rid))
    with pytest.raises(InvalidRequestError, match="already in use"):
        fake_host.submit(Request(prompt="Again", request_id="mine", params=SamplingParams(max_tokens=5)))
    assert not [e for e in fake_host.rec.of(rid) if isinstance(e, FinishedEvent)]
