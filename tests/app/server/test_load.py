"""Requests that overlap: a client leaving mid-stream (or mid-wait) aborts its request and
frees the engine; 16 concurrent streams all complete, with every token, while /health
answers."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai

from app.services.host_events import RequestStarted
from engine.api import FinishedEvent
from tests.app.server.conftest import API_KEY
from tests.app.services.host_recorder import Recorder

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 200, "ignore_eos": True,
        "temperature": 0}


def engine_idle(host) -> bool:
    stats = host.engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0


def one_finish(recorder: Recorder) -> FinishedEvent:
    started = recorder.wait_for(RequestStarted)[0]
    return recorder.finished(started.request_id)


def test_client_leaving_mid_stream_aborts_its_request(live, host):
    recorder = Recorder()
    unsubscribe = host.subscribe(recorder)
    try:
        with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json={**LONG, "stream": True},
                          headers=AUTH, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the stream is going: then the client leaves
        fin = one_finish(recorder)
    finally:
        unsubscribe()
    assert fin.reason == "abort" and fin.usage.completion_tokens < 200
    recorder.wait(lambda _: engine_idle(host))


def test_client_leaving_before_a_whole_answer_aborts_it(live, host):
    recorder = Recorder()
    unsubscribe = host.subscribe(recorder)
    try:
        body = json.dumps(LONG).encode()
        with socket.create_connection(("127.0.0.1", live.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            recorder.wait_for(RequestStarted)  # taken by the engine: now the client leaves
        fin = one_finish(recorder)
    finally:
        unsubscribe()
    assert fin.reason == "abort" and fin.usage.completion_tokens < 200
    recorder.wait(lambda _: engine_idle(host))


def test_sixteen_concurrent_streams_all_complete(live, host, model_name):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            async def one(i: int):
                stream = await client.chat.completions.create(
                    model=model_name, messages=[{"role": "user", "content": f"Story number {i}"}], max_tokens=12,
                    temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True})
                chunks = [c async for c in stream]
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

            async def health():
                async with httpx.AsyncClient(timeout=30) as h:
                    return (await h.get(f"{live.base_url}/health")).status_code

            streams = asyncio.gather(*(one(i) for i in range(16)))
            checks = await asyncio.gather(*(health() for _ in range(4)))
            return await streams, checks

    results, checks = asyncio.run(main())
    assert checks == [200] * 4
    assert [u.completion_tokens for _, u in results] == [12] * 16
    assert all(text for text, _ in results)
    assert engine_idle(host)
