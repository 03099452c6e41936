"""The engine host in a process of its own, for ``hearth serve`` (Qt-free).

Why: with the HTTP side and the engine in one process they share one GIL. When many
clients send their next requests at once (a wave of answers ends), the server parses them
(about a millisecond of Python each) while the engine's thread waits for the GIL between
the hundreds of kernel launches of an eager step, so the steps that read the new prompts
stretched from ~15-50 ms to 70-220 ms and served throughput at 64 streams fell to
0.83-0.90 of offline on the H200 (``benchmarks/serve_waves.py``). Here the engine runs in
a child process (its own GIL) and the server talks to it through a pipe, as vLLM's API
server talks to its engine core.

``EngineProcess`` has the face of ``EngineHost`` that the server uses: ``model_info``,
``engine`` (the tokenizer, ``max_model_len``, ``stats()``, ``score_prompt``),
``subscribe``, ``submit``, ``abort`` and ``shutdown``. The child runs a real
``EngineHost``; each request's events (``RequestStarted``, the engine's, one
``FinishedEvent``) come back in batches, one pipe message per burst, and are handed to the
subscribers on a reader thread, in order. If the child dies, every request in flight ends
with an error saying so, and the server answers 503 (no model) from then on.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import pickle
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from app.services.subscribers import Subscribers
from app.services.host_events import LoadFailed, LoadProgress, ModelLoaded, RequestStarted, ended
from engine.api import FinishedEvent, InvalidRequestError, ModelLoadError, PromptProgressEvent, Request, TokenEvent

log = logging.getLogger("hearth.host")

_REQUEST_EVENTS = (TokenEvent, PromptProgressEvent, FinishedEvent, RequestStarted)
#: How long a call into the engine's process (stats, scoring a prompt) may take.
CALL_TIMEOUT_S = 120.0
#: How long shutdown waits for the engine's process to end before it is killed.
STOP_TIMEOUT_S = 60.0
#: The child's sender waits this long for more of a step's events before it sends them.
COALESCE_S = 0.0002
#: ... and at most this long in all (events that never pause still go out).
COALESCE_MAX_S = 0.005
ENGINE_GONE = "the engine's process ended unexpectedly: restart hearth serve (its log says why)."


class EngineProcess:
    """Start with ``EngineProcess.start(options)`` (loads the model in the child, printing
    its progress as ``hearth serve`` does; raises ModelLoadError if it fails)."""

    def __init__(self, proc, conn, info, tokenizer, max_model_len: int) -> None:
        self._proc, self._conn = proc, conn
        self._info = info
        self.engine: _RemoteEngine | None = _RemoteEngine(self, tokenizer, max_model_len)
        self._subscribers = Subscribers("an engine process")
        self._lock = threading.Lock()  # sends, calls, live requests
        self._live: set[str] = set()  # requests submitted and not yet finished
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count()
        self._closed = False
        self._stopping = False  # shutdown asked: the child's end is expected
        #: Why no model answers (None while one does): the server's 503 says it.
        self.unavailable: str | None = None
        #: Called once (on the reader thread) with the reason when the child ends on its own.
        self.on_gone: Callable[[str], None] | None = None
        self._reader = threading.Thread(target=self._read, name="hearth-engine-process-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, options: dict) -> "EngineProcess":
        ctx = mp.get_context("spawn")  # never fork a process that may hold threads or CUDA
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=_child_main, args=(child_conn, options), name="hearth-engine", daemon=True)
        proc.start()
        child_conn.close()
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            proc.join(5)
            raise ModelLoadError(f"the engine's process ended while loading the model (exit code "
                                 f"{proc.exitcode}): its log above says why.") from None
        except BaseException:  # Ctrl+C during the load: the child (which ignores it) goes too
            proc.kill()
            proc.join(10)
            raise
        if msg[0] == "failed":
            proc.join(30)
            raise ModelLoadError(msg[1])
        _, info, tokenizer, max_model_len = msg
        return cls(proc, conn, info, tokenizer, max_model_len)

    # -- EngineHost's face -------------------------------------------------------------
    @property
    def model_info(self):
        return self._info

    def subscribe(self, callback: Callable) -> Callable[[], None]:
        return self._subscribers.add(callback)

    def submit(self, request: Request) -> str:
        if request.request_id is None:
            raise InvalidRequestError("a request to the engine's process needs an id")
        with self._lock:
            if request.request_id in self._live:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            gone = self._closed
            if not gone:
                self._live.add(request.request_id)
                gone = not self._send(("submit", request))
                if gone:  # ended here: the reader's end of everything must not end it again
                    self._live.discard(request.request_id)
        if gone:
            self._publish(ended(request.request_id, "error", ENGINE_GONE))
        return request.request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._live:
                self._send(("abort", request_id))

    def shutdown(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """End every request, stop the engine's process (waiting up to ``timeout_s``, then
        killing it); returns whether it stopped by itself."""
        with self._lock:
            self._stopping = True
            self._send(("shutdown",))
        self._proc.join(timeout_s)
        stopped = not self._proc.is_alive()
        if not stopped:
            log.warning("the engine's process did not stop within %g s: killing it", timeout_s)
            self._proc.kill()
            self._proc.join(5)
        self._reader.join(5)
        self._gone(ENGINE_GONE if not stopped else "the server is shutting down")
        return stopped

    # -- the pipe ----------------------------------------------------------------------
    def _send(self, msg) -> bool:
        """Send under the lock; False once the child is gone."""
        if self._closed:
            return False
        try:
            self._conn.send(msg)
            return True
        except Exception:  # noqa: BLE001 - a closed pipe, or a message that can't be pickled
            log.exception("could not send to the engine's process")
            return False

    def call(self, name: str, *args, timeout_s: float = CALL_TIMEOUT_S):
        """Run ``name`` (a _CALLS function) in the child on its engine; its result or error."""
        future: Future = Future()
        with self._lock:
            cid = next(self._ids)
            self._calls[cid] = future
            sent = self._send(("call", cid, name, args))
        if not sent:
            with self._lock:
                self._calls.pop(cid, None)
            raise ModelLoadError(ENGINE_GONE)
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            with self._lock:
                self._calls.pop(cid, None)
            raise ModelLoadError(f"the engine did not answer within {timeout_s:g} s (it may be busy): try "
                                 "again in a moment.") from None

    def _read(self) -> None:
        """The reader thread: each message is a batch of events, call replies and word of
        the engine's death."""
        while True:
            try:
                batch = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - a message that can't be read: the pipe is no good now
                log.exception("a message from the engine's process could not be read: stopping it")
                self._proc.kill()
                break
            for item in batch:
                if item[0] == "event":
                    ev = item[1]
                    if isinstance(ev, FinishedEvent):
                        with self._lock:
                            self._live.discard(ev.request_id)
                    self._publish(ev)
                elif item[0] == "dead":  # ahead of the request end it came with: its client sees it
                    engine = self.engine
                    if engine is not None:
                        engine.dead = item[1]
                else:  # ("reply", id, ok, value)
                    with self._lock:
                        future = self._calls.pop(item[1], None)
                    if future is not None:
                        (future.set_result if item[2] else future.set_exception)(item[3])
        with self._lock:
            unexpected = not self._stopping
        self._gone(ENGINE_GONE if unexpected else "the server is shutting down")
        if unexpected and self.on_gone is not None:
            self._proc.join(5)  # reaped: its exit code is known
            self.on_gone(f"the engine's process ended (exit code {self._proc.exitcode})")

    def _gone(self, why: str) -> None:
        """The child is gone: every request in flight ends with ``why``, calls fail, and
        no model answers from now on."""
        with self._lock:
            if self._closed and not self._live and not self._calls:
                return
            self._closed = True
            live, self._live = sorted(self._live), set()
            calls, self._calls = list(self._calls.values()), {}
            self._info, self.engine = None, None
            self.unavailable = why
        for rid in live:
            self._publish(ended(rid, "error", why))
        for future in calls:
            future.set_exception(ModelLoadError(why))

    def _publish(self, ev) -> None:
        self._subscribers.publish(ev)


