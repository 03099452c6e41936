"""The server's gate, before any route runs: the API key (or, without one, a loopback
Host), and the request body's size.

A pure ASGI middleware (not a FastAPI dependency) so that a request without the key is
refused before its body is read or parsed: a 401 whatever the body holds. Keys are
compared in constant time (``hmac.compare_digest``) and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import hmac
from functools import lru_cache

from app.server.errors import ApiError
from app.server.listen import is_loopback

#: Paths anyone may read without the key (load balancers, the GUI's status light).
OPEN_PATHS = frozenset({"/health"})
#: The default limit on a request body (a long chat fits many times over).
MAX_BODY_BYTES = 8 * 1024 * 1024
#: How long a request's body may take to arrive, whole: a client that sends its headers and
#: then trickles the body (or nothing) would otherwise hold a connection and its memory for
#: ever (uvicorn times out idle keep-alive connections, not a body in progress). 8 MiB over
#: a slow 10 Mbit/s link takes about 7 s.
BODY_READ_S = 30.0


@lru_cache(maxsize=256)  # every request asks, nearly always with the same one or two
def loopback_host(host: bytes) -> bool:
    """Whether a request's Host header names this machine's loopback (``localhost``,
    ``127.x.x.x``, ``[::1]``, with or without a port); an absent header (HTTP/1.0, ASGI
    test clients without one) counts as local."""
    text = host.decode("latin-1").strip().lower()
    if not text:
        return True
    if text.startswith("["):  # [IPv6]:port
        name = text[1:text.find("]")] if "]" in text else text
    else:
        name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return is_loopback(name) or name.endswith(".localhost")


class Guard:
    """ASGI middleware: 401 without the right ``Authorization: Bearer <key>`` (when a key
    is set; every path but ``OPEN_PATHS``), 413 for a body over ``max_body_bytes``
    (by its Content-Length, or counted as it arrives when it has none), 408 for a body
    still incomplete after ``body_read_s``."""

    def __init__(self, app, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 body_read_s: float = BODY_READ_S) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self._max = max_body_bytes
        self._body_read_s = body_read_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self._key is None and not loopback_host(headers.get(b"host", b"")):
            # No key: only this machine may call, so a web page whose domain re-resolves to
            # 127.0.0.1 (DNS rebinding) must not: its requests carry its own Host name.
            await _send(ApiError(403, "this server has no API key, so it only answers requests addressed to "
                                 "localhost or 127.0.0.1: give it a key (hearth serve --api-key, or the app's "
                                 "Server page) to allow others.",
                                 code="host_not_allowed"), scope, receive, send)
            return
        if self._key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            if not self._authorized(headers.get(b"authorization", b"")):
                await _send(ApiError(401, "a valid API key is needed: send it as 'Authorization: Bearer "
                                     "<key>' (the key of `hearth serve --api-key`, or of the app's Server page).",
                                     code="invalid_api_key"), scope, receive, send)
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self._max
            except ValueError:
                await _send(ApiError(400, "the Content-Length header is not a number."), scope, receive, send)
                return
            if too_large:
                await _send(self._too_large(), scope, receive, send)
                return
        # The body is read here, whole (it is small: a chat), so that one too large is
        # refused before any route sees it, with or without a Content-Length.
        body: list[bytes] = []

        async def read() -> str | None:  # None: read whole; else why not
            more, size = True, 0
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client left before sending it all
                    return "gone"
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self._max:
                    return "too large"
                body.append(chunk)
                more = message.get("more_body", False)
            return None

        try:  # wait_for, not asyncio.timeout: Python 3.10 has no asyncio.timeout
            problem = await asyncio.wait_for(read(), self._body_read_s)
        except asyncio.TimeoutError:
            await _send(ApiError(408, f"the request body did not arrive within {self._body_read_s:g} s: "
                                 "send it whole, at once.", code="request_timeout"), scope, receive, send)
            return
        if problem == "gone":
            return
        if problem == "too large":
            await _send(self._too_large(), scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        await self.app(scope, replay, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, given = header.partition(b" ")
        # compare_digest on both branches' lengths costs the same whatever the key given.
        ok = hmac.compare_digest(given.strip(), self._key)
        return ok and scheme.lower() == b"bearer"

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than the server's limit of {self._max} bytes: "
                        "send a shorter prompt.", code="request_too_large")


async def _send(error: ApiError, scope, receive, send) -> None:
    await error.response()(scope, receive, send)
