"""A live server for the tests: the tiny random-weight model on CPU (attention torch)
behind uvicorn on a free loopback port, in a thread, for the whole module; the official
openai client and raw httpx talk to it over real HTTP."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from app.server import create_app
from app.commands.serve import load_model
from app.services.engine_host import EngineHost

API_KEY = "sk-test-hearth-0123456789"


def tiny_options(model) -> dict:
    return {"model": str(model), "device": "cpu", "attention": "torch", "dtype": "float32",
            "max_model_len": 256, "kv_cache_memory": "16MiB", "quantization": "none", "max_num_seqs": 32}


def port_open(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app, **config) -> None:
        """``config``: more of uvicorn.Config's options (``http=``: the protocol class)."""
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="test-uvicorn", daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="package")
def host(tiny_models):
    h = EngineHost()
    load_model(h, tiny_options(tiny_models["llama-tied"]))  # raises with the reason if it fails
    yield h
    assert h.shutdown()


@pytest.fixture(scope="package")
def live(host):
    with LiveServer(create_app(host, api_key=API_KEY, max_body_bytes=64 * 1024)) as server:
        yield server


@pytest.fixture(scope="package")
def client(live):
    import openai

    with openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="package")
def model_name(host) -> str:
    return host.model_info.name