class _RemoteEngine:
    """What the server reads of the engine: its tokenizer and context (copied at load), its
    stats and prompt scoring (calls into the child)."""

    def __init__(self, owner: EngineProcess, tokenizer, max_model_len: int) -> None:
        self._owner = owner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        #: Why the child's engine can answer no more (``Engine.dead``: a tensor-parallel rank
        #: ended), once it has said so; the server's /health and refusals read it.
        self.dead: str | None = None

    def stats(self):
        return self._owner.call("stats", timeout_s=5.0)

    def score_prompt(self, ids: list[int], top: int):
        """``engine.api.prompt_logprobs`` on the child's engine."""
        return self._owner.call("score_prompt", list(ids), top)


def say_on_stderr(message: str) -> None:
    """A load's progress as ``hearth serve`` prints it."""
    print(f"[hearth] {message}", file=sys.stderr, flush=True)


def load_and_wait(host, options: dict, say: Callable[[str], None],
                  abandoned: Callable[[], bool] | None = None) -> None:
    """Load a model on ``host`` (an EngineHost), saying its progress; raises ModelLoadError
    if it fails, or if ``abandoned()`` says nobody waits for it any more (the load is
    cancelled first)."""
    done = threading.Event()
    outcome: list = []

    def listen(ev) -> None:
        if isinstance(ev, LoadProgress):
            say(ev.message)
        elif isinstance(ev, (ModelLoaded, LoadFailed)):
            outcome.append(ev)
            done.set()

    unsubscribe = host.subscribe(listen)
    try:
        host.load(options)
        while not done.wait(0.2):  # short waits: Ctrl+C gets through
            if abandoned is not None and abandoned():
                host.cancel_load()
                raise ModelLoadError("the load was abandoned: the server that asked for it is gone.")
    finally:
        unsubscribe()
    if isinstance(outcome[0], LoadFailed):
        raise ModelLoadError(outcome[0].message)


