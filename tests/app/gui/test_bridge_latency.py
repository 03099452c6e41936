"""A token reaches the GUI thread's slot at once: the engine pushes it and the bridge turns
it into a queued signal, with no polling timer in between (a 15 ms poll added up to 15 ms
to every token on screen, the first one included, which the engine's ttft never showed)."""

from __future__ import annotations

import statistics
import threading
import time

from app.gui.bridge import EngineBridge
from app.gui.error_text import gui_error
from app.services.engine_host import EngineHost
from engine.api import SamplingParams, TokenEvent
from tests.app.gui.conftest import load_options

TIMEOUT = 60_000
TOKENS = 50
#: The median delay allowed: a polling timer of 15 ms gives a median near 7.5 ms; a pushed
#: token takes well under 1 ms on an idle machine, and measured 2.8 ms on 2 cores with two
#: other test runs and a calibration competing (2 ms failed there).
LIMIT_MS = 5.0
#: A pause before each engine step, as on a GPU, where the engine's thread waits for the
#: device with the GIL released. The tiny CPU model's steps are pure Python work back to
#: back instead, which keeps the GUI thread from the GIL for a few ms at a time: that
#: measures the interpreter, not the way tokens travel.
STEP_PAUSE_S = 0.003


def test_a_token_reaches_the_gui_thread_within_5_ms_of_leaving_the_engine(qtbot, chat_model):
    host = EngineHost(error_text=gui_error)
    pushed: list[float] = []  # when each token with text left the engine (its thread)
    received: list[float] = []  # when the GUI thread's slot got it

    def stamp(ev) -> None:  # subscribed before the bridge: called first, on the engine's thread
        if isinstance(ev, TokenEvent) and ev.text:
            pushed.append(time.perf_counter())

    def on_token(rid: str, text: str) -> None:
        assert threading.current_thread() is threading.main_thread()
        received.append(time.perf_counter())

    host.subscribe(stamp)
    bridge = EngineBridge(host=host)
    try:
        bridge.tokenReceived.connect(on_token)
        with qtbot.waitSignal(bridge.modelLoaded, timeout=TIMEOUT):
            bridge.load(load_options(chat_model))
        engine = host.engine
        real_step = engine.step
        engine.step = lambda: (time.sleep(STEP_PAUSE_S), real_step())[1]
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
        with qtbot.waitSignal(bridge.requestFinished, timeout=TIMEOUT) as done:
            bridge.submit(prompt="Count to a hundred:", params=params)
        assert done.args[1].usage.completion_tokens == TOKENS
        assert len(received) == len(pushed) >= TOKENS // 2
        delays_ms = [(got - sent) * 1e3 for sent, got in zip(pushed, received)]
        # The median: a few tokens delayed by a busy 2-core CI machine don't decide it.
        assert statistics.median(delays_ms) < LIMIT_MS, sorted(delays_ms)
    finally:
        bridge.shutdown()
        host.shutdown()
