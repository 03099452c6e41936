"""ServerController: the desktop app's OpenAI-compatible server, on the bridge's own engine
host, so the chat and HTTP clients share one engine (and batch together), and loading
another model in the app changes what the server answers with.

uvicorn runs in a thread (``app.server.background.BackgroundServer``); its callbacks come
on that thread and are handed to the GUI thread by queued signals (a relay object that
lives on the GUI thread), so the event loop never waits for the GUI and the GUI never
waits for the server (``shutdown`` excepted: the window is closing)."""

from __future__ import annotations

import logging

from PySide6.QtCore import QObject, Signal

from app.server.background import BackgroundServer, ServeOptions
from app.server.observe import RequestRecord
from engine.api import InvalidRequestError

log = logging.getLogger("hearth.gui.server")

OFF, ON, STOPPING = "off", "on", "stopping"


class _Relay(QObject):
    """Emitted on the server's thread; connected to the controller on the GUI thread
    (queued across threads)."""

    logged = Signal(object)  # RequestRecord
    stopped = Signal(object)  # None, or the error that ended it


class ServerController(QObject):
    """Start and stop the server on ``host`` (an ``EngineHost``; the bridge's). Signals:
    ``stateChanged(state)`` (``OFF``, ``ON``, ``STOPPING``), ``failed(message)`` (it could
    not start, or ended by itself), ``requestLogged(RequestRecord)``. ``total``, ``ok`` and
    ``errors`` count the requests answered since the app started (``clear_counts``)."""

    stateChanged = Signal(str)
    failed = Signal(str)
    requestLogged = Signal(object)

    def __init__(self, host, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.host = host
        self._relay = _Relay(self)
        self._relay.logged.connect(self._on_logged)
        self._relay.stopped.connect(self._on_stopped)
        self._server: BackgroundServer | None = None
        self.state = OFF
        self.total = self.ok = self.errors = 0

    @property
    def running(self) -> bool:
        return self.state == ON

    @property
    def url(self) -> str | None:
        """The base URL for clients on this machine while it runs."""
        return self._server.url if self._server is not None and self.state == ON else None

    @property
    def port(self) -> int | None:
        """The port listened on while it runs."""
        return self._server.port if self._server is not None and self.state == ON else None

    @property
    def options(self) -> ServeOptions | None:
        return self._server.options if self._server is not None else None

    def start(self, options: ServeOptions) -> bool:
        """Start serving; False (and ``failed`` with the reason) when it can't: another
        address without a key, the port taken, or a stop still finishing."""
        if self.state != OFF:
            self.failed.emit("the server is still stopping: try again in a moment." if self.state == STOPPING
                             else "the server is already running.")
            return False
        relay = self._relay
        server = BackgroundServer(self.host, options, on_request=relay.logged.emit,
                                  on_stopped=relay.stopped.emit, port_advice="choose another port")
        try:
            server.start()
        except InvalidRequestError as e:
            self.failed.emit(_sentence(str(e)))
            return False
        self._server = server
        self._set_state(ON)
        return True

    def stop(self) -> None:
        """Stop serving: the answers being written are aborted (their clients hear why), the
        port closes; ``stateChanged(OFF)`` once it has (returns at once)."""
        if self.state != ON:
            return
        self._set_state(STOPPING)
        self._server.stop()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop and wait for the server to end (the window is closing: its callbacks must not
        outlive the relay)."""
        server = self._server
        if server is None:
            return
        server.stop()
        if not server.join(timeout_s):
            log.warning("the server did not stop within %.0f s", timeout_s)
        self._server = None
        self._set_state(OFF)

    def clear_counts(self) -> None:
        self.total = self.ok = self.errors = 0

    # -- from the server's thread, queued ---------------------------------------------------
    def _on_logged(self, record: RequestRecord) -> None:
        self.total += 1
        if record.ok:
            self.ok += 1
        else:
            self.errors += 1
        self.requestLogged.emit(record)

    def _on_stopped(self, error) -> None:
        if self._server is None:  # after shutdown
            return
        self._server = None
        self._set_state(OFF)
        if error:
            self.failed.emit(_sentence(error))

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.stateChanged.emit(state)


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] if text else text