# -- the child ---------------------------------------------------------------------------
def _stats(host):
    return host.engine.stats()


def _score_prompt(host, ids, top):
    from engine.api import prompt_logprobs

    return prompt_logprobs(host.engine, ids, top)


_CALLS = {"stats": _stats, "score_prompt": _score_prompt}


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives the pipe (pickled here, rebuilt there: some exceptions'
    constructors don't take their own ``args``), else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def _child_main(conn, options: dict) -> None:
    """The engine's process: load, then serve the pipe until told to stop or the parent
    goes (its end of the pipe closes)."""
    # Ctrl+C and a stop for the whole process group (systemd's default) are the server's to
    # handle: it ends the answers, then says stop here (or its end of the pipe closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from app.services.engine_host import EngineHost

    host = EngineHost()
    try:
        # (the server only reads the pipe once loaded: a closed end, readable, means it is gone)
        load_and_wait(host, options, say_on_stderr, abandoned=conn.poll)
        engine = host.engine
        conn.send(("loaded", host.model_info, engine.tokenizer, engine.max_model_len))
    except Exception as e:  # noqa: BLE001 - told to the parent (if it still listens), which says it
        try:
            conn.send(("failed", str(e)))
        except Exception:  # noqa: BLE001 - it is gone
            pass
        host.shutdown()
        return

    out: deque = deque()
    wake = threading.Event()
    stop = threading.Event()
    dead_said = False

    def on_event(ev) -> None:  # on the engine's and the host's threads: hand it on
        nonlocal dead_said
        if isinstance(ev, _REQUEST_EVENTS):
            if isinstance(ev, FinishedEvent) and ev.reason == "error" and not dead_said:
                # The engine's death shows here only as its requests' errors (it stays loaded,
                # and this process alive): the server must hear it to answer /health 503.
                dead = getattr(host.engine, "dead", None)
                if dead:
                    dead_said = True
                    out.append(("dead", dead))
            out.append(("event", ev))
            if not wake.is_set():
                wake.set()

    def sender() -> None:
        while not (stop.is_set() and not out):
            wake.wait(0.5)
            wake.clear()
            # A step hands out its events one by one: wait (the GIL free) until it is done,
            # so they go in one message and this thread doesn't take the GIL from the
            # engine's between them (that cost batch-1 decode ~3% on the H200).
            seen, until = -1, time.monotonic() + COALESCE_MAX_S
            while len(out) != seen and not stop.is_set() and time.monotonic() < until:
                seen = len(out)
                time.sleep(COALESCE_S)
            batch = []
            while out:
                batch.append(out.popleft())
            if batch:
                try:
                    conn.send(batch)
                except (OSError, EOFError):
                    return  # the server is gone
                except Exception:  # noqa: BLE001 - one item that can't be pickled: the rest go
                    log.exception("an engine event could not be sent; sending the others one by one")
                    for item in batch:
                        try:
                            conn.send([item])
                        except (OSError, EOFError):
                            return
                        except Exception:  # noqa: BLE001
                            log.exception("dropped an engine message that can't be pickled: %r", item[:2])

    def run_call(cid, name, args) -> None:
        try:
            out.append(("reply", cid, True, _CALLS[name](host, *args)))
        except BaseException as e:  # noqa: BLE001 - the caller's to handle
            out.append(("reply", cid, False, _portable(e)))
        wake.set()

    unsubscribe = host.subscribe(on_event)
    thread = threading.Thread(target=sender, name="hearth-engine-process-sender", daemon=True)
    thread.start()
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the server is gone
            kind = msg[0]
            if kind == "submit":
                try:
                    host.submit(msg[1])
                except Exception as e:  # noqa: BLE001 - that request ends; the engine goes on
                    on_event(ended(msg[1].request_id, "error", str(e)))
            elif kind == "abort":
                host.abort(msg[1])
            elif kind == "call":
                threading.Thread(target=run_call, args=msg[1:], daemon=True).start()
            elif kind == "shutdown":
                break
    finally:
        host.shutdown()  # every request still running ends (its FinishedEvent goes out)
        unsubscribe()
        stop.set()
        wake.set()
        thread.join(10)
