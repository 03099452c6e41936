"""What a client hands the engine and gets back: ``Request``, ``RequestHandle``, ``Completion``.

``RequestHandle`` streams one request's events (``TokenEvent`` ..., then exactly one
``FinishedEvent``) from the engine's loop thread to whichever thread reads them: either
queued for the client to read (iterate the handle, ``poll``, ``result``), or pushed to a
callback as the engine produces them (``Engine.submit(request, on_event=...)``, through
``EventCallback``).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from engine.events import EngineEvent, FinishedEvent, TokenEvent, TokenLogprob
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm_engine import Engine

log = logging.getLogger("hearth.engine")


@dataclass(slots=True)
class Request:
    """Exactly one of ``prompt`` (raw text), ``messages`` (chat, rendered with the model's
    chat template; ``system`` prepends a system message) or ``prompt_token_ids``."""

    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    system: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    # Send PromptProgressEvents while the prompt is read (off by default: clients that
    # only expect token and finished events see nothing new).
    prompt_progress: bool = False
    # Chat only: drop the oldest turns until the prompt leaves room for an answer in the
    # context (engine.context_fit: the system prompt and the last message are kept; a last
    # message too long even alone is refused). The handle's ``dropped_messages`` says how
    # many went. Off: a chat longer than the context is refused.
    fit_context: bool = False


@dataclass(slots=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    timings: object
    logprobs: list[TokenLogprob] | None
    error: str | None = None

    @classmethod
    def from_events(cls, request_id: str, events) -> "Completion":
        """The whole answer from one request's events (tokens, then its FinishedEvent)."""
        text, ids, lps, fin = [], [], [], None
        for ev in events:
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
                ids.extend(ev.token_ids)
                if ev.logprobs:
                    lps.extend(ev.logprobs)
            elif isinstance(ev, FinishedEvent):
                fin = ev
        return cls(request_id, "".join(text), ids, fin.reason, fin.usage.prompt_tokens,
                   fin.usage.completion_tokens, fin.usage.cached_prompt_tokens, fin.timings,
                   lps or None, fin.error)


class EventCallback:
    """Delivers one request's events to a client's callback as the engine produces them
    (``Engine.submit(request, on_event=callback)``), in place of the handle's queue.

    The callback runs on the engine's loop thread, between model steps (the last event,
    a FinishedEvent, may come from the thread that calls ``Engine.shutdown`` instead): it
    must be quick (hand the event on, never wait for the engine or block on a GUI), or
    every request waits for it. A callback that raises is logged and called no more, and
    its request is aborted (no one hears it any longer); the engine and the other
    requests go on."""

    __slots__ = ("request_id", "_callback", "_on_failure", "done")

    def __init__(self, request_id: str, callback: Callable[[EngineEvent], None],
                 on_failure: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._callback: Callable[[EngineEvent], None] | None = callback
        self._on_failure = on_failure  # Engine.abort
        self.done = False  # the FinishedEvent has been handed over

    def put(self, ev: EngineEvent) -> None:
        """Hand ``ev`` to the callback (the engine calls this where it would queue it)."""
        if isinstance(ev, FinishedEvent):
            self.done = True
        callback = self._callback
        if callback is None:
            return
        try:
            callback(ev)
        except Exception:
            log.exception("the event callback of request %s failed; it is no longer called and the "
                          "request is aborted", self.request_id)
            self._callback = None
            if not self.done:
                self._on_failure(self.request_id)


class RequestHandle:
    """A submitted request: iterate for events (TokenEvents, PromptProgressEvents if the
    request asked for them, and last a FinishedEvent). Every handle gets exactly one
    FinishedEvent, also when the engine shuts down or fails meanwhile (see ``submit``).

    A handle submitted with ``on_event`` has its events pushed to that callback instead:
    iterating it, ``poll`` and ``result`` raise RuntimeError; ``done`` and ``abort`` work.

    ``dropped_messages``: how many of the request's messages ``fit_context`` left out
    (the oldest turns after any leading system messages); 0 when none were."""

    def __init__(self, request_id: str, events: "queue.Queue | EventCallback", engine: "Engine",
                 dropped_messages: int = 0) -> None:
        self.request_id = request_id
        self._events = events
        self._engine = engine
        self._done = False
        self._result: Completion | None = None
        self._read = False  # an event was taken by iterating or poll
        self._result_lock = threading.Lock()
        self.dropped_messages = dropped_messages

    def _queue(self) -> queue.Queue:
        if isinstance(self._events, EventCallback):
            raise RuntimeError(f"request {self.request_id}'s events go to its on_event callback; "
                               "submit it without one to iterate, poll or wait for its result")
        return self._events

    def __iter__(self) -> Iterator[EngineEvent]:
        events = self._queue()
        while not self._done:
            ev = events.get()
            self._read = True
            if isinstance(ev, FinishedEvent):
                self._done = True
            yield ev

    def poll(self) -> list[EngineEvent]:
        """Events that have arrived so far, without waiting (for event-loop clients)."""
        events = self._queue()
        out: list[EngineEvent] = []
        while not self._done:
            try:
                ev = events.get_nowait()
            except queue.Empty:
                break
            self._read = True
            if isinstance(ev, FinishedEvent):
                self._done = True
            out.append(ev)
        return out

    @property
    def done(self) -> bool:
        """The FinishedEvent has been read (or, with ``on_event``, handed to the callback)."""
        if isinstance(self._events, EventCallback):
            return self._events.done
        return self._done

    def abort(self) -> None:
        self._engine.abort(self.request_id)

    def result(self) -> Completion:
        """Wait for the whole answer. Called again (from any thread), it returns the same
        Completion; after any event was read by iterating or ``poll``, it raises RuntimeError
        (those events are gone)."""
        with self._result_lock:  # (a second caller waits for the first, then gets its Completion)
            if self._result is None:
                self._queue()
                if self._read:
                    raise RuntimeError(f"request {self.request_id}'s events were already read (by iterating "
                                       "or poll); call result() instead of reading them, not after")
                self._result = Completion.from_events(self.request_id, self)
            return self._result
