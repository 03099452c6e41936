"""EngineBridge loading: the loaded model serves until the new one is ready (and until
the answers being written on it have finished), and stays when a load fails or is
cancelled; it is unloaded first only where check_model says the new one won't fit beside
it (the same GPU; too little RAM); a superseded load is not a failure. (The engine host
holds these rules: tests/app/services/test_engine_host_loading.py tests them without Qt,
and that quitting during a load doesn't wait for it.)"""

from __future__ import annotations

import threading

import pytest

from engine.api import Engine, InvalidRequestError, ModelCheck, ModelLoadError, OutOfMemoryError, SamplingParams
from tests.app.gui.conftest import load_options
from tests.app.services.fake_engine import FakeEngine, device_of, fake_loads

LOAD_TIMEOUT = 60_000
CUT = "cut off"


def one_card_bridge(gated: set, fail: dict, gate: threading.Event):
    """A bridge over FakeEngines on one device where no model loads beside another (as on
    one GPU): the loaded one is always unloaded first. A model in ``gated`` waits for
    ``gate``; one in ``fail`` raises that error."""
    from app.gui.bridge import EngineBridge

    def factory(model, progress=None, device="cpu", should_stop=None, **_):
        while model in gated and not gate.wait(0.01):
            progress("waiting for the test")
        if model in fail:
            raise fail[model]
        return FakeEngine(model, device)

    def check(model, loaded_device=None, device="cpu", **_):
        return ModelCheck(model, device, 1, 1, 1, loaded_device is None)

    return EngineBridge(engine_factory=factory, model_check=check)


def _record(bridge) -> list:
    events = []
    for name in ("modelLoading", "modelLoaded", "loadFailed", "loadSuperseded", "modelUnloaded",
                 "requestFinished"):
        getattr(bridge, name).connect(lambda *args, n=name: events.append((n, *args)))
    return events


@pytest.fixture
def fake_bridge(qtbot):
    """A bridge over FakeEngines (``tests.app.services.fake_engine.fake_loads``: its
    ``state`` says what the loads did and makes them fail, wait or not fit)."""
    from app.gui.bridge import EngineBridge

    state: dict = {}
    factory, check = fake_loads(state)
    b = EngineBridge(engine_factory=factory, model_check=check, answer_wait_s=60)
    b.state = state
    yield b
    state["gate"].set()
    b.shutdown()


def _load(qtbot, bridge, model, **over):
    with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT) as loaded:
        bridge.load(dict(model=model, quantization="none", **over))
    return loaded.args[0]


def test_a_model_that_can_not_load_on_the_gpu_is_found_out_before_the_old_one_goes(qtbot, fake_bridge):
    _load(qtbot, fake_bridge, "acme/working")
    events = _record(fake_bridge)
    fake_bridge.state["fail_check"]["acme/no-tokenizer"] = ModelLoadError("no tokenizer in acme/no-tokenizer")
    with qtbot.waitSignal(fake_bridge.loadFailed, timeout=LOAD_TIMEOUT) as failed:
        fake_bridge.load(dict(model="acme/no-tokenizer", quantization="none"))
    assert "no tokenizer" in failed.args[0]
    assert [e[0] for e in events] == ["modelLoading", "loadFailed"]  # never unloaded
    old = fake_bridge.state["made"][0]
    assert not old.shut_down and fake_bridge.model_info.name == "acme/working"
    assert not fake_bridge.is_loading


