"""The engine host's asyncio face, for the OpenAI-compatible server to come: submit a
request and ``async for`` its events on the event loop.

The host pushes events on its own threads; ``AsyncEngineHost`` hands them to the event
loop with ``loop.call_soon_threadsafe`` (never waiting there), where each lands in its
request's ``asyncio.Queue``: one wake-up of the loop for a burst of events (an engine step
gives every running request a token at once), not one each. Only requests submitted through it are routed (a dict
lookup on the engine's thread per event); other requests' events are ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque

from app.services.engine_host import EngineHost
from app.services.host_events import RequestStarted
from app.services.ids import unique_hex
from engine.api import Completion, FinishedEvent, InvalidRequestError, PromptProgressEvent, Request, TokenEvent

_REQUEST_EVENTS = (TokenEvent, PromptProgressEvent, FinishedEvent, RequestStarted)


class AsyncEngineHost:
    """An EngineHost seen from one asyncio event loop. Make it, submit and iterate on the
    loop's thread; ``close`` (or ``async with``) stops listening to the host."""

    def __init__(self, host: EngineHost, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.host = host
        self._loop = loop or asyncio.get_running_loop()
        # request id -> its queue: added on the loop's thread before the request is
        # submitted, removed on the host's threads with its FinishedEvent (dict operations
        # are atomic), so a request nobody reads to the end leaves nothing behind.
        self._queues: dict[str, asyncio.Queue] = {}
        # Events on their way to the loop, and whether a delivery is scheduled there.
        self._pending: deque = deque()
        self._scheduled = False
        self._unsubscribe = host.subscribe(self._on_event)

    def submit(self, request: Request) -> "AsyncRequestEvents":
        """Submit ``request`` to the host; returns the async iterator of its events
        (``RequestStarted``, then the engine's, ending with its one FinishedEvent)."""
        if request.request_id is None:
            request = dataclasses.replace(request, request_id=f"async-{unique_hex(16)}")
        elif request.request_id in self._queues:  # its stream would take the live one's events
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use: give each "
                                      "request its own id, or none (one is made).")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue
        self.host.submit(request)
        return AsyncRequestEvents(self, request.request_id, queue)

    def close(self) -> None:
        self._unsubscribe()

    async def __aenter__(self) -> "AsyncEngineHost":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def _on_event(self, ev) -> None:
        """On the host's threads: hand a routed request's event to the loop."""
        if isinstance(ev, _REQUEST_EVENTS):
            if isinstance(ev, FinishedEvent):
                queue = self._queues.pop(ev.request_id, None)
            else:
                queue = self._queues.get(ev.request_id)
            if queue is not None:
                # Appended before the flag is read: a delivery that already cleared the flag
                # takes it, or this call schedules the next one (a spare delivery is harmless).
                self._pending.append((queue, ev, time.perf_counter()))
                if not self._scheduled:
                    self._scheduled = True
                    self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the loop: every pending event into its request's queue, in order, with when
        it left the engine (``perf_counter``)."""
        self._scheduled = False
        pending = self._pending
        while pending:
            queue, ev, at = pending.popleft()
            queue.put_nowait((ev, at))


class AsyncRequestEvents:
    """One request's events, as an async iterator that ends after its FinishedEvent.
    ``at``: when the event just returned left the engine (``time.perf_counter``), which
    the loop may see later, several at once, when it is busy."""

    def __init__(self, owner: AsyncEngineHost, request_id: str, queue: asyncio.Queue) -> None:
        self.request_id = request_id
        self._owner = owner
        self._queue = queue
        self._done = False
        self.at: float | None = None

    def __aiter__(self) -> "AsyncRequestEvents":
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        ev, self.at = await self._queue.get()
        self._done = isinstance(ev, FinishedEvent)
        return ev

    def ready(self) -> list[tuple[object, float]]:
        """(event, when it left the engine) for the events that have arrived and not been
        read, without waiting (the rest of a burst: a stream writes them together)."""
        out = []
        queue = self._queue
        while not self._done and not queue.empty():
            ev, at = queue.get_nowait()
            self._done = isinstance(ev, FinishedEvent)
            out.append((ev, at))
        return out

    def abort(self) -> None:
        """End the request (its FinishedEvent, reason "abort", still comes)."""
        self._owner.host.abort(self.request_id)

    async def result(self) -> Completion:
        """Wait for the whole answer (as ``RequestHandle.result``)."""
        return Completion.from_events(self.request_id, [ev async for ev in self])
