"""HTTP load on an OpenAI-compatible server, for ``hearth bench --suite serve``.

``concurrency`` clients, each with its own connection, send streaming
``/v1/completions`` requests one after another (a closed loop) until ``prompts`` are all
answered: token-id prompts (exact lengths, any model), ``max_tokens`` with EOS ignored
(Hearth's ``ignore_eos``), greedy. Every SSE chunk that carries a token is timed on
arrival (Hearth streams one chunk per token step); the usage chunk gives the token
count. Raw httpx and a minimal SSE reader rather than the openai SDK: the client must
cost as little as it can, since it shares the machine with the server it measures.
"""

from __future__ import annotations

import asyncio
import json
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
                choices = chunk.get("choices") or []
                if choices and choices[0].get("finish_reason") is None:
                    timing.token(now)
    except Exception as e:  # noqa: BLE001 - one failed request is a figure, not the end of the run
        timing.error = f"{type(e).__name__}: {e}"


async def _drive(base_url: str, api_key: str | None, model: str, prompts: list[list[int]], output_len: int,
                 concurrency: int) -> tuple[list[RequestTiming], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timings = [RequestTiming(sent=0.0) for _ in prompts]
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    url = f"{base_url}/v1/completions"

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = {"model": model, "prompt": prompts[i], "max_tokens": output_len, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                await _one(client, url, body, timings[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        wall = time.perf_counter() - start
    return timings, wall


def drive(base_url: str, api_key: str | None, model: str, prompts: list[list[int]], output_len: int,
          concurrency: int) -> tuple[list[RequestTiming], float]:
    """Answer every prompt with ``concurrency`` in flight; each request's timing, and the
    wall time of the whole run."""
    return asyncio.run(_drive(base_url, api_key, model, prompts, output_len, concurrency))