def test_on_one_gpu_the_old_model_makes_room_and_comes_back_when_the_new_one_fails(qtbot, fake_bridge):
    """Issue 11 item 2, review 2 finding 6: a load that fails after the working model was
    unloaded for it (a KV cache that doesn't fit, a damaged file) loads that model again
    with its own options, and the one failure says both."""
    _load(qtbot, fake_bridge, "acme/working", dtype="float16", max_model_len=4096)
    events = _record(fake_bridge)
    fake_bridge.state["fail"]["acme/huge"] = OutOfMemoryError("the weights need 80 GiB")
    with qtbot.waitSignal(fake_bridge.modelLoaded, timeout=LOAD_TIMEOUT) as back:
        fake_bridge.load(dict(model="acme/huge", quantization="none"))
    assert fake_bridge.state["checked"] == ["acme/working", "acme/huge", "acme/working"]
    assert fake_bridge.state["old_shut_when_loading"][1] == [True]  # unloaded before loading
    assert fake_bridge.state["loads"][-1] == ("acme/working", {"dtype": "float16", "max_model_len": 4096,
                                                               "quantization": "none", "device": "auto"})
    names = [e[0] for e in events]
    assert names == ["modelLoading", "modelUnloaded", "modelLoading", "modelLoading", "loadFailed", "modelLoaded"]
    assert [e[1] for e in events if e[0] == "modelLoading"] == ["acme/huge", "acme/huge", "acme/working"]
    failed = next(e[1] for e in events if e[0] == "loadFailed")
    assert failed == "Loading acme/huge failed: the weights need 80 GiB. acme/working was loaded again."
    assert back.args[0].name == "acme/working" and back.args[1]
    assert fake_bridge.model_info.name == "acme/working" and not fake_bridge.is_loading


def test_when_the_old_model_can_not_come_back_either_both_failures_are_told(qtbot, fake_bridge):
    """Nothing then serves: a request sent meanwhile ends with an error, the next load
    starts from nothing."""
    _load(qtbot, fake_bridge, "acme/working")
    state = fake_bridge.state
    state["gated"].add("acme/huge")
    state["fail"].update({"acme/huge": OutOfMemoryError("the weights need 80 GiB"),
                          "acme/working": ModelLoadError("acme/working's files are gone")})
    events = _record(fake_bridge)
    with qtbot.waitSignal(fake_bridge.modelUnloaded, timeout=LOAD_TIMEOUT):
        fake_bridge.load(dict(model="acme/huge", quantization="none"))
    rid = fake_bridge.submit(prompt="Anyone there?", params=SamplingParams(max_tokens=5))
    with qtbot.waitSignal(fake_bridge.loadFailed, timeout=LOAD_TIMEOUT) as failed:
        state["gate"].set()
    assert failed.args[0] == ("Loading acme/huge failed: the weights need 80 GiB. Loading acme/working again "
                              "failed too: acme/working's files are gone. Load a model from the Library.")
    assert fake_bridge.model_info is None and not fake_bridge.is_loading
    qtbot.waitUntil(lambda: any(e[0] == "requestFinished" for e in events), timeout=LOAD_TIMEOUT)
    ended = next(e for e in events if e[0] == "requestFinished")
    assert ended[1] == rid and ended[2].reason == "error" and "no model is loaded" in ended[2].error
    assert _load(qtbot, fake_bridge, "acme/next").name == "acme/next"
    assert [e[0] for e in events].count("modelLoaded") == 1  # acme/next's alone


def test_a_load_that_replaced_one_after_the_old_model_made_room_brings_it_back_if_it_fails(qtbot, fake_bridge):
    _load(qtbot, fake_bridge, "acme/working")
    state = fake_bridge.state
    state["gated"].add("acme/a")
    state["fail"]["acme/b"] = ModelLoadError("acme/b has no tokenizer")
    events = _record(fake_bridge)
    with qtbot.waitSignal(fake_bridge.modelUnloaded, timeout=LOAD_TIMEOUT):
        fake_bridge.load(dict(model="acme/a", quantization="none"))
    with qtbot.waitSignal(fake_bridge.modelLoaded, timeout=LOAD_TIMEOUT) as back:
        fake_bridge.load(dict(model="acme/b", quantization="none"))
    assert back.args[0].name == "acme/working" and back.args[1]
    ends = [e for e in events if e[0] in ("loadSuperseded", "loadFailed")]
    assert ends == [("loadSuperseded", "acme/a"),
                    ("loadFailed", "Loading acme/b failed: acme/b has no tokenizer. acme/working was loaded again.")]
    assert not fake_bridge.is_loading


