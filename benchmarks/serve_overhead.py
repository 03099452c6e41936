"""The server's own cost per streamed token, with no model: an engine stand-in that steps
like the real one (each step holds the GIL for ``--busy-ms`` of Python, as the engine's
host work does, then waits out the rest of ``--step-ms`` with the GIL free, as it waits
for the GPU) and gives every running request one token per step, behind the real engine
host, app and uvicorn; ``--concurrency`` streaming clients in another process (the serve
suite's load generator). Offline, the stand-in makes concurrency / step tokens a second;
what the clients receive short of that is the server's cost (GIL time taken from the
engine's thread, late steps).

    PYTHONPATH=. python benchmarks/serve_overhead.py [--concurrency 64] [--step-ms 5]
        [--busy-ms 2] [--requests 256] [--output-len 128] [--json F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import threading
import time


class SteppingEngine:
    """Just enough of ``engine.api.Engine`` for the host and the server."""

    def __init__(self, step_s: float, busy_s: float, max_seqs: int) -> None:
        from engine.loader.shape_model import TokenIdsOnlyTokenizer
        from engine.model_info import ModelInfo

        self.model_info = ModelInfo(name="shape:stand-in", ref="shape:stand-in", path=None, source="shape",
                                    model_type="llama", vocab_size=32000, device="cpu", dtype="float32",
                                    attention="torch", max_model_len=4096, implementation="native",
                                    kv_cache_dtype="float32", weight_bytes=1000, kv_cache_bytes=100,
                                    num_kv_blocks=0, cuda_graphs=False)
        self.tokenizer = TokenIdsOnlyTokenizer(32000, "shape:stand-in")
        self.max_model_len = 4096
        self.step_s, self.busy_s, self.max_seqs = step_s, busy_s, max_seqs
        self._lock = threading.Lock()
        self._inbox: list = []
        self._aborts: set[str] = set()
        self._stop = False
        self.steps = 0
        self.late_s = 0.0  # how far steps ran past their deadline in all
        self._thread = threading.Thread(target=self._loop, name="stand-in-engine", daemon=True)
        self._thread.start()

    def submit(self, request, on_event=None):
        with self._lock:
            self._inbox.append([request, on_event, 0])
        return _Handle(request.request_id)

    def abort(self, rid: str) -> None:
        with self._lock:
            self._aborts.add(rid)

    def shutdown(self) -> None:
        self._stop = True
        self._thread.join(5)

    def stats(self):
        return None

    def _loop(self) -> None:
        from engine.api import FinishedEvent, Timings, TokenEvent, Usage

        running: list = []
        deadline = time.perf_counter()
        while not self._stop:
            with self._lock:
                while self._inbox and len(running) < self.max_seqs:
                    running.append(self._inbox.pop(0))
                aborts, self._aborts = self._aborts, set()
            t = time.perf_counter()
            while time.perf_counter() - t < self.busy_s:  # the engine's Python work: holds the GIL
                pass
            keep = []
            for item in running:
                request, on_event, made = item
                rid = request.request_id
                if rid in aborts:
                    on_event(FinishedEvent(rid, "abort", Usage(len(request.prompt_token_ids), made),
                                           Timings(0, 0, 0, 0, 0)))
                    continue
                item[2] = made = made + 1
                on_event(TokenEvent(rid, "x", (7,)))
                if made >= request.params.max_tokens:
                    on_event(FinishedEvent(rid, "length", Usage(len(request.prompt_token_ids), made),
                                           Timings(0.01, 0.5, 0.5, 100.0, 1.0)))
                else:
                    keep.append(item)
            running = keep
            self.steps += 1 if running or keep else 0
            deadline += self.step_s
            now = time.perf_counter()
            if now < deadline:
                time.sleep(deadline - now)  # "the GPU": the GIL is free meanwhile
            else:
                self.late_s += now - deadline
                deadline = now


class _Handle:
    def __init__(self, rid: str) -> None:
        self.request_id = rid
        self.dropped_messages = 0


def serve_in_thread(host, max_queue: int, asyncio_h11: bool = False):
    """The server's app on ``host`` under uvicorn in a thread of this process, on a free
    loopback port, started; returns (server, thread, base URL). Stop it with
    ``server.should_exit = True`` and ``thread.join``."""
    from app.server import create_app
    from app.server.background import uvicorn_server
    from app.server.listen import free_port

    port = free_port()
    server = uvicorn_server(create_app(host, max_queue=max_queue))
    server.config.port = port
    if asyncio_h11:
        server.config.loop, server.config.http = "asyncio", "h11"
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


def _clients(base_url: str, concurrency: int, requests: int, output_len: int, out) -> None:
    from app.services.serve_load import completion_bodies, drive
    from engine.bench import latency_summary

    prompts = [[1, 2, 3, 4] for _ in range(requests)]
    drive(base_url, None, completion_bodies("shape:stand-in", prompts[:concurrency], 4), concurrency)  # warm-up
    cpu = time.process_time()
    timings, wall = drive(base_url, None, completion_bodies("shape:stand-in", prompts, output_len), concurrency)
    out.put({**latency_summary(timings, wall), "client_cpu_s_per_s": (time.process_time() - cpu) / wall})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--busy-ms", type=float, default=2.0)
    ap.add_argument("--asyncio-h11", action="store_true",
                    help="serve on asyncio's loop and h11 (what uvicorn uses without uvloop and httptools)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from app.commands.serve import load_model
    from app.services.engine_host import EngineHost
    from engine.api import ModelCheck

    made: list[SteppingEngine] = []

    def factory(model, progress=None, should_stop=None, **options):
        made.append(SteppingEngine(args.step_ms / 1e3, args.busy_ms / 1e3, args.concurrency))
        return made[-1]

    def check(model, revision=None, progress=None, loaded_device=None, loaded_bytes=0, device=None, **choices):
        return ModelCheck(model, "cpu", 1000, 100, 2**30, True)

    host = EngineHost(engine_factory=factory, model_check=check)
    load_model(host, {"model": "shape:stand-in", "device": "cpu"})
    server, thread, base = serve_in_thread(host, 4 * args.concurrency + 64, args.asyncio_h11)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    engine = made[0]
    cpu0, steps0, late0 = time.process_time(), engine.steps, engine.late_s
    t0 = time.perf_counter()
    proc = ctx.Process(target=_clients, args=(base, args.concurrency, args.requests,
                                              args.output_len, out))
    proc.start()
    fig = out.get()
    proc.join()
    wall = time.perf_counter() - t0
    server.should_exit = True
    thread.join(10)
    host.shutdown()
    ideal = args.concurrency / (args.step_ms / 1e3)
    result = {"loop_http": "asyncio/h11" if args.asyncio_h11 else "auto", "concurrency": args.concurrency, "step_ms": args.step_ms, "busy_ms": args.busy_ms,
              "requests": args.requests, "output_len": args.output_len, "cpus": os.cpu_count(),
              "ideal_tok_s": ideal, "served": fig, "served_vs_ideal": fig["output_tok_s"] / ideal,
              "server_cpu_s_per_s": (time.process_time() - cpu0) / wall,
              "engine_steps": engine.steps - steps0, "engine_late_s": engine.late_s - late0}
    print(f"served {fig['output_tok_s']:.0f} tok/s of {ideal:.0f} ({result['served_vs_ideal']:.2f}); TTFT p50 "
          f"{fig['ttft_p50_ms']:.1f} ms; ITL p50 {fig['itl_p50_ms']:.2f} p99 {fig['itl_p99_ms']:.2f} ms; server "
          f"CPU {result['server_cpu_s_per_s']:.2f} s/s, clients' {fig['client_cpu_s_per_s']:.2f}; engine steps late by {result['engine_late_s']:.2f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
