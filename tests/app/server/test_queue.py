"""``max_queue``: with one answer running (max_num_seqs=1) and the queue full, a new request
gets a 429 in OpenAI's shape with Retry-After, the running answer goes on undisturbed, and
the queued ones are answered once it ends."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from app.server import create_app
from app.services.engine_host import EngineHost
from app.services.host_events import LoadFailed, ModelLoaded
from tests.app.server.conftest import LiveServer, tiny_options
from tests.app.services.host_recorder import Recorder

MAX_QUEUE = 2


@pytest.fixture(scope="module")
def one_at_a_time(tiny_models):
    """A server whose engine runs one answer at a time, and lets 2 wait."""
    host = EngineHost()
    loaded = Recorder()
    unsubscribe = host.subscribe(loaded)
    # A long context, so the running answer is still being written when the 429 comes.
    host.load({**tiny_options(tiny_models["llama-tied"]), "max_num_seqs": 1, "max_model_len": 512})
    ev = loaded.wait_for((ModelLoaded, LoadFailed))[0]
    unsubscribe()
    assert isinstance(ev, ModelLoaded), ev
    try:
        with LiveServer(create_app(host, max_queue=MAX_QUEUE)) as server:
            yield server
    finally:
        assert host.shutdown()


def data_lines(response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_a_full_queue_gets_429_and_running_answers_go_on(one_at_a_time):
    base = one_at_a_time.base_url
    running_body = {"prompt": "x", "max_tokens": 500, "ignore_eos": True, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
    queued_body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=base, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=running_body) as running:
            chunks = data_lines(running)
            next(chunks)  # its first token: it runs, and holds the engine's one place
            queued = [http.stream("POST", "/v1/chat/completions", json=queued_body) for _ in range(MAX_QUEUE)]
            streams, waiting = [], []
            for q in queued:
                streams.append(q.__enter__())
                waiting.append(data_lines(streams[-1]))
                assert next(waiting[-1])["choices"][0]["delta"]["role"] == "assistant"  # submitted; waiting
                if len(waiting) == MAX_QUEUE - 1:  # room for one more answer: a request of two is refused,
                    # and the message says its own answers are what pass the limit
                    many = http.post("/v1/completions", json={"prompt": "y", "max_tokens": 2, "n": 2})
                    assert many.status_code == 429, many.text
                    assert "this request's 2 would make" in many.json()["error"]["message"]
            refused = http.post("/v1/chat/completions", json={**queued_body, "stream": False})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            error = refused.json()["error"]
            assert error["code"] == "queue_full" and "--max-queue" in error["message"]
            assert error["type"] == "rate_limit_exceeded"
            with openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0) as client:
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model=None, prompt="y", max_tokens=2)
            rest = list(chunks)  # the running answer is written to its end: nothing cut it
            assert rest[-1]["usage"]["completion_tokens"] == 500
            assert [c["choices"][0]["finish_reason"] for c in rest if c["choices"]][-1] == "length"
            for w in waiting:  # and the queued ones get their turn
                assert list(w)[-1]["usage"]["completion_tokens"] == 3
            for q in queued:
                q.__exit__(None, None, None)
        ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})  # the queue is empty again
        assert ok.status_code == 200


def test_max_queue_must_be_positive(capsys):
    from app.cli import main

    assert main(["serve", "--max-queue", "0"]) == 2
    assert "--max-queue must be at least 1" in capsys.readouterr().err