def test_cancelling_while_the_old_model_comes_back_leaves_none(qtbot, fake_bridge):
    _load(qtbot, fake_bridge, "acme/working")
    state = fake_bridge.state
    state["gated"].add("acme/working")  # its second load waits for the test
    state["fail"]["acme/huge"] = OutOfMemoryError("the weights need 80 GiB")
    progress = []
    fake_bridge.loadProgress.connect(progress.append)
    fake_bridge.load(dict(model="acme/huge", quantization="none"))
    reloading = "Loading acme/huge failed: the weights need 80 GiB. Loading acme/working again…"
    qtbot.waitUntil(lambda: reloading in progress, timeout=LOAD_TIMEOUT)
    with qtbot.waitSignal(fake_bridge.loadFailed, timeout=LOAD_TIMEOUT) as failed:
        fake_bridge.cancel_load()
    assert failed.args[0] == ("Loading acme/huge failed: the weights need 80 GiB. Loading acme/working again was "
                              "cancelled: load a model from the Library.")
    assert fake_bridge.model_info is None and not fake_bridge.is_loading


def test_a_request_sent_as_the_old_model_makes_room_is_answered_by_the_new_one(qtbot, fake_bridge):
    """Review 2, swap-time races: the worker holds it for the model being loaded (it was
    refused with "no model is loaded"), and requestStarted names the model that answers."""
    _load(qtbot, fake_bridge, "acme/a")
    state = fake_bridge.state
    state["gated"].add("acme/b")
    events = _record(fake_bridge)
    started = []
    fake_bridge.requestStarted.connect(lambda rid, info: started.append((rid, info)))
    with qtbot.waitSignal(fake_bridge.modelUnloaded, timeout=LOAD_TIMEOUT):
        fake_bridge.load(dict(model="acme/b", quantization="none"))
    rid = fake_bridge.submit(prompt="Hello", params=SamplingParams(max_tokens=5))
    stopped = fake_bridge.submit(prompt="Never mind", params=SamplingParams(max_tokens=5))
    with qtbot.waitSignal(fake_bridge.requestFinished, timeout=LOAD_TIMEOUT) as aborted:
        fake_bridge.abort(stopped)
    assert aborted.args[0] == stopped and aborted.args[1].reason == "abort"
    with qtbot.waitSignal(fake_bridge.modelLoaded, timeout=LOAD_TIMEOUT):
        state["gate"].set()
    qtbot.waitUntil(lambda: bool(started), timeout=LOAD_TIMEOUT)
    assert started == [(rid, {"model": "acme/b", "dropped": 0})]
    new = state["made"][-1]
    with qtbot.waitSignal(fake_bridge.requestFinished, timeout=LOAD_TIMEOUT) as done:
        new.finish(rid)
    assert done.args[0] == rid and done.args[1].reason == "length"
    assert [e[1] for e in events if e[0] == "requestFinished"] == [stopped, rid]


def test_on_the_cpu_the_old_model_makes_room_only_when_the_estimate_says_so(qtbot, fake_bridge):
    """Review finding 2: a CPU model that fits alone but not beside the loaded one."""
    _load(qtbot, fake_bridge, "acme/working", device="cpu")
    events = _record(fake_bridge)
    _load(qtbot, fake_bridge, "acme/small", device="cpu")  # fits beside: a plain swap
    assert fake_bridge.state["old_shut_when_loading"][-1] == [False]
    assert [e[0] for e in events] == ["modelLoading", "modelLoaded"]
    events.clear()
    fake_bridge.state["too_big"].add("acme/big")
    fake_bridge.state["fail"]["acme/big"] = ModelLoadError("the checkpoint is damaged")
    with qtbot.waitSignal(fake_bridge.modelLoaded, timeout=LOAD_TIMEOUT) as back:
        fake_bridge.load(dict(model="acme/big", quantization="none", device="cpu"))
    assert fake_bridge.state["old_shut_when_loading"][2] == [True, True]
    assert [e[0] for e in events] == ["modelLoading", "modelUnloaded", "modelLoading", "modelLoading", "loadFailed",
                                      "modelLoaded"]
    assert events[-2][1] == "Loading acme/big failed: the checkpoint is damaged. acme/small was loaded again."
    assert back.args[0].name == "acme/small" and back.args[0].device == "cpu"


