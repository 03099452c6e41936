"""``hearth serve``'s engine in a process of its own (``EngineProcess``): the same tokens as
the engine in this process, events in order, aborts, stats and prompt scoring through the
pipe; a failed load says why; an engine process that dies ends the requests in flight
with an error that says so, and nothing answers from it afterwards."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from app.services.engine_process import ENGINE_GONE, EngineProcess
from app.services.host_events import RequestStarted
from engine.api import Engine, FinishedEvent, ModelLoadError, Request, SamplingParams, TokenEvent
from tests.app.server.conftest import tiny_options

PROMPT = [5, 17, 42, 99, 7, 3]


class Collector:
    """Each request's events, as a subscriber hears them (on the reader thread)."""

    def __init__(self) -> None:
        self.events: dict[str, list] = {}
        self.done: dict[str, threading.Event] = {}
        self.first_token: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def watch(self, rid: str) -> None:
        self.events[rid], self.done[rid], self.first_token[rid] = [], threading.Event(), threading.Event()

    def __call__(self, ev) -> None:
        rid = getattr(ev, "request_id", None)
        if rid not in self.events:
            return
        with self.lock:
            self.events[rid].append(ev)
        if isinstance(ev, TokenEvent):
            self.first_token[rid].set()
        if isinstance(ev, FinishedEvent):
            self.done[rid].set()

    def tokens(self, rid: str) -> list[int]:
        return [t for ev in self.events[rid] if isinstance(ev, TokenEvent) for t in ev.token_ids]


@pytest.fixture(scope="module")
def remote(tiny_models):
    proc = EngineProcess.start(tiny_options(tiny_models["llama-tied"]))
    yield proc
    assert proc.shutdown(30)


@contextmanager
def listening(remote):
    """A Collector subscribed to ``remote`` for the block."""
    heard = Collector()
    unsubscribe = remote.subscribe(heard)
    try:
        yield heard
    finally:
        unsubscribe()


