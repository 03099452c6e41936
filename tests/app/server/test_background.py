"""The server in a thread of a process that goes on (what the desktop app's toggle runs):
its request log (method, path, status, tokens, time), a stop that ends a stream in flight
and closes the port, and the refusals made before anything runs."""

from __future__ import annotations

import socket
import threading

import openai
import pytest

from app.server.background import BackgroundServer, ServeOptions
from app.server.listen import PortInUse, base_url, free_port, parse_origins
from engine.api import InvalidRequestError
from tests.app.server.conftest import port_open


def test_requests_are_logged_and_stop_ends_a_stream_and_closes_the_port(host, model_name):
    records, stopped = [], threading.Event()
    errors: list = []
    server = BackgroundServer(host, ServeOptions(port=0), on_request=records.append,
                              on_stopped=lambda e: (errors.append(e), stopped.set()))
    server.start()
    assert server.port and port_open(server.port)
    assert server.url == f"http://127.0.0.1:{server.port}/v1"
    with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60) as client:
        r = client.chat.completions.create(model=model_name, max_tokens=5, temperature=0,
                                           messages=[{"role": "user", "content": "Hello"}])
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-such-model")
        stream = client.completions.create(model=model_name, prompt="Once", max_tokens=200, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # a stream in flight, then stop
        server.stop()
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
    assert server.join(30) and stopped.wait(5) and errors == [None]
    assert not port_open(server.port)
    chat = next(x for x in records if x.path == "/v1/chat/completions")
    assert (chat.method, chat.status, chat.ok) == ("POST", 200, True)
    assert chat.prompt_tokens == r.usage.prompt_tokens and chat.completion_tokens == r.usage.completion_tokens == 5
    assert 0 < chat.duration_s < 60 and chat.client == "127.0.0.1"
    missing = next(x for x in records if x.path == "/v1/models/no-such-model")
    assert missing.status == 404 and not missing.ok and missing.completion_tokens == 0
    streamed = next(x for x in records if x.path == "/v1/completions")
    assert streamed.status == 200 and streamed.completion_tokens >= 1  # counted up to the stop


def test_a_port_in_use_or_the_network_without_a_key_is_refused_before_anything_runs(host):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = BackgroundServer(host, ServeOptions(port=port))
        with pytest.raises(PortInUse, match=f"port {port} is already in use.*; choose another port"):
            server.start()
        assert not server.running
    with pytest.raises(InvalidRequestError, match="needs an API key"):
        BackgroundServer(host, ServeOptions(host="0.0.0.0", port=free_port())).start()
    with pytest.raises(InvalidRequestError, match="every web page.*needs an API key"):
        BackgroundServer(host, ServeOptions(port=free_port(), allowed_origins=("*",))).start()


def test_origins_are_parsed_and_a_path_is_refused():
    assert parse_origins("http://localhost:3000, https://a.example.com/  http://localhost:3000") == (
        "http://localhost:3000", "https://a.example.com")
    assert parse_origins("") == () and parse_origins("*") == ("*",)
    for bad in ("localhost:3000", "http://a.example.com/app", "ftp://x"):
        with pytest.raises(InvalidRequestError, match="not a web origin"):
            parse_origins(bad)
    assert base_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/v1"
    assert base_url("::1", 9) == "http://[::1]:9/v1"


def test_bind_sets_no_address_reuse_on_windows(monkeypatch):
    """On Windows SO_REUSEADDR lets a second server bind the same port (no error, the
    connections shared between them): there the socket sets no reuse option, as CPython's
    socket.create_server does; elsewhere SO_REUSEADDR (a restart binds past TIME_WAIT)."""
    import socket as socket_module

    import app.server.listen as listen

    options: list[int] = []

    class Recording(socket_module.socket):
        def setsockopt(self, level, name, value):
            options.append(name)
            super().setsockopt(level, name, value)

    monkeypatch.setattr(listen.socket, "socket", Recording)
    listen.bind("127.0.0.1", 0).close()
    assert options == [socket_module.SO_REUSEADDR]
    options.clear()
    monkeypatch.setattr(listen.os, "name", "nt")
    listen.bind("127.0.0.1", 0).close()
    assert options == []
