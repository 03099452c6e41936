"""The server's side of the engine host: a request's checks against the model loaded now,
its choices submitted as engine requests, their events read on the event loop (through
``AsyncEngineHost``: pushed by the host's threads with ``loop.call_soon_threadsafe`` into
a queue per request), and every request still running aborted when asked (shutdown, a
client gone)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from app.server.errors import ApiError
from app.server.limits import MAX_QUEUE, RETRY_AFTER_S
from app.server.metrics import ServerMetrics
from app.server.observe import note_usage
from app.server.translate import Job, build_job
from app.services.engine_host import NO_MODEL, EngineHost
from app.services.host_async import AsyncEngineHost, AsyncRequestEvents
from app.services.host_events import RequestStarted
from engine.api import (FinishedEvent, HearthError, ModelOutputError, PromptProgressEvent, Request, TokenEvent,
                        prompt_logprobs)

#: Request bodies up to this many bytes (without tools or a response format: their template
#: or grammar may take milliseconds) are turned into engine work on the event loop itself.
INLINE_BODY_BYTES = 2048
#: Echo-with-logprobs requests scored at once (each holds a worker thread while its prompts
#: wait for the engine's thread; the rest get a 429 rather than starving the pool).
MAX_SCORING = 4
NO_MODEL_503 = "no model is loaded: load one (hearth serve --model M, or the Models page) and try again."
SHUTTING_DOWN = "the server is shutting down: this answer was stopped before it was finished."


class Choice:
    """One choice's engine request, read on the loop: its text so far and how it ended."""

    def __init__(self, events: AsyncRequestEvents, metrics: ServerMetrics | None = None,
                 engine_dead: Callable[[], str | None] | None = None) -> None:
        self.events = events
        #: Why the engine can answer no more (None while it can): a request refused before it
        #: started because the engine had just died is a 503, not a bad request's 400.
        self.engine_dead = engine_dead or (lambda: None)
        self.started = False
        self.scheduled = False  # the engine has begun reading its prompt (it no longer waits)
        self.finish: FinishedEvent | None = None
        self.texts: list[str] = []
        self.logprobs: list = []  # every token's TokenLogprob, when asked for
        self.pending_logprobs: list = []  # those not yet sent in a stream chunk
        self._metrics = metrics
        self._last_token_at: float | None = None  # when the latest token arrived (perf_counter)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def take(self, ev, at: float | None = None) -> str | None:
        """Note one event (``at``: when it left the engine, for the inter-token latency;
        default now); returns its new text ("" for tokens that add none), None for events
        that carry no token."""
        if isinstance(ev, RequestStarted):
            self.started = True
        elif isinstance(ev, PromptProgressEvent):
            self.scheduled = True
        elif isinstance(ev, TokenEvent):
            self.scheduled = True
            self._timed(len(ev.token_ids), at)
            if ev.logprobs:
                self.logprobs.extend(ev.logprobs)
                self.pending_logprobs.extend(ev.logprobs)
            if ev.text:
                self.texts.append(ev.text)
                return ev.text
            if ev.token_ids:
                return ""  # tokens that add no text yet (half a character, a skipped special token)
        elif isinstance(ev, FinishedEvent):
            self.scheduled = True
            self.finish = ev
        return None

    def take_logprobs(self) -> list:
        """The logprobs not yet sent (a stream's chunk takes them with its text)."""
        out, self.pending_logprobs = self.pending_logprobs, []
        return out

    def _timed(self, tokens: int, at: float | None = None) -> None:
        """The inter-token latency histogram: the gap since the previous token (as the
        engine made them: a busy loop that reads a burst late must not record zeros)."""
        now = time.perf_counter() if at is None else at
        if self._metrics is not None and self._last_token_at is not None and tokens:
            gap = (now - self._last_token_at) / tokens
            for _ in range(tokens):
                self._metrics.itl.observe(gap)
        self._last_token_at = now