def test_a_cpu_load_beside_a_gpu_model_swaps_without_unloading_first(qtbot, fake_bridge):
    _load(qtbot, fake_bridge, "acme/working")
    events = _record(fake_bridge)
    info = _load(qtbot, fake_bridge, "acme/small", device="cpu")
    assert info.device == "cpu" and fake_bridge.state["checked"][-1] == "acme/small"
    assert fake_bridge.state["old_shut_when_loading"][-1] == [False]  # swapped once ready
    assert [e[0] for e in events] == ["modelLoading", "modelLoaded"]
    assert fake_bridge.state["made"][0].shut_down


def test_unload_during_a_load_cancels_it_and_leaves_nothing_loaded(qtbot, fake_bridge):
    _load(qtbot, fake_bridge, "acme/working")
    fake_bridge.state["gated"].add("acme/slow")
    with qtbot.waitSignal(fake_bridge.modelLoading, timeout=LOAD_TIMEOUT):
        fake_bridge.load(dict(model="acme/slow", quantization="none", device="cpu"))
    with qtbot.waitSignals([fake_bridge.modelUnloaded, fake_bridge.loadFailed], timeout=LOAD_TIMEOUT):
        fake_bridge.unload()
    assert fake_bridge.model_info is None and not fake_bridge.is_loading
    assert [e.model_info.name for e in fake_bridge.state["made"]] == ["acme/working"]


def test_a_superseded_load_is_not_a_failure_and_the_last_one_loads(qtbot, fake_bridge):
    """Review finding 6: while A loads, B then C are asked for: A and B end superseded
    (no loadFailed), C loads; the bridge is loading all along."""
    fake_bridge.state["gated"].update({"acme/a", "acme/b", "acme/c"})
    events = _record(fake_bridge)
    with qtbot.waitSignal(fake_bridge.modelLoading, timeout=LOAD_TIMEOUT):
        fake_bridge.load(dict(model="acme/a", quantization="none"))
    fake_bridge.load(dict(model="acme/b", quantization="none"))
    fake_bridge.load(dict(model="acme/c", quantization="none"))
    assert fake_bridge.is_loading and fake_bridge.loading_name == "acme/c"
    qtbot.waitUntil(lambda: [e[0] for e in events][-1:] == ["modelLoading"] and len(events) == 4,
                    timeout=LOAD_TIMEOUT)  # A's loading, B and A superseded, C's loading
    assert fake_bridge.is_loading
    with qtbot.waitSignal(fake_bridge.modelLoaded, timeout=LOAD_TIMEOUT) as loaded:
        fake_bridge.state["gate"].set()
    assert loaded.args[0].name == "acme/c" and not fake_bridge.is_loading
    names = [e[0] for e in events]
    assert "loadFailed" not in names
    assert sorted(e[1] for e in events if e[0] == "loadSuperseded") == ["acme/a", "acme/b"]
    assert names[-2:] == ["modelLoading", "modelLoaded"] and events[-2][1] == "acme/c"
    assert [e.model_info.name for e in fake_bridge.state["made"]] == ["acme/c"]


