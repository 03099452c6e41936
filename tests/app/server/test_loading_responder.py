"""``hearth serve`` while its model loads (``app.server.loading``): the port answers at once
with 503 "loading" (``/health``: ``{"status": "loading"}``; the rest: the OpenAI error shape,
which the official client reads), a client that sends half a request holds up nobody, and
``stop`` leaves the socket as ``bind`` made it for uvicorn. Then the wiring in ``run_serve``:
a request made while the engine's process is loading gets that answer."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest

from app.cli import main
from app.server.listen import bind
from app.server.loading import LoadingResponder
from engine.api import ModelLoadError


@pytest.fixture
def listening():
    sock = bind("127.0.0.1", 0)
    yield sock, f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_health_says_loading_at_once(listening):
    sock, base = listening
    with LoadingResponder(sock, "org/model"):
        t0 = time.monotonic()
        r = httpx.get(f"{base}/health?x=1", timeout=5)
        assert time.monotonic() - t0 < 2
    assert r.status_code == 503 and r.json() == {"status": "loading", "model": None}
    assert r.headers["retry-after"] == "5" and r.headers["connection"] == "close"


def test_the_openai_client_hears_why(listening):
    sock, base = listening
    with LoadingResponder(sock, "org/model"):
        with openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as e:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi " * 5000}])
    assert e.value.status_code == 503 and e.value.code == "model_loading"
    assert "org/model" in e.value.message and "still loading" in e.value.message


def test_a_client_sending_half_a_request_holds_up_nobody(listening):
    sock, base = listening
    with LoadingResponder(sock, "org/model"):
        with socket.create_connection(sock.getsockname()[:2]) as slow:
            slow.sendall(b"GET /hea")  # and nothing more
            r = httpx.get(f"{base}/v1/models", timeout=5)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
            slow.settimeout(10)
            assert slow.recv(4096).startswith(b"HTTP/1.1 503")  # answered after its read timeout


def test_stop_hands_the_socket_on_blocking(listening):
    sock, _ = listening
    responder = LoadingResponder(sock, "org/model").start()
    responder.stop()
    responder.stop()  # twice is fine (run_serve's finally)
    assert sock.gettimeout() is None
    # a connection now waits in the queue for whoever accepts next (uvicorn), unanswered meanwhile
    with socket.create_connection(sock.getsockname()[:2]) as c:
        c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        c.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.recv(10)
        conn, _ = sock.accept()
        conn.close()


def test_run_serve_answers_loading_while_the_engine_loads(monkeypatch, capsys):
    port_of: list[int] = []
    seen: list[httpx.Response] = []

    def loading(options):  # stands in for the engine's process: asks the port meanwhile, then fails
        seen.append(httpx.get(f"http://127.0.0.1:{port_of[0]}/health", timeout=5))
        raise ModelLoadError("it did not load")

    real_bind = bind

    def bind_and_remember(host, port, *a, **k):
        sock = real_bind(host, port, *a, **k)
        port_of.append(sock.getsockname()[1])
        return sock

    monkeypatch.setattr("app.commands.serve.EngineProcess.start", loading)
    monkeypatch.setattr("app.commands.serve.bind", bind_and_remember)
    rc = main(["serve", "--model", "shape:tiny", "--device", "cpu", "--port", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "it did not load" in err and "Traceback" not in err
    assert "answers 503 (loading)" in err
    assert seen[0].status_code == 503 and seen[0].json()["status"] == "loading"
    with pytest.raises(httpx.ConnectError):  # the port is let go
        httpx.get(f"http://127.0.0.1:{port_of[0]}/health", timeout=2)
    assert not [t for t in threading.enumerate() if t.name == "hearth-serve-loading"]
