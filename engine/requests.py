"""What a client hands the engine and gets back: ``Request``, ``RequestHandle``, ``Completion``.

``RequestHandle`` streams one request's events (``TokenEvent`` ..., then exactly one
``FinishedEvent``) from the engine's loop thread to whichever thread reads them.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from engine.events import EngineEvent, FinishedEvent, TokenEvent, TokenLogprob
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm_engine import Engine


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


class RequestHandle:
    """A submitted request: iterate for events (TokenEvents, PromptProgressEvents if the
    request asked for them, and last a FinishedEvent). Every handle gets exactly one
    FinishedEvent, also when the engine shuts down or fails meanwhile (see ``submit``)."""

    def __init__(self, request_id: str, events: queue.Queue, engine: "Engine") -> None:
        self.request_id = request_id
        self._events = events
        self._engine = engine
        self._done = False

    def __iter__(self) -> Iterator[EngineEvent]:
        while not self._done:
            ev = self._events.get()
            if isinstance(ev, FinishedEvent):
                self._done = True
            yield ev

    def poll(self) -> list[EngineEvent]:
        """Events that have arrived so far, without waiting (for event-loop clients)."""
        out: list[EngineEvent] = []
        while not self._done:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(ev, FinishedEvent):
                self._done = True
            out.append(ev)
        return out

    @property
    def done(self) -> bool:
        return self._done

    def abort(self) -> None:
        self._engine.abort(self.request_id)

    def result(self) -> Completion:
        text, ids, lps, fin = [], [], [], None
        for ev in self:
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
                ids.extend(ev.token_ids)
                if ev.logprobs:
                    lps.extend(ev.logprobs)
            elif isinstance(ev, FinishedEvent):
                fin = ev
        return Completion(self.request_id, "".join(text), ids, fin.reason, fin.usage.prompt_tokens,
                          fin.usage.completion_tokens, fin.usage.cached_prompt_tokens, fin.timings,
                          lps or None, fin.error)