class OpenAIService:
    """Made by the app factory; ``start`` on the event loop (the app's lifespan).
    ``max_queue``: how many of this server's answers may wait for the engine (not yet
    running) before a new request is refused with a 429."""

    def __init__(self, host: EngineHost, metrics: ServerMetrics | None = None, max_queue: int = MAX_QUEUE) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.host = host
        self.metrics = metrics
        self.max_queue = max_queue
        self._async: AsyncEngineHost | None = None
        self._live: set[Choice] = set()
        self._scoring = 0  # echo-with-logprobs prompts being scored now
        self.closing = False

    def start(self) -> None:
        self._async = AsyncEngineHost(self.host, asyncio.get_running_loop())

    def close(self) -> None:
        self.abort_all()
        if self._async is not None:
            self._async.close()

    def abort_all(self) -> None:
        """End every request this server started (from any thread: host.abort posts)."""
        self.closing = True
        for choice in list(self._live):
            choice.events.abort()

    # -- a request ---------------------------------------------------------------------
    def model_name(self, asked: str | None) -> str:
        """The loaded model's name, or a 503 (none loaded) / 404 (another one asked for)."""
        info = self.host.model_info
        if info is None:  # (an engine process that ended says so: EngineProcess.unavailable)
            raise ApiError(503, getattr(self.host, "unavailable", None) or NO_MODEL_503, code="model_not_loaded")
        if asked is not None and asked not in _names(info):
            raise ApiError(404, f"the model {asked!r} is not loaded here: this server answers with "
                           f"{info.name!r} (GET /v1/models lists it).", "model", "model_not_found")
        return info.name

    async def prepare(self, body, chat: bool, body_bytes: int = 0) -> tuple[str, Job, object]:
        """The model's name, the engine's work, and the tokenizer that made it.
        ``body_bytes``: the request body's size (0: unknown)."""
        model = self.model_name(body.model)
        engine = self.host.engine  # the tokenizer of the model that answers now
        info = self.host.model_info
        if engine is None or info is None:
            raise ApiError(503, NO_MODEL_503, code="model_not_loaded")
        if getattr(engine, "dead", None):  # it can answer no more (a tensor-parallel rank ended)
            raise ApiError(503, engine.dead, code="model_not_loaded")
        args = (body, chat, engine.tokenizer, info.max_model_len, info.vocab_size)
        if 0 < body_bytes <= INLINE_BODY_BYTES and not getattr(body, "tools", None) \
                and getattr(body, "response_format", None) is None:
            # A short plain request is tokenized here (a few hundred µs at most), where the
            # hop to a worker thread and back cost 25-60 ms under load (each side waits for
            # the GIL behind the engine's thread and the streams: benchmarks/serve_overhead.py).
            job = build_job(*args)
        else:  # a long chat takes a while to tokenize: off the event loop
            job = await run_in_threadpool(build_job, *args)
        return model, job, engine.tokenizer

    async def prompt_logprobs(self, job: Job, top: int) -> list[list]:
        """Each prompt's own tokens scored (completions' echo with logprobs): one prefill
        per prompt on the engine's thread, between its steps."""
        engine = self.host.engine
        if engine is None:
            raise ApiError(503, NO_MODEL_503, code="model_not_loaded")
        # Refused as the answers would be (shutting down, queue full), before the prefill;
        # and a few at a time: each holds a worker thread while it waits for the engine.
        self._check_room(job)
        if self._scoring >= MAX_SCORING:
            raise ApiError(429, f"the server is busy scoring {self._scoring} prompts for echo with logprobs: try "
                           "again in a moment.", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        self._scoring += 1
        try:
            # (an engine in another process scores there: ``EngineProcess``)
            score = getattr(engine, "score_prompt", None) or (lambda ids, top: prompt_logprobs(engine, ids, top))
            return await run_in_threadpool(lambda: [score(ids, top) for ids in job.prompts])
        except ModelOutputError as e:  # the model's numbers broke: trying again won't help
            raise ApiError(500, str(e)) from None
        except HearthError as e:  # no room in the KV cache now, the engine gone
            raise ApiError(503, f"the prompt could not be scored for echo with logprobs now ({e}): try again in "
                           "a moment, or leave out logprobs.") from None
        finally:
            self._scoring -= 1

    def submit(self, job: Job) -> list[Choice]:
        self._check_room(job)
        choices = []
        for k, params in enumerate(job.params):
            ids = job.prompts[k // job.n]
            # prompt_progress: its first PromptProgressEvent says it left the queue.
            request = Request(prompt_token_ids=ids, params=params, prompt_progress=True)
            choice = Choice(self._async.submit(request), self.metrics,
                            lambda: getattr(self.host.engine, "dead", None))
            self._live.add(choice)
            choices.append(choice)
        return choices

    def _check_room(self, job: Job) -> None:
        """A 503 while shutting down; a 429 when the job's answers would overfill the queue."""
        if self.closing:
            raise ApiError(503, "the server is shutting down: try again once it is back.")
        # Counted here, on the loop, where choices are added: no race between two checks.
        # Only answers not yet running count, so a refusal never touches a running one.
        waiting = sum(1 for c in self._live if not c.scheduled)
        # a request of several answers counts them all (one alone may still run when none wait)
        if waiting >= self.max_queue or (waiting and waiting + len(job.params) > self.max_queue):
            asked = len(job.params)
            mine = (f"; this request's {asked} would make {waiting + asked}"
                    if asked > 1 and waiting < self.max_queue else "")
            raise ApiError(429, f"the server is busy: {waiting} answers are already waiting for the model "
                           f"(the limit is {self.max_queue}, hearth serve --max-queue{mine}). Try again in a "
                           "moment" + (", or ask for fewer answers (n)." if mine else "."),
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

    def answered_without_engine(self, finishes: list[FinishedEvent], n: int = 1) -> None:
        """Count the answers of a request that generated nothing (completions' echo with
        max_tokens 0), as ``done`` counts the engine's."""
        if self.metrics is not None:
            self.metrics.answered(finishes, n)
        note_usage(finishes, n)

    def done(self, choices: list[Choice], n: int = 1) -> None:
        """Abort the choices still running (a client gone, a failed sibling), count the
        finished ones' tokens (``n`` choices per prompt) and forget them. Once: a second
        call for the same choices does nothing."""
        if not any(c in self._live for c in choices):
            return
        finishes = [c.finish for c in choices]
        if self.metrics is not None:
            self.metrics.answered(finishes, n)
        note_usage(finishes, n)  # the request log's tokens (when one watches)
        for choice in choices:
            if choice.finish is None:
                choice.events.abort()
            self._live.discard(choice)


def failure(choice: Choice) -> ApiError | None:
    """The error of a choice that ended without an answer (None: it has one)."""
    fin = choice.finish
    if fin.reason in ("stop", "length"):
        return None
    if fin.reason == "abort":
        return ApiError(503, SHUTTING_DOWN, code="aborted")
    message = fin.error or "the engine failed while answering."
    if not choice.started:  # refused before it reached the engine
        if message == NO_MODEL:
            return ApiError(503, NO_MODEL_503, code="model_not_loaded")
        if choice.engine_dead():  # (it died between this request's check and its submit)
            return ApiError(503, message, code="model_not_loaded")
        return ApiError(400, message)
    return ApiError(500, message)


async def collect(choices, request: HttpRequest) -> bool:
    """Read every choice to its end (True); False when the client left first (the
    caller's ``done`` then aborts them)."""
    async def read(choice) -> None:
        async for ev in choice.events:
            choice.take(ev, choice.events.at)

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    readers = asyncio.ensure_future(asyncio.gather(*(read(c) for c in choices)))
    watcher = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({readers, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not readers.done():
            readers.cancel()
            # its outcome (the readers' CancelledError) is taken when it settles: asyncio logged
            # "exception was never retrieved" with a traceback at every disconnect
            readers.add_done_callback(_settled)
    if not readers.done() or readers.cancelled():
        return False
    readers.result()
    return True


def _settled(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def body_size(request: HttpRequest) -> int:
    """The request body's declared size in bytes (0: not declared, a chunked upload)."""
    try:
        return max(0, int(request.headers.get("content-length") or 0))
    except ValueError:
        return 0


def _names(info) -> set[str]:
    return {n for n in (info.name, info.ref, info.path) if n}
