"""uvicorn's HTTP protocol with a time limit on a request's head (its start line and headers).

uvicorn closes a keep-alive connection left idle after an answer (``timeout_keep_alive``),
but a connection that opens and never finishes its head (nothing sent, or a header a few
seconds at a time: "slowloris") is held forever, and enough of them use up the process's
file descriptors, so that nobody else gets in. Here a connection whose head is not complete
``HEAD_TIMEOUT_S`` after its first byte (or after it opened) is closed, as nginx's
``client_header_timeout`` does (60 s there). A request being answered is never affected.

The base is the protocol uvicorn's ``http="auto"`` would pick (httptools where installed,
else h11); both set ``cycle`` once a request's head is parsed."""

from __future__ import annotations

import asyncio

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # no httptools: uvicorn's pure-Python h11 protocol
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base

#: Seconds a request's head may take from its first byte (or from the connection's opening).
HEAD_TIMEOUT_S = 30.0


class HeadTimeoutProtocol(_Base):
    """``_Base`` that closes a connection whose request head takes over ``HEAD_TIMEOUT_S``."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.get_protocol() is not self:  # upgraded (a WebSocket): no longer ours to time
            self._cancel_head_timer()
        elif self._waiting_for_head():
            self._arm_head_timer()  # not re-armed by later bytes: a dribble doesn't extend it
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        """No request being answered: the bytes so far (if any) are part of a head."""
        cycle = self.cycle
        return cycle is None or cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()
