"""The FastAPI app of Hearth's OpenAI-compatible server, over an ``EngineHost``:
``GET /health``, ``GET /metrics`` (Prometheus: ``app.server.metrics``), ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``
(``app.server.responses``).

Every refusal is OpenAI's error JSON with OpenAI's status (``app.server.errors``): bad
input is a 400 (never a 422 or a 500), a missing key a 401, another model a 404, a body
too large a 413, a full queue a 429 (with Retry-After), no model loaded a 503."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Callable, Sequence

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from app.server.errors import ApiError, error_body, validation_message
from app.server.guard import BODY_READ_S, MAX_BODY_BYTES, Guard
from app.server.logprobs import Logprobs, joined
from app.server.metrics import CountRequests, ServerMetrics
from app.server.observe import RequestLog, RequestRecord
from app.server.schemas import ChatCompletionRequest, CompletionRequest
from app.server.limits import MAX_QUEUE
from app.server.responses import ResponsesRequest, create_response
from app.server.service import OpenAIService, body_size, collect, failure
from app.server.shapes import Chunks, response
from app.server.stream import EventStream, echo_only_sse, sse
from app.services.engine_host import EngineHost
from app.services.ids import unique_hex
from engine.api import FinishedEvent, Timings, Usage

log = logging.getLogger("hearth.server")


def create_app(host: EngineHost, *, api_key: str | None = None, allowed_origins: Sequence[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE,
               body_read_s: float = BODY_READ_S,
               on_request: Callable[[RequestRecord], None] | None = None) -> FastAPI:
    """The server's app. ``api_key``: every route but /health needs it (``Authorization:
    Bearer``); ``allowed_origins``: the browser origins CORS lets in (none by default);
    ``max_queue``: answers that may wait for the engine before new requests get a 429;
    the host is not shut down with the app (its owner does that). ``app.state.service``
    is the ``OpenAIService`` (``abort_all`` for a quick shutdown). ``on_request``: called
    with a ``RequestRecord`` after each request is answered (``app.server.observe``), on
    the event loop's thread."""
    metrics = ServerMetrics(host)
    service = OpenAIService(host, metrics, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="Hearth", description="Hearth's OpenAI-compatible API", lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: health checkers that send it (the status alone)
    async def health():  # (no return type: FastAPI would make a response model of it)
        info = host.model_info
        # An engine that can answer no more (a tensor-parallel rank ended) is unhealthy: a
        # checker restarts the server or reloads, as it would for a server that went away.
        dead = getattr(host.engine, "dead", None) if info is not None else None
        if dead:
            return JSONResponse({"status": "error", "model": info.name, "error": dead}, status_code=503)
        return {"status": "ok" if info is not None else "no_model", "model": info.name if info else None}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        # The engine's stats take its lock (and read device memory): off the event loop.
        body = await run_in_threadpool(metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        info = host.model_info
        data = [] if info is None else [{
            "id": info.name, "object": "model", "created": 0, "owned_by": "hearth",
            "max_model_len": info.max_model_len, "device": info.device, "quantization": info.quantization}]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        name = service.model_name(model_id)
        return {"id": name, "object": "model", "created": 0, "owned_by": "hearth"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _answer(service, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _answer(service, body, request, chat=False)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        return await create_response(service, body, request)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_read_s=body_read_s)
    if allowed_origins:  # outermost: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])  # the SDKs send their own x-stainless-* headers; no credentials
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: refusals count too
    if on_request is not None:
        app.add_middleware(RequestLog, observer=on_request)  # outermost too: it sees every refusal
    return app


async def _answer(service: OpenAIService, body, request: Request, chat: bool):
    model, job, tokenizer = await service.prepare(body, chat, body_size(request))
    logprobs = Logprobs(chat, tokenizer) if job.logprobs else None
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{unique_hex()}"
    created = int(time.time())
    echo_lps = None
    began = time.perf_counter()
    if job.echo is not None and logprobs is not None:  # the prompt's own tokens scored first
        scored = await service.prompt_logprobs(job, body.logprobs)
        echo_lps = [logprobs.prompt(ids, lps) for ids, lps in zip(job.prompts, scored)]
    if job.score_only:
        return _echo_only(service, body, job, rid, created, model, echo_lps, began)
    choices = service.submit(job)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = Chunks(chat, rid, created, model, include_usage, logprobs, job.tools, job.echo, job.n, echo_lps)
        return EventStream(sse(service, choices, chunks, job.n), on_close=lambda: service.done(choices, job.n))
    try:
        answered = await collect(choices, request)
    finally:
        service.done(choices, job.n)
    if not answered:  # the client left: nobody reads this
        return JSONResponse(error_body(400, "the client closed the connection."), status_code=400)
    for choice in choices:
        error = failure(choice)
        if error is not None:
            raise error
    echoed = [None if job.echo is None else job.echo[k // job.n] for k in range(len(choices))]
    lps = None if logprobs is None else [logprobs.format(c.logprobs, len(e or "")) for c, e in zip(choices, echoed)]
    if echo_lps is not None:
        lps = [joined(echo_lps[k // job.n], lp) for k, lp in enumerate(lps)]
    texts = [c.text if e is None else e + c.text for c, e in zip(choices, echoed)]
    return response(chat, rid, created, model, texts, [c.finish for c in choices], job.n, lps, job.tools)


def _is_json(content_type: str | None) -> bool:
    """Whether a Content-Type is JSON's, as FastAPI decides it (application/json, or
    application/*+json, with any parameters)."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _echo_only(service: OpenAIService, body, job, rid: str, created: int, model: str, echo_lps: list | None,
               began: float):
    """Completions' ``echo`` with ``max_tokens: 0`` (legacy OpenAI's and vLLM's way to score
    a prompt): each choice is its prompt's text (with its tokens' logprobs when asked for),
    ``finish_reason: "length"``, no completion tokens; nothing is generated."""
    total_ms = (time.perf_counter() - began) * 1e3  # the prompts' scoring, if any
    finishes = [FinishedEvent(rid, "length", Usage(len(ids), 0), Timings(0.0, 0.0, 0.0, 0.0, total_ms))
                for ids in job.prompts for _ in range(job.n)]
    service.answered_without_engine(finishes, job.n)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = Chunks(False, rid, created, model, include_usage, echo=job.echo, n=job.n, echo_logprobs=echo_lps)
        return EventStream(echo_only_sse(chunks, finishes, job.n))
    texts = [job.echo[k // job.n] for k in range(len(finishes))]
    lps = None if echo_lps is None else [echo_lps[k // job.n] for k in range(len(finishes))]
    return response(False, rid, created, model, texts, finishes, job.n, lps)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc: RequestValidationError):
        errors = list(exc.errors())
        content_type = request.headers.get("content-type")
        if errors and tuple(errors[0].get("loc", ())) == ("body",) and errors[0].get("type") != "missing" \
                and not _is_json(content_type):
            # FastAPI reads a body as JSON only when its Content-Type says so, and so must we:
            # a web page may POST text/plain (or no type) to this machine without a CORS
            # preflight, which a JSON Content-Type needs.
            said = f"this request's is {content_type!r}" if content_type else "this request has none"
            message = ("the request body must be JSON sent with the header Content-Type: application/json "
                       f"({said}): set that header (curl: -H 'Content-Type: application/json'; the OpenAI "
                       "SDKs set it themselves).")
            return JSONResponse(error_body(400, message), status_code=400)
        message, param = validation_message(errors)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        status = exc.status_code
        message = {404: f"there is no route {request.method} {request.url.path}: the API is under /v1 "
                        "(GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/responses).",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(status, str(exc.detail))
        cause = exc.__cause__
        if status == 400 and isinstance(cause, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            message = (f"the request body is not valid UTF-8 ({cause.reason} at byte {cause.start}): send the JSON "
                       "encoded as UTF-8.")
        elif status == 400 and isinstance(cause, RecursionError):  # json's parser past Python's depth
            message = ("the request body's JSON is nested too deeply to read (lists or objects inside each "
                       "other past Python's recursion limit): send a flatter body.")
        return JSONResponse(error_body(status, message), status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # a bug: said as OpenAI would, logged for us
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(500, f"the server failed unexpectedly: {type(exc).__name__}: {exc}"),
                            status_code=500)
