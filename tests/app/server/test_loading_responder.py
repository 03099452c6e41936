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
import app.server.loading as loading
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


def test_a_dribbling_client_is_answered_within_the_read_limit(listening, monkeypatch):
    """The limit is on the whole head, not on each read: a byte every 0.3 s doesn't extend it."""
    monkeypatch.setattr(loading, "READ_TIMEOUT_S", 1.0)
    sock, _ = listening
    with LoadingResponder(sock, "org/model"):
        with socket.create_connection(sock.getsockname()[:2]) as slow:
            slow.settimeout(0.3)
            t0, got = time.monotonic(), b""
            for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                try:
                    slow.sendall(bytes([byte]))
                    got = slow.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if got:
                    break
            assert got.startswith(b"HTTP/1.1 503") and time.monotonic() - t0 < 3


def test_many_slow_clients_at_once_still_leave_an_answer_for_the_next(listening, monkeypatch):
    monkeypatch.setattr(loading, "MAX_OPEN", 2)
    sock, base = listening
    with LoadingResponder(sock, "org/model"):
        slow = [socket.create_connection(sock.getsockname()[:2]) for _ in range(3)]
        try:
            time.sleep(0.2)  # both slots taken by silent clients
            r = httpx.get(f"{base}/health", timeout=5)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"  # answered at once
        finally:
            for c in slow:
                c.close()


def test_an_accept_that_fails_once_does_not_end_the_answers(listening):
    """Out of file descriptors for a moment (EMFILE), or a client that reset before it was
    accepted: the port goes on answering."""
    import errno

    sock, base = listening

    class Flaky:
        def __init__(self, real):
            self.real, self.fails = real, [OSError(errno.EMFILE, "Too many open files"), ConnectionAbortedError()]

        def accept(self):
            if self.fails:
                raise self.fails.pop(0)
            return self.real.accept()

        def __getattr__(self, name):
            return getattr(self.real, name)

    with LoadingResponder(Flaky(sock), "org/model"):
        r = httpx.get(f"{base}/health", timeout=5)
    assert r.status_code == 503 and r.json()["status"] == "loading"


def test_cors_preflight_and_head(listening):
    """A page of an allowed origin hears "loading" (its preflight passes, the 503 carries the
    origin); another origin gets no CORS headers; HEAD gets the headers only."""
    sock, base = listening
    with LoadingResponder(sock, "org/model", ("http://localhost:3000",)):
        pre = httpx.options(f"{base}/v1/chat/completions", timeout=5, headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        got = httpx.post(f"{base}/v1/chat/completions", json={}, timeout=5, headers={"Origin": "http://localhost:3000"})
        other = httpx.get(f"{base}/health", timeout=5, headers={"Origin": "http://evil.example"})
        head = httpx.head(f"{base}/health", timeout=5)
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "authorization" in pre.headers["access-control-allow-headers"]
    assert got.status_code == 503 and got.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in other.headers
    assert head.status_code == 503 and head.content == b""


def test_an_absolute_form_target_is_read_for_its_path():
    with socket.socket() as unused:
        responder = LoadingResponder(unused, "m")
    assert b'"status": "loading"' in responder.answer(b"GET http://127.0.0.1:8000/health?x=1 HTTP/1.1\r\n\r\n")
    assert b"model_loading" in responder.answer(b"GET http://127.0.0.1:8000/v1/models HTTP/1.1\r\n\r\n")


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
