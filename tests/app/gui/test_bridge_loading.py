"""EngineBridge loading: the loaded model serves until the new one is ready, and stays
when a load fails or is cancelled; on one GPU the new model is checked before the old
one is unloaded to make room."""

from __future__ import annotations

import threading

import pytest

from engine.api import Engine, InvalidRequestError, ModelLoadError, OutOfMemoryError, SamplingParams
from tests.app.gui.conftest import load_options

LOAD_TIMEOUT = 60_000


class FakeEngine:
    """Just enough of Engine for the bridge's loading logic (no model, no thread)."""

    def __init__(self, model: str, device: str) -> None:
        self.model_info = {"name": model, "path": model, "device": device}
        self.max_model_len = 256
        self.shut_down = False

    def shutdown(self) -> None:
        self.shut_down = True

    def stats(self):
        return None


def _record(bridge) -> list:
    events = []
    for name in ("modelLoading", "modelLoaded", "loadFailed", "modelUnloaded"):
        getattr(bridge, name).connect(lambda *args, n=name: events.append((n, *args)))
    return events


@pytest.fixture
def fake_bridge(qtbot):
    """A bridge over FakeEngines on ``cuda:0`` (or the device asked for); ``made`` lists
    them, ``checked`` the models checked first; ``fail`` maps a model to the error its load
    (or check) raises; a model in ``gated`` waits for ``gate`` (cancellable meanwhile)."""
    from app.gui.bridge import EngineBridge

    state = {"made": [], "checked": [], "fail": {}, "fail_check": {}, "gated": set(), "gate": threading.Event(),
             "old_shut_when_loading": []}

    def factory(model, progress=None, device="auto", **_):
        if model in state["gated"]:
            while not state["gate"].wait(0.01):
                progress("waiting for the test")
        state["old_shut_when_loading"].append([e.shut_down for e in state["made"]])
        if model in state["fail"]:
            raise state["fail"][model]
        engine = FakeEngine(model, "cuda:0" if device in ("auto", "cuda") else device)
        state["made"].append(engine)
        return engine

    def check(model, revision=None, progress=None, **choices):
        state["checked"].append(model)
        state["check_choices"] = choices
        if model in state["fail_check"]:
            raise state["fail_check"][model]
        return model

    b = EngineBridge(engine_factory=factory, model_check=check)
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
    assert not old.shut_down and fake_bridge.model_info["name"] == "acme/working"
    assert not fake_bridge.is_loading


def test_on_one_gpu_the_old_model_makes_room_and_a_failure_says_so(qtbot, fake_bridge):
    _load(qtbot, fake_bridge, "acme/working")
    events = _record(fake_bridge)
    fake_bridge.state["fail"]["acme/huge"] = OutOfMemoryError("the weights need 80 GiB")
    with qtbot.waitSignal(fake_bridge.loadFailed, timeout=LOAD_TIMEOUT) as failed:
        fake_bridge.load(dict(model="acme/huge", quantization="none"))
    assert fake_bridge.state["checked"] == ["acme/huge"]
    assert fake_bridge.state["old_shut_when_loading"][-1] == [True]  # unloaded before loading
    assert [e[0] for e in events] == ["modelLoading", "modelUnloaded", "modelLoading", "loadFailed"]
    assert "80 GiB" in failed.args[0] and "acme/working was unloaded first" in failed.args[0]
    assert fake_bridge.model_info is None


def test_a_cpu_load_beside_a_gpu_model_swaps_without_unloading_first(qtbot, fake_bridge):
    _load(qtbot, fake_bridge, "acme/working")
    events = _record(fake_bridge)
    info = _load(qtbot, fake_bridge, "acme/small", device="cpu")
    assert info["device"] == "cpu" and fake_bridge.state["checked"] == []
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
    assert [e.model_info["name"] for e in fake_bridge.state["made"]] == ["acme/working"]


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
        assert bridge.is_loading and bridge.model_info["path"] == a
        with qtbot.waitSignal(bridge.requestFinished, timeout=LOAD_TIMEOUT) as done:
            bridge.submit(prompt="Hello", params=SamplingParams(max_tokens=3, temperature=0.0))
        assert done.args[1].reason == "length" and done.args[1].usage.completion_tokens == 3
        with qtbot.waitSignal(bridge.modelLoaded, timeout=LOAD_TIMEOUT) as loaded:
            gate.set()
        assert loaded.args[0]["path"] == b and bridge.model_info["path"] == b
        assert engines[0].runner is None  # A was shut down by the swap
    finally:
        gate.set()
        bridge.shutdown()


def test_the_check_before_unloading_gets_the_load_choices(qtbot, fake_bridge):
    """A bad backend choice must be refused before the old model gives up the GPU."""
    _load(qtbot, fake_bridge, "acme/working")
    fake_bridge.state["fail_check"]["acme/next"] = InvalidRequestError("attention backend 'xformers' is unknown")
    with qtbot.waitSignal(fake_bridge.loadFailed, timeout=LOAD_TIMEOUT):
        fake_bridge.load(dict(model="acme/next", quantization="none", attention="xformers", dtype="auto"))
    assert fake_bridge.state["check_choices"] == {"attention": "xformers", "dtype": "auto"}
    assert not fake_bridge.state["made"][0].shut_down


def test_check_model_refuses_a_bad_choice_before_looking_for_the_model(monkeypatch):
    import engine.loader.resolve as resolve
    from engine.api import check_model

    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("resolved first"))
    with pytest.raises(InvalidRequestError, match="xformers"):
        check_model("acme/next", attention="xformers")
