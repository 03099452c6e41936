"""Requests that overlap: a client leaving mid-stream (or mid-wait) aborts its request and
frees its KV blocks; 128 simultaneous streams all complete, with every token, while
/health answers throughout, and leave no KV block behind."""

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


def no_kv_block_held(host) -> bool:
    """Every KV block is back on the free list (prefix-cached ones included: free, reusable)."""
    stats = host.engine.stats()
    return stats.kv_blocks_used == 0 and stats.kv_blocks_free == stats.kv_blocks_total


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
    assert no_kv_block_held(host)


def test_client_leaving_before_a_whole_answer_aborts_it(live, host, caplog):
    import gc
    import logging

    caplog.set_level(logging.ERROR, logger="asyncio")
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
    assert no_kv_block_held(host)
    gc.collect()  # (asyncio reports a future's unretrieved exception when it is collected)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_128_simultaneous_streams_all_complete_and_leave_no_kv_block(live, host, model_name):
    """More streams than the engine's batch (32 here): the rest wait their turn, every
    stream gets every token, /health answers all the while, and afterwards the KV cache
    is whole again."""
    n, tokens = 128, 8

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=300) as client:
            async def one(i: int):
                stream = await client.chat.completions.create(
                    model=model_name, messages=[{"role": "user", "content": f"Story number {i}"}],
                    max_tokens=tokens, temperature=0.8, seed=i, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                chunks = [c async for c in stream]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                # one chunk per token step (the first announces the role, the last the finish)
                token_chunks = sum(1 for c in chunks if c.choices and c.choices[0].finish_reason is None
                                   and c.choices[0].delta.role is None)
                assert token_chunks == tokens, (i, token_chunks)
                return text, finish, chunks[-1].usage

            async def health(done: asyncio.Event):
                codes = []
                async with httpx.AsyncClient(timeout=30) as h:
                    while not done.is_set() or not codes:
                        codes.append((await h.get(f"{live.base_url}/health")).status_code)
                        await asyncio.sleep(0.05)
                return codes

            done = asyncio.Event()
            checks = asyncio.create_task(health(done))
            try:
                results = await asyncio.gather(*(one(i) for i in range(n)))
            finally:
                done.set()
            return results, await checks

    results, checks = asyncio.run(main())
    assert checks and set(checks) == {200}
    assert [u.completion_tokens for _, _, u in results] == [tokens] * n
    assert [f for _, f, _ in results] == [["length"]] * n
    assert all(text for text, _, _ in results)
    assert engine_idle(host) and no_kv_block_held(host)


def test_the_serve_bench_load_spreads_its_streams_over_client_processes(live, host, model_name, monkeypatch):
    """``serve_load.drive`` with several client processes (the serve suite's, for many
    streams): every request is answered in full, its timing back in its body's place, and
    the run's wall time spans the processes."""
    from app.services import serve_load

    bodies = serve_load.completion_bodies(model_name, [[5, 6, 7, 8 + i] for i in range(6)], 4)
    for i, body in enumerate(bodies):
        body["max_tokens"] = 2 + i  # tells each timing's body apart
    timings, wall = serve_load.drive(live.base_url, API_KEY, bodies, concurrency=4, processes=2)
    assert [t.error for t in timings] == [None] * 6
    assert [t.tokens for t in timings] == [2, 3, 4, 5, 6, 7]
    assert [sum(k for _, k in t.arrivals) for t in timings] == [2, 3, 4, 5, 6, 7]
    assert wall >= max(t.arrivals[-1][0] - t.sent for t in timings) > 0
    monkeypatch.setattr(serve_load.os, "cpu_count", lambda: 16)
    assert [serve_load.client_processes(c) for c in (1, 8, 9, 16, 64, 128)] == [1, 1, 2, 2, 8, 8]
    monkeypatch.setattr(serve_load.os, "cpu_count", lambda: 2)
    assert serve_load.client_processes(64) == 1
