"""Issue 12: a request submitted while the engine shuts down (or while its loop dies) still
ends with exactly one FinishedEvent, and ``stats()`` afterwards shows nothing running.

Each trial builds a fresh engine (shutdown is final) around one tiny model loaded once for
the module: loading is not what races, the engine's request bookkeeping is. A submitter
thread sends long prompts (tokenizing them takes a while: the window the bug needed) while
the main thread shuts the engine down at a random moment and an aborter aborts some.
"""

from __future__ import annotations

import queue
import random
import threading
import time

import pytest

from engine.api import Engine, FinishedEvent, HearthError, Request, SamplingParams
from engine.errors import EngineDeadError
from tests.conftest import engine_device

TRIALS = 100
WAIT_S = 5.0  # for each handle's FinishedEvent: a missing one is a hang, not a slow step
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
# About 400 tokens (the context holds 512): tokenization takes long enough to race.
LONG_PROMPT = "The quick brown fox jumps over the lazy dog; " * 40


@pytest.fixture(scope="module")
def cheap_engines(tiny_models):
    """A factory of real Engines that share one loaded tiny model (load and unload made
    free, so dozens of start/shutdown cycles take a second or two)."""
    import engine.loader.engine_loader as engine_loader

    cfg_kw = dict(device=engine_device(), dtype="float32", max_model_len=512,
                  kv_cache_memory="4MiB", max_num_batched_tokens=128)
    first = Engine.load(str(tiny_models["llama-tied"]), **cfg_kw)
    loaded = engine_loader.LoadedModel(first.model_info, first.tokenizer, first.runner,
                                       first.max_model_len, first.block_manager.num_blocks,
                                       True, first.config)
    real_release = engine_loader.release_runner
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_loader, "load_model", lambda config, progress=None, should_stop=None: loaded)
        mp.setattr(engine_loader, "release_runner", lambda runner: None)
        mp.setattr(engine_loader, "return_freed_memory", lambda collect=False: None)
        yield lambda: Engine(first.config)
    first.shutdown()  # not patched any more: frees the shared model for real
    assert engine_loader.release_runner is real_release


def finished_events(handle, wait_s: float = WAIT_S) -> list[FinishedEvent]:
    """The handle's FinishedEvents: wait for the first (up to wait_s), then take whatever
    else is queued. Reads the queue directly so a missing event fails instead of hanging."""
    events = []
    deadline = time.monotonic() + wait_s
    while not any(isinstance(e, FinishedEvent) for e in events):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            events.append(handle._events.get(timeout=left))
        except queue.Empty:
            break
    while True:
        try:
            events.append(handle._events.get_nowait())
        except queue.Empty:
            break
    return [e for e in events if isinstance(e, FinishedEvent)]


def race_one(engine: Engine, rng: random.Random, *, kill=None) -> list:
    """Submit long prompts from one thread and abort some from another while the main
    thread waits a random moment, then runs ``kill`` (default: shutdown). Returns the
    handles submit gave out."""
    handles: list = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def submitter():
        try:
            while not stop.is_set():
                try:
                    handles.append(engine.submit(Request(prompt=LONG_PROMPT, params=PARAMS)))
                except EngineDeadError:
                    return
        except BaseException as e:  # anything else is a failure the test must show
            errors.append(e)

    def aborter():
        try:
            while not stop.is_set():
                if handles:
                    engine.abort(rng.choice(handles).request_id)
                time.sleep(0.0005)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=submitter), threading.Thread(target=aborter)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0, 0.02))
    (kill or engine.shutdown)()
    time.sleep(rng.uniform(0, 0.003))  # let the submitter race the end a little longer
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not errors, errors
    return handles


def check_every_handle_finished_once(handles, trial: int) -> None:
    for h in handles:
        fins = finished_events(h)
        assert len(fins) == 1, (f"trial {trial}: {h.request_id} got {len(fins)} FinishedEvents "
                                "(0 means result() blocks forever)")
        assert fins[0].reason in ("length", "abort", "error"), fins[0]


def test_submit_racing_shutdown_always_finishes(cheap_engines):
    rng = random.Random(12)
    total = 0
    for trial in range(TRIALS):
        engine = cheap_engines()
        handles = race_one(engine, rng)
        total += len(handles)
        check_every_handle_finished_once(handles, trial)
        stats = engine.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0, (trial, stats)
        assert stats.kv_blocks_used == 0, (trial, stats)
        # The contract after shutdown: submit refuses, abort and a second shutdown are no-ops.
        with pytest.raises(EngineDeadError):
            engine.submit(Request(prompt="Hi", params=PARAMS))
        engine.abort(handles[0].request_id if handles else "nothing")
        engine.shutdown()
    assert total >= TRIALS  # the submitter did get requests in


def test_submit_racing_a_dying_loop_always_finishes(cheap_engines):
    """The engine loop dies on an internal error (here: the scheduler raising) while
    requests arrive: every handle ends with one "error" FinishedEvent (or the abort
    before it), and later submits raise EngineDeadError."""
    rng = random.Random(7)
    for trial in range(TRIALS // 2):
        engine = cheap_engines()

        def break_scheduler(engine=engine):
            def schedule():
                raise RuntimeError("injected scheduler failure")
            engine.scheduler.schedule = schedule
            with engine._cv:
                engine._cv.notify()  # make sure the loop wakes up and meets the failure

        handles = race_one(engine, rng, kill=break_scheduler)
        check_every_handle_finished_once(handles, trial)
        with pytest.raises(EngineDeadError, match="internal error"):
            engine.submit(Request(prompt="Hi", params=PARAMS))
        stats = engine.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0, (trial, stats)
        engine.shutdown()
        for h in handles:  # shutdown after the death sends nothing more
            assert finished_events(h, wait_s=0) == []


def test_handle_after_shutdown_result_does_not_block(cheap_engines):
    engine = cheap_engines()
    h = engine.submit(Request(prompt=LONG_PROMPT, params=SamplingParams(max_tokens=400,
                                                                        ignore_eos=True)))
    engine.shutdown()
    done = threading.Event()
    out = []
    t = threading.Thread(target=lambda: (out.append(h.result()), done.set()), daemon=True)
    t.start()
    assert done.wait(WAIT_S), "result() blocked after shutdown"
    assert out[0].finish_reason in ("abort", "length") and (
        out[0].finish_reason != "abort" or "shut down" in out[0].error)
    with pytest.raises(HearthError):
        engine.submit(Request(prompt="Hi", params=PARAMS))
