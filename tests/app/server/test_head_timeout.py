"""The server closes a connection whose request head never completes (app/server/head_timeout.py):
nothing sent, or headers dribbled a byte at a time, while a normal request, a slow but
complete one and a long answer are untouched."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from fastapi import FastAPI, WebSocket  # (module level: FastAPI resolves the annotation here)

import app.server.head_timeout as head_timeout
from app.server.head_timeout import HeadTimeoutProtocol
from tests.app.server.conftest import LiveServer


def Served(routes=None) -> LiveServer:
    """The conftest's LiveServer on a small app (``routes(api)`` adds more), with the protocol."""
    api = FastAPI()
    if routes is not None:
        routes(api)

    @api.get("/slow")
    async def slow() -> dict:
        import asyncio

        await asyncio.sleep(1.0)  # longer than the head limit: an answer in progress is never cut
        return {"ok": True}

    @api.get("/fast")
    async def fast() -> dict:
        return {"ok": True}

    served = LiveServer(api, http=HeadTimeoutProtocol)
    served.address = ("127.0.0.1", served.port)
    return served


def closed_within(conn: socket.socket, seconds: float) -> bool:
    conn.settimeout(seconds)
    try:
        return conn.recv(100) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def served(monkeypatch):
    monkeypatch.setattr(head_timeout, "HEAD_TIMEOUT_S", 0.4)
    with Served() as s:
        yield s


def test_a_silent_connection_is_closed(served):
    with socket.create_connection(served.address) as c:
        assert closed_within(c, 5)


def test_a_dribbled_head_is_closed_though_bytes_keep_coming(served):
    with socket.create_connection(served.address) as c:
        t0 = time.monotonic()
        closed = False
        for byte in b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
            try:
                c.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if closed_within(c, 0.05):
                closed = True
                break
        assert closed and time.monotonic() - t0 < 3


def test_requests_and_long_answers_are_untouched(served):
    base = f"http://{served.address[0]}:{served.address[1]}"
    with httpx.Client(base_url=base) as client:  # keep-alive: one connection for all
        assert client.get("/slow", timeout=10).json() == {"ok": True}
        time.sleep(0.1)
        assert client.get("/fast", timeout=10).json() == {"ok": True}
    with socket.create_connection(served.address) as c:  # slow but within the limit
        c.sendall(b"GET /fast HTTP/1.1\r\n")
        time.sleep(0.2)
        c.sendall(b"Host: x\r\n\r\n")
        c.settimeout(5)
        assert c.recv(100).startswith(b"HTTP/1.1 200")


def test_a_websocket_is_not_timed_as_a_head(monkeypatch):
    """An upgraded connection belongs to the WebSocket protocol from then on: the head timer
    is cancelled, not left to close it (the server has no WebSocket route today)."""
    pytest.importorskip("websockets")
    from websockets.sync.client import connect

    monkeypatch.setattr(head_timeout, "HEAD_TIMEOUT_S", 0.4)

    def routes(api):
        @api.websocket("/ws")
        async def echo(ws: WebSocket) -> None:
            await ws.accept()
            while True:
                await ws.send_text(await ws.receive_text())

    served = Served(routes)
    with served, connect(f"ws://{served.address[0]}:{served.address[1]}/ws") as client:
        client.send("a")
        assert client.recv(timeout=5) == "a"
        time.sleep(1.0)  # past the head limit
        client.send("b")
        assert client.recv(timeout=5) == "b"