def test_a_swap_waits_for_the_answer_being_written_on_the_old_model(qtbot, fake_bridge):
    """Review finding 3: the answer completes on the old model, then the swap."""
    _load(qtbot, fake_bridge, "acme/a")
    old = fake_bridge.state["made"][0]
    events = _record(fake_bridge)
    progress = []
    fake_bridge.loadProgress.connect(progress.append)
    rid = fake_bridge.submit(prompt="Tell me a story", params=SamplingParams(max_tokens=50))
    qtbot.waitUntil(lambda: rid in old.handles, timeout=LOAD_TIMEOUT)
    fake_bridge.load(dict(model="acme/b", quantization="none", device="cpu"))
    qtbot.waitUntil(lambda: any("switching once the answer" in p for p in progress), timeout=LOAD_TIMEOUT)
    assert fake_bridge.model_info.name == "acme/a" and not old.shut_down  # B is ready and waits
    old.write(rid, "Once upon a time")
    with qtbot.waitSignal(fake_bridge.modelLoaded, timeout=LOAD_TIMEOUT):
        old.finish(rid)
    finished = [e for e in events if e[0] == "requestFinished"]
    assert [e[2].reason for e in finished] == ["length"]  # never cut, never "abort"
    names = [e[0] for e in events]
    assert names.index("requestFinished") < names.index("modelLoaded")
    assert old.shut_down and fake_bridge.model_info.name == "acme/b"


def test_a_swap_cuts_an_answer_that_runs_too_long_with_an_error_saying_why(qtbot):
    from app.gui.bridge import EngineBridge

    made = []

    def factory(model, progress=None, device="auto", **_):
        made.append(FakeEngine(model, device_of(device)))
        return made[-1]

    def check(model, loaded_device=None, device=None, **_):
        return ModelCheck(model, device_of(device), 1, 1, 10, True)

    bridge = EngineBridge(engine_factory=factory, model_check=check, answer_wait_s=0.2)
    try:
        _load(qtbot, bridge, "acme/a")
        rid = bridge.submit(prompt="Go on forever", params=SamplingParams(max_tokens=50))
        qtbot.waitUntil(lambda: rid in made[0].handles, timeout=LOAD_TIMEOUT)
        made[0].write(rid, "and on")
        events = _record(bridge)
        with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT):
            bridge.load(dict(model="acme/b", quantization="none", device="cpu"))
        assert [e[0] for e in events] == ["modelLoading", "requestFinished", "modelLoaded"]
        ev = events[1][2]
        assert ev.reason == "error" and CUT in ev.error and "acme/b took over from acme/a" in ev.error
        assert made[0].shut_down and bridge.model_info.name == "acme/b"
    finally:
        bridge.shutdown()


def test_cancelling_while_the_new_model_waits_for_an_answer_keeps_the_old_one(qtbot, fake_bridge):
    _load(qtbot, fake_bridge, "acme/a")
    old = fake_bridge.state["made"][0]
    progress = []
    fake_bridge.loadProgress.connect(progress.append)
    rid = fake_bridge.submit(prompt="Hello", params=SamplingParams(max_tokens=5))
    qtbot.waitUntil(lambda: rid in old.handles, timeout=LOAD_TIMEOUT)
    fake_bridge.load(dict(model="acme/b", quantization="none", device="cpu"))
    qtbot.waitUntil(lambda: any("switching once" in p for p in progress), timeout=LOAD_TIMEOUT)
    with qtbot.waitSignal(fake_bridge.loadFailed, timeout=LOAD_TIMEOUT) as failed:
        fake_bridge.cancel_load()
    assert failed.args[0] == "loading cancelled"
    assert fake_bridge.state["made"][1].shut_down and not old.shut_down
    with qtbot.waitSignal(fake_bridge.requestFinished, timeout=LOAD_TIMEOUT) as done:
        old.finish(rid)
    assert done.args[1].reason == "length" and fake_bridge.model_info.name == "acme/a"