def _request(rid: str, max_tokens: int) -> Request:
    return Request(prompt_token_ids=PROMPT, request_id=rid,
                   params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def test_same_tokens_as_the_engine_in_this_process(remote, tiny_models):
    with listening(remote) as heard:
        heard.watch("r1")
        remote.submit(_request("r1", 12))
        assert heard.done["r1"].wait(60)
    events = heard.events["r1"]
    assert isinstance(events[0], RequestStarted) and isinstance(events[-1], FinishedEvent)
    assert events[-1].reason == "length" and sum(isinstance(e, FinishedEvent) for e in events) == 1
    options = dict(tiny_options(tiny_models["llama-tied"]))
    model = options.pop("model")
    options.pop("quantization")
    with Engine.load(model, quantization="none", **options) as engine:
        local = engine.generate([_request("local", 12)])[0]
        here = engine.tokenizer.encode("hello")
    assert heard.tokens("r1") == list(local.token_ids) and len(local.token_ids) == 12
    assert remote.model_info.name and remote.engine.max_model_len == 256
    assert remote.engine.tokenizer.encode("hello") == here


def test_abort_stats_and_scoring_go_through_the_pipe(remote):
    with listening(remote) as heard:
        heard.watch("long")
        remote.submit(_request("long", 200))
        assert heard.first_token["long"].wait(60)
        assert remote.engine.stats().kv_blocks_total > 0
        remote.abort("long")
        assert heard.done["long"].wait(60)
    assert heard.events["long"][-1].reason == "abort"
    scored = remote.engine.score_prompt(PROMPT, 2)
    assert len(scored) == len(PROMPT) - 1 and all(len(lp.top) == 2 for lp in scored)


def test_a_failed_load_says_why(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        EngineProcess.start({"model": str(tmp_path / "no-such-model"), "device": "cpu"})
    assert "no-such-model" in str(e.value)


@pytest.mark.slow
def test_a_dead_engine_process_ends_the_answers_and_says_so(tiny_models):
    remote = EngineProcess.start(tiny_options(tiny_models["llama-tied"]))
    gone: list[str] = []
    said = threading.Event()
    remote.on_gone = lambda why: (gone.append(why), said.set())
    heard = Collector()
    remote.subscribe(heard)
    heard.watch("cut")
    remote.submit(_request("cut", 200))
    assert heard.first_token["cut"].wait(60)
    remote._proc.kill()  # as if the engine crashed (out of memory, a driver fault)
    assert heard.done["cut"].wait(30)
    end = heard.events["cut"][-1]
    assert end.reason == "error" and end.error == ENGINE_GONE
    assert remote.model_info is None and remote.engine is None and remote.unavailable == ENGINE_GONE
    assert said.wait(10) and gone[0] == "the engine's process ended (exit code -9)"
    heard.watch("later")
    remote.submit(_request("later", 4))  # ends at once, with the reason
    assert heard.done["later"].wait(5) and heard.events["later"][-1].error == ENGINE_GONE
    remote.shutdown(5)  # already gone: returns at once
    assert not remote._proc.is_alive()


def test_an_error_that_cannot_cross_the_pipe_is_said_as_text():
    from app.services.engine_process import _portable

    class Odd(Exception):  # its constructor doesn't take its own args (as Triton's CompilationError)
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    e = _portable(Odd(1, 2))
    assert isinstance(e, RuntimeError) and str(e) == "Odd: 1 and 2"
    assert _portable(ValueError("x")).args == ("x",)


class _DeadPipe:
    """The server's end of a pipe whose child has just died: sends fail, reads end once
    released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def send(self, msg) -> None:
        raise BrokenPipeError("gone")

    def recv(self):
        self.release.wait(10)
        raise EOFError


class _Proc:
    exitcode = -9

    def join(self, timeout=None) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def kill(self) -> None:
        pass


def test_a_submit_the_pipe_refuses_ends_once():
    pipe = _DeadPipe()
    remote = EngineProcess(_Proc(), pipe, info=object(), tokenizer=None, max_model_len=16)
    heard = Collector()
    remote.subscribe(heard)
    heard.watch("x")
    remote.submit(_request("x", 4))  # the send fails: ended here, with the reason
    pipe.release.set()  # then the reader finds the pipe closed and ends what is left
    remote._reader.join(10)
    finishes = [ev for ev in heard.events["x"] if isinstance(ev, FinishedEvent)]
    assert [f.error for f in finishes] == [ENGINE_GONE]
    assert remote.unavailable == ENGINE_GONE and remote.model_info is None


class _ThreadProc:
    """A child "process" that is a thread of this one (so a test can patch its engine)."""

    exitcode = 0

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread

    def join(self, timeout=None) -> None:
        self.thread.join(timeout)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def kill(self) -> None:
        pass


def test_an_engine_that_can_answer_no_more_is_said_dead_to_the_server(tiny_models, monkeypatch):
    """hearth serve's engine runs in its own process: an engine there that died (a
    tensor-parallel rank ended) while the process lives on makes /health answer 503 with
    the reason, and later requests 503, as an engine in the server's process does."""
    import multiprocessing as mp
    import signal

    import httpx

    from app.server import create_app
    from app.services.engine_process import _child_main
    from tests.engine.rank_ended import end_steps
    from tests.app.server.conftest import LiveServer

    why = "tensor parallel: rank 1 (cuda:1) ended (killed by signal 9). Reload the model."
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # (the child's own: not on this thread)
    conn, child_conn = mp.Pipe()
    child = threading.Thread(target=_child_main, args=(child_conn, tiny_options(tiny_models["llama-tied"])),
                             daemon=True)
    child.start()
    _, info, tokenizer, max_model_len = conn.recv()
    remote = EngineProcess(_ThreadProc(child), conn, info, tokenizer, max_model_len)
    try:
        with LiveServer(create_app(remote)) as server:
            end_steps(monkeypatch, why)
            first = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                               timeout=30)
            assert first.status_code == 500 and "rank 1 (cuda:1) ended" in first.text, first.text
            assert remote.engine.dead == why
            health = httpx.get(f"{server.base_url}/health", timeout=30)
            assert health.status_code == 503 and health.json()["error"] == why, health.text
            later = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                               timeout=30)
            assert later.status_code == 503 and "rank 1 (cuda:1) ended" in later.text, later.text
    finally:
        assert remote.shutdown(30)
