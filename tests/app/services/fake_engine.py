"""A stand-in for ``engine.api.Engine`` for the engine host's tests (and the bridge's): no
model, no thread; its requests answer only when the test says so (``write``, ``finish``),
pushing their events to the ``on_event`` callback the host submits with, as the real
engine does."""

from __future__ import annotations

import threading

from engine.api import FinishedEvent, ModelCheck, Timings, TokenEvent, Usage
from tests.app.model_info_fixtures import fake_info


def finished(rid: str, reason: str, error: str | None = None) -> FinishedEvent:
    return FinishedEvent(rid, reason, Usage(1, 2), Timings(0, 1, 1, 1, 2), error=error)


class FakeHandle:
    """A request's events, pushed by the test (any thread) to the host's callback."""

    def __init__(self, rid: str, on_event) -> None:
        self.request_id = rid
        self._on_event = on_event
        self.dropped_messages = 0
        self.ended = False  # a FinishedEvent was pushed
        self._lock = threading.Lock()  # one event at a time, as from the engine's one thread

    def push(self, ev) -> None:
        with self._lock:
            if self.ended:
                return
            self.ended = isinstance(ev, FinishedEvent)
            self._on_event(ev)

    @property
    def done(self) -> bool:
        return self.ended


class FakeEngine:
    """Just enough of Engine for the host."""

    def __init__(self, model: str, device: str) -> None:
        self.model_info = fake_info(model, path=model, device=device, weight_bytes=1000, kv_cache_bytes=100)
        self.max_model_len = 256
        self.shut_down = False
        self.handles: dict[str, FakeHandle] = {}
        self.requests: dict[str, object] = {}

    def submit(self, request, on_event=None) -> FakeHandle:
        self.requests[request.request_id] = request
        handle = self.handles[request.request_id] = FakeHandle(request.request_id, on_event)
        return handle

    def abort(self, rid: str) -> None:
        handle = self.handles.get(rid)
        if handle is not None:
            handle.push(finished(rid, "abort"))

    def write(self, rid: str, text: str) -> None:
        self.handles[rid].push(TokenEvent(rid, text, (1,)))

    def finish(self, rid: str) -> None:
        self.handles[rid].push(finished(rid, "length"))

    def shutdown(self) -> None:
        self.shut_down = True
        for rid, handle in self.handles.items():  # as Engine.shutdown does
            handle.push(finished(rid, "abort", "engine shut down"))

    def stats(self):
        return None


def device_of(device: str | None) -> str:
    return "cuda:0" if device in (None, "auto", "cuda") else device


def fake_loads(state: dict):
    """(engine_factory, model_check) over FakeEngines on ``cuda:0`` (or the device asked
    for), recording in ``state``: ``made`` the engines, ``checked`` the models checked
    first, ``loads`` each load's model and options; ``fail`` / ``fail_check`` map a model to
    the error its load / check raises; a model in ``gated`` waits for ``gate`` (checking
    for a cancel meanwhile); a model in ``too_big`` doesn't fit beside one on the CPU."""
    for key, value in (("made", []), ("checked", []), ("fail", {}), ("fail_check", {}), ("gated", set()),
                       ("gate", threading.Event()), ("too_big", set()), ("old_shut_when_loading", []),
                       ("loads", [])):
        state.setdefault(key, value)

    def factory(model, progress=None, device="auto", should_stop=None, **options):
        state["loads"].append((model, dict(options, device=device)))
        if model in state["gated"]:
            while not state["gate"].wait(0.01):
                progress("waiting for the test")
        state["old_shut_when_loading"].append([e.shut_down for e in state["made"]])
        if model in state["fail"]:
            raise state["fail"][model]
        engine = FakeEngine(model, device_of(device))
        state["made"].append(engine)
        return engine

    def check(model, revision=None, progress=None, loaded_device=None, loaded_bytes=0, device=None, **choices):
        state["checked"].append(model)
        state["check_choices"] = dict(choices, **({"device": device} if device else {}))
        state["check_loaded"] = (loaded_device, loaded_bytes)
        if model in state["fail_check"]:
            raise state["fail_check"][model]
        where = device_of(device)
        same = loaded_device == where
        fits = not same or (where == "cpu" and model not in state["too_big"])
        return ModelCheck(model, where, 3 * 2**30, 2**30, 2**30, fits)

    return factory, check