def test_the_loaded_model_answers_while_the_next_one_loads(qtbot, chat_model, tiny_models):
    """Real engines: A answers a request while B's load is held back; B then replaces A,
    and A's memory is given back."""
    from app.gui.bridge import EngineBridge

    gate, engines = threading.Event(), []

    def factory(model, progress=None, **kwargs):
        if engines:  # the second load waits for the test
            while not gate.wait(0.01):
                progress("waiting for the test")
        engines.append(Engine.load(model, progress=progress, **kwargs))
        return engines[-1]

    bridge = EngineBridge(engine_factory=factory)
    try:
        a, b = chat_model, str(tiny_models["qwen2"])
        with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT):
            bridge.load(load_options(a))
        with qtbot.waitSignal(bridge.modelLoading, timeout=LOAD_TIMEOUT):
            bridge.load(load_options(b))
        assert bridge.is_loading and bridge.model_info.path == a
        with qtbot.waitSignal(bridge.requestFinished, timeout=LOAD_TIMEOUT) as done:
            bridge.submit(prompt="Hello", params=SamplingParams(max_tokens=3, temperature=0.0))
        assert done.args[1].reason == "length" and done.args[1].usage.completion_tokens == 3
        with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT) as loaded:
            gate.set()
        assert loaded.args[0].path == b and bridge.model_info.path == b
        assert engines[0].runner is None  # A was shut down by the swap
    finally:
        gate.set()
        bridge.shutdown()


def test_on_the_cpu_a_model_that_fits_only_alone_loads_after_the_old_one_is_unloaded(
        qtbot, chat_model, tiny_models, monkeypatch):
    """Real check_model and engines, the RAM free now faked: B fits once A is gone but not
    beside it, so A is unloaded first (review finding 2), and B then loads."""
    import engine.loader.load_check as load_check
    from app.gui.bridge import EngineBridge
    from engine.api import check_model
    from engine.memory_plan import kv_headroom

    real_free = load_check.free_memory_bytes
    total = 64 * 2**30
    a, b = chat_model, str(tiny_models["qwen2"])
    opts = load_options(b)
    kwargs = {k: opts[k] for k in ("device", "dtype", "attention", "max_model_len", "kv_cache_memory")}
    need = check_model(b, **kwargs).need_bytes
    fake = {"free": None}

    def free_memory_bytes(device):
        return (fake["free"], total) if fake["free"] is not None else real_free(device)

    monkeypatch.setattr(load_check, "free_memory_bytes", free_memory_bytes)
    bridge = EngineBridge()
    events = _record(bridge)
    try:
        with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT):
            bridge.load(load_options(a))
        fake["free"] = need + kv_headroom(total) - 1  # a byte short beside A; A gives back more
        with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT) as loaded:
            bridge.load(load_options(b))
        assert loaded.args[0].path == b
        names = [e[0] for e in events]
        assert names == ["modelLoading", "modelLoaded", "modelLoading", "modelUnloaded", "modelLoading",
                         "modelLoaded"]
    finally:
        bridge.shutdown()


def test_the_check_before_unloading_gets_the_load_choices(qtbot, fake_bridge):
    """A bad backend choice, a context longer than the model's or a KV cache that can't
    fit must be refused before the old model gives up the GPU (review finding 14)."""
    _load(qtbot, fake_bridge, "acme/working")
    fake_bridge.state["fail_check"]["acme/next"] = InvalidRequestError("attention backend 'xformers' is unknown")
    with qtbot.waitSignal(fake_bridge.loadFailed, timeout=LOAD_TIMEOUT):
        fake_bridge.load(dict(model="acme/next", quantization="none", attention="xformers", dtype="auto",
                              max_model_len=99999, kv_cache_memory="900GiB"))
    assert fake_bridge.state["check_choices"] == {"attention": "xformers", "dtype": "auto", "max_model_len": 99999,
                                                  "kv_cache_memory": "900GiB", "quantization": "none"}
    assert not fake_bridge.state["made"][0].shut_down


def test_check_model_refuses_a_bad_choice_before_looking_for_the_model(monkeypatch):
    import engine.loader.resolve as resolve
    from engine.api import check_model

    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("resolved first"))
    with pytest.raises(InvalidRequestError, match="xformers"):
        check_model("acme/next", attention="xformers")
