"""Running the server: uvicorn, whose stop first ends the answers being written, either in
the foreground (``hearth serve``: Ctrl+C) or in a thread of a process that goes on
(``BackgroundServer``: the desktop app's Server toggle, on the app's own engine host, so
the chat and HTTP clients share one engine and batch together).

Stopping never waits for a long answer: every answer this server is writing is aborted
(a stream's client gets an error event saying why, a waiting client a 503), then uvicorn
closes the port and lets the connections finish (at most ``GRACEFUL_S``)."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import uvicorn

from app.server.head_timeout import HeadTimeoutProtocol
from app.server.limits import MAX_QUEUE
from app.server.listen import base_url, bind, exposure_problem
from app.server.observe import RequestRecord
from app.services.engine_host import EngineHost
from engine.api import InvalidRequestError

log = logging.getLogger("hearth.server")

#: How long a stop lets open connections finish once their answers were aborted.
GRACEFUL_S = 5.0


class HearthUvicorn(uvicorn.Server):
    """uvicorn's server for Hearth's app: an exit (Ctrl+C, or ``stop``) first aborts the
    answers being written, so the graceful shutdown has no long stream to wait for."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.service = config.app.state.service
        self.exit_signal: int | None = None  # the signal that stopped it (Ctrl+C: SIGINT)

    def handle_exit(self, sig, frame) -> None:
        self.exit_signal = sig
        self.service.abort_all()
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        """On the server's event loop: abort the answers, then exit."""
        self.service.abort_all()
        self.should_exit = True


def uvicorn_server(app, verbose: bool = False, own_logging: bool = True) -> HearthUvicorn:
    """The uvicorn server for ``app`` (made by ``create_app``). ``own_logging``: let uvicorn
    configure Python's logging (a command does; an app that has its own must say False)."""
    extra = {} if own_logging else {"log_config": None}
    # (http: uvicorn's own protocol, with a limit on how long a request's head may take)
    return HearthUvicorn(uvicorn.Config(app, log_level="info" if verbose else "warning", lifespan="on",
                                        timeout_graceful_shutdown=GRACEFUL_S, access_log=verbose,
                                        http=HeadTimeoutProtocol, **extra))


@dataclass(frozen=True)
class ServeOptions:
    """Where and how to serve: ``host`` (127.0.0.1: this machine only; any other address
    needs ``api_key``), ``port`` (0: any free one), the CORS ``allowed_origins`` and
    ``max_queue`` (see ``create_app``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    max_queue: int = MAX_QUEUE


class BackgroundServer:
    """The server on ``host`` (an ``EngineHost`` its owner keeps and shuts down) in a thread
    of this process. ``start`` binds the port at once (a refusal raises); ``stop`` asks
    and returns at once, ``join`` waits. Callbacks run on the server's thread and must be
    quick: ``on_request(RequestRecord)`` after each answered request, ``on_stopped(error)``
    once the server has ended and its port is closed (``error``: None after ``stop``, else
    why it ended by itself)."""

    def __init__(self, host: EngineHost, options: ServeOptions,
                 on_request: Callable[[RequestRecord], None] | None = None,
                 on_stopped: Callable[[str | None], None] | None = None,
                 port_advice: str = "choose another port") -> None:
        self.host = host
        self.options = options
        self._on_request = on_request
        self._on_stopped = on_stopped
        self._port_advice = port_advice
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_asked = False
        self._server: HearthUvicorn | None = None
        self._thread: threading.Thread | None = None
        self._sock = None
        self.port: int | None = None  # the port listened on (the free one, when 0 was asked)

    @property
    def url(self) -> str | None:
        """The base URL for clients on this machine (``http://127.0.0.1:PORT/v1``)."""
        return base_url(self.options.host, self.port) if self.port is not None else None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Check the options, listen, and start serving in a thread. Raises
        ``InvalidRequestError`` (another address without a key, no model host) or
        ``listen.PortInUse`` (the port can't be had); nothing runs then."""
        from app.server.app import create_app

        if self._thread is not None:
            raise RuntimeError("a BackgroundServer starts once; make another")
        o = self.options
        problem = exposure_problem(o.host, o.api_key, o.allowed_origins)
        if problem:
            raise InvalidRequestError(problem)
        self._sock = bind(o.host, o.port, self._port_advice)
        self.port = self._sock.getsockname()[1]
        try:
            app = create_app(self.host, api_key=o.api_key, allowed_origins=o.allowed_origins,
                             max_queue=o.max_queue, on_request=self._on_request)
            self._server = uvicorn_server(app, own_logging=False)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._run, name=f"hearth-server-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort this server's answers and stop it (from any thread; returns at once)."""
        with self._lock:
            self._stop_asked = True
            loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._server.stop)
            except RuntimeError:  # its loop has closed: it has stopped already
                pass

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the server to end (after ``stop``); returns whether it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the server's thread ---------------------------------------------------------------
    def _run(self) -> None:
        error = None
        try:
            _run_on_loop(self._serve(), self._server.config)
            if not self._server.started and not self._stop_asked:
                error = "the server could not start (see the log for why)."
        except BaseException as e:  # noqa: BLE001 (uvicorn may sys.exit: never out of this thread)
            log.exception("the server failed")
            error = f"the server stopped unexpectedly: {type(e).__name__}: {e}"
        finally:
            self._sock.close()
            with self._lock:
                self._loop = None
        if self._on_stopped is not None:
            try:
                self._on_stopped(error)
            except Exception:
                log.exception("the server's on_stopped callback failed")

    async def _serve(self) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            if self._stop_asked:  # stopped before it began
                return
        await self._server.serve(sockets=[self._sock])



def _run_on_loop(main, config) -> None:
    """Run ``main`` to its end on a new event loop of the kind uvicorn picks for ``config``
    (uvloop where it is installed: ``uvicorn.Server.run`` does the same on the main thread;
    this is its counterpart for the app's server thread). Python 3.10 has no
    ``asyncio.Runner``: asyncio's own loop serves there."""
    factory = config.get_loop_factory() if hasattr(config, "get_loop_factory") else None
    if factory is None or not hasattr(asyncio, "Runner"):
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)
