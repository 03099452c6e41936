"""A hook that reports every HTTP request once it has been answered: method, path, status,
tokens and time (the desktop app's live request log). Qt-free: the observer is a plain
callback; the GUI hands each record on to its own thread with a queued signal.

The tokens of a request are noted by the service when it forgets the request's answers
(``note_usage``), through a context variable the middleware sets for that request: the
route, and the stream task it starts, run in copies of the middleware's context, so they
find the request's record without any of them knowing about the log."""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("hearth.server")


@dataclass(slots=True)
class RequestRecord:
    """One answered request. ``status`` 499: the client left before the answer began;
    ``prompt_tokens`` / ``completion_tokens``: as the response's ``usage`` counts them
    (0 for requests that ran no model); ``duration_s``: from the request's arrival to the
    answer's last byte (a stream's whole length); ``started``: wall-clock time (epoch)."""

    method: str
    path: str
    status: int = 499
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duration_s: float = 0.0
    started: float = 0.0
    client: str = ""

    @property
    def ok(self) -> bool:
        return self.status < 400


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("hearth_request", default=None)


def note_usage(finishes: list, n: int = 1) -> None:
    """Add a request's finished answers' tokens to its record, if a log watches it
    (``finishes``: FinishedEvents, None for an answer that never finished; a prompt's ``n``
    answers count it once, as ``usage`` does)."""
    record = _current.get()
    if record is None:
        return
    for k, fin in enumerate(finishes):
        if fin is None:
            continue
        if k % n == 0:
            record.prompt_tokens += fin.usage.prompt_tokens
        record.completion_tokens += fin.usage.completion_tokens


class RequestLog:
    """ASGI middleware: calls ``observer(RequestRecord)`` once per HTTP request, after its
    answer ends, on the event loop's thread; the observer must be quick (hand the record
    on) and its failures are logged, never the request's."""

    def __init__(self, app, observer: Callable[[RequestRecord], None]) -> None:
        self.app = app
        self._observer = observer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        record = RequestRecord(scope["method"], scope["path"], started=time.time(),
                               client=client[0] if client else "")
        t0 = time.perf_counter()

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        token = _current.set(record)
        try:
            await self.app(scope, receive, sending)
        except Exception:
            if record.status == 499:  # a bug: the error middleware outside answers 500
                record.status = 500
            raise
        finally:
            _current.reset(token)
            record.duration_s = time.perf_counter() - t0
            try:
                self._observer(record)
            except Exception:
                log.exception("the request observer failed")
