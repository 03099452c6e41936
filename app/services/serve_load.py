"""HTTP load on an OpenAI-compatible server, for ``hearth bench --suite serve``.

``concurrency`` clients, each with its own connection, send streaming requests one after
another (a closed loop) until all are answered: ``completion_bodies`` makes
``/v1/completions`` ones with token-id prompts (exact lengths, any model), ``max_tokens``
with EOS ignored (Hearth's ``ignore_eos``), greedy; any other body (a chat request with a
``response_format``) goes the same way. Every SSE chunk that carries a token is timed on
arrival (Hearth streams one chunk per token step); the usage chunk gives the token
count. Raw httpx and a minimal SSE reader rather than the openai SDK: the client must
cost as little as it can, since it shares the machine with the server it measures. Even
so one client process reads at most about 10k chunks a second (a whole core on the H200
box: ``benchmarks/results/2026-12-02-i16-serve-overhead-standin-h200.json``), and at a
wave's end it sends the requests and reads their first tokens one after another; so the
streams are spread over several processes (``client_processes``), each a closed loop of
its share, started together; the run's wall time spans them all.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing as mp
import os
import queue
import threading
import time

from engine.bench import RequestTiming


async def _one(client, url: str, body: dict, timing: RequestTiming) -> None:
    timing.sent = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                timing.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    timing.error = str(chunk["error"].get("message"))
                    return
                if chunk.get("usage"):
                    timing.tokens = chunk["usage"]["completion_tokens"]
                timing.engine_ttft_ms = _engine_ttft(chunk.get("hearth"), timing.engine_ttft_ms)
                choices = chunk.get("choices") or []
                if choices and choices[0].get("finish_reason") is None and _carries_token(choices[0]):
                    timing.token(now)
    except Exception as e:  # noqa: BLE001 - one failed request is a figure, not the end of the run
        timing.error = f"{type(e).__name__}: {e}"


def _engine_ttft(field, known: float | None) -> float | None:
    """The engine's TTFT (ms) from a chunk's ``hearth`` timings (each choice's finish chunk
    and the usage chunk carry them): the earliest choice's, as the client's TTFT is its
    earliest token; ``known`` so far otherwise."""
    if not isinstance(field, dict):
        return known
    values = [c.get("ttft_ms") for c in field.get("choices", ())] + [field.get("ttft_ms")]
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return min(values + ([known] if known is not None else []), default=known)


def _carries_token(choice: dict) -> bool:
    """A completions chunk, or a chat chunk with content (chat's opening chunk, which
    announces the role, carries no token)."""
    if "text" in choice:
        return True
    delta = choice.get("delta") or {}
    return "content" in delta and "role" not in delta


def completion_bodies(model: str, prompts: list[list[int]], output_len: int) -> list[dict]:
    """Streaming /v1/completions bodies: each prompt's ids, ``output_len`` tokens, EOS ignored."""
    return [{"model": model, "prompt": p, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
             "stream": True, "stream_options": {"include_usage": True}} for p in prompts]


async def _drive(base_url: str, api_key: str | None, path: str, bodies: list[dict],
                 concurrency: int) -> tuple[list[RequestTiming], float, float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timings = [RequestTiming(sent=0.0) for _ in bodies]
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    url = f"{base_url}{path}"

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                await _one(client, url, bodies[i], timings[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
        end = time.perf_counter()
    return timings, start, end


#: Streams per client process. With one process per 16, the client was part of the TTFT the
#: suite measured: at a wave's end one process sends the requests and reads their first
#: tokens one after another. At 16 streams on the H200 box, one process left 16-27 ms of each
#: TTFT outside the engine, two 8-12 ms (benchmarks/results/2026-12-03-i16-serve-clients-*).
STREAMS_PER_CLIENT = 8


def client_processes(concurrency: int) -> int:
    """How many client processes carry ``concurrency`` streams: one per
    ``STREAMS_PER_CLIENT``, at most half the CPUs (the rest are the server's and the
    engine's)."""
    return max(1, min(math.ceil(concurrency / STREAMS_PER_CLIENT), (os.cpu_count() or 1) // 2))


def drive(base_url: str, api_key: str | None, bodies: list[dict], concurrency: int,
          path: str = "/v1/completions", processes: int | None = None) -> tuple[list[RequestTiming], float]:
    """Send every body (streaming) with ``concurrency`` in flight; each request's timing,
    and the wall time of the whole run. ``processes`` (default ``client_processes``): how
    many processes share the streams."""
    procs = min(processes if processes is not None else client_processes(concurrency), concurrency, len(bodies))
    if procs <= 1:
        timings, start, end = asyncio.run(_drive(base_url, api_key, path, bodies, concurrency))
        return timings, end - start
    ctx = mp.get_context("spawn")  # the parent may hold a CUDA context and a model: no fork
    barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [concurrency // procs + (1 if g < concurrency % procs else 0) for g in range(procs)]
    workers = [ctx.Process(target=_client_process, daemon=True,
                           args=(g, base_url, api_key, path, bodies[g::procs], shares[g], barrier, results))
               for g in range(procs)]
    for w in workers:
        w.start()
    try:
        try:
            barrier.wait(timeout=120)  # every process imported and ready: they start together
        except threading.BrokenBarrierError:
            dead = [f"{w.name} (exit {w.exitcode})" for w in workers if w.exitcode is not None]
            raise RuntimeError("the serve bench's client processes did not start: "
                               + (", ".join(dead) + " ended" if dead else "none was ready within 120 s")) from None
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + 4 * 3600
        while len(got) < len(workers):
            try:
                g, *rest = results.get(timeout=1.0)
                got[g] = (g, *rest)
                continue
            except queue.Empty:
                pass
            # a process that ended without reporting (killed: out of memory, a signal) is
            # said at once; one that reported may end as it likes
            gone = [(g, w) for g, w in enumerate(workers) if g not in got and w.exitcode is not None]
            if gone:
                try:  # its result may still be in the pipe: an ended process has flushed it
                    g, *rest = results.get(timeout=5.0)
                    got[g] = (g, *rest)
                    continue
                except queue.Empty:
                    pass
                g, w = gone[0]
                raise RuntimeError(f"client process {g} of the serve bench ended (exit {w.exitcode}) before it "
                                   "reported its requests") from None
            if time.monotonic() > deadline:
                raise RuntimeError("the serve bench's client processes did not finish within 4 hours")
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.terminate()
    timings: list = [None] * len(bodies)
    for g, share, start, end in got.values():
        timings[g::procs] = share
    return timings, max(r[3] for r in got.values()) - min(r[2] for r in got.values())


def _client_process(g: int, base_url: str, api_key: str | None, path: str, bodies: list[dict], concurrency: int,
                    barrier, results) -> None:
    """One client process: wait for the others, run its share, send back (g, timings,
    start, end); a failure is every request's error rather than a hang."""
    barrier.wait(timeout=120)
    try:
        timings, start, end = asyncio.run(_drive(base_url, api_key, path, bodies, concurrency))
    except BaseException as e:  # noqa: BLE001 - reported as the requests' error
        now = time.perf_counter()
        timings = [RequestTiming(sent=now, error=f"client process: {type(e).__name__}: {e}") for _ in bodies]
        start = end = now
    results.put((g, timings, start, end))
