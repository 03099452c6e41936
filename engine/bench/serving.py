"""The serve suite's engine side: the same requests as the HTTP run, offline, and the
latency figures both report.

``hearth bench --suite serve`` (app/commands/serve_bench.py) drives ``hearth serve`` over
HTTP from its own process; to say what the HTTP layer costs it needs the engine's own
rate on the very same work. ``closed_loop`` is that twin: ``concurrency`` requests in
flight through ``Engine.submit`` (a new one the moment one finishes, as a client with
``concurrency`` connections does), every request the same prompt length and
``output_len`` tokens with EOS ignored. Both sides time per request on the client's
clock: TTFT from submission to the first token, inter-token latency (ITL) from each
token's arrival to the next (a delivery that carries k tokens counts as k gaps of 1/k).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestTiming:
    """One request, as its client saw it (seconds on ``time.perf_counter``)."""

    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (when, tokens in that delivery)
    tokens: int = 0  # the answer's token count (usage)
    error: str | None = None
    # The engine's own part of the TTFT (from its submit to its first token: a server's
    # ``hearth`` timings), when known: the rest of ``ttft_s`` is the HTTP path both ways.
    engine_ttft_ms: float | None = None

    def token(self, when: float, count: int = 1) -> None:
        if count > 0:
            self.arrivals.append((when, count))

    @property
    def ttft_s(self) -> float | None:
        return self.arrivals[0][0] - self.sent if self.arrivals else None

    def decode_tok_s(self) -> float | None:
        """Tokens after the first over the time since the first (the request's own rate)."""
        if len(self.arrivals) < 2:
            return None
        span = self.arrivals[-1][0] - self.arrivals[0][0]
        return sum(k for _, k in self.arrivals[1:]) / span if span > 0 else None

    def itls_s(self) -> list[float]:
        out = []
        for (t0, _), (t1, k) in zip(self.arrivals, self.arrivals[1:]):
            out.extend([(t1 - t0) / k] * k)
        return out


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated linearly between ranks; None for none."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(timings: list[RequestTiming], wall_s: float) -> dict:
    """The figures of one run: output tokens/s and requests/s over the wall time; TTFT and
    ITL p50 / p99 in ms; failed requests counted apart (their tokens don't count)."""
    ok = [t for t in timings if t.error is None]
    ttfts = [t.ttft_s * 1e3 for t in ok if t.ttft_s is not None]
    itls = [g * 1e3 for t in ok for g in t.itls_s()]
    tokens = sum(t.tokens for t in ok)
    rates = [r for r in (t.decode_tok_s() for t in ok) if r is not None]
    return {
        "decode_tok_s": percentile(rates, 50),  # the median request's own decode rate
        "output_tok_s": tokens / wall_s if wall_s > 0 else None,
        "request_s": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_ms": percentile(ttfts, 50),
        "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99),
        "itl_p50_ms": percentile(itls, 50), "itl_p99_ms": percentile(itls, 99),
        "num_requests": len(timings), "failed_requests": len(timings) - len(ok),
        "client_tokens": sum(k for t in ok for _, k in t.arrivals),  # tokens the client saw arrive
        "wall_s": wall_s,
        **_ttft_split(ok),
    }


def _ttft_split(ok: list[RequestTiming]) -> dict:
    """The engine's share of the TTFT (p50) and the HTTP path's (each request's TTFT less
    its engine part, p50), when the server reported its timings."""
    pairs = [(t.engine_ttft_ms, t.ttft_s * 1e3) for t in ok if t.engine_ttft_ms is not None and t.ttft_s is not None]
    if not pairs:
        return {}
    return {"engine_ttft_p50_ms": percentile([e for e, _ in pairs], 50),
            "http_ttft_p50_ms": percentile([c - e for e, c in pairs], 50)}


def serve_prompts(vocab_size: int, n: int, prompt_len: int, seed: int, stream: int = 0) -> list[list[int]]:
    """``n`` random prompts of ``prompt_len`` ids (no two share a prefix: no prefix-cache
    hits); ``stream`` picks an independent set (1: the warm-up's)."""
    import numpy as np

    rng = np.random.default_rng([seed, 4, n, prompt_len, stream])
    return rng.integers(0, vocab_size, size=(n, prompt_len)).tolist()


def closed_loop(engine, prompts: list[list[int]], output_len: int, concurrency: int,
                turnaround=None) -> dict:
    """Run ``prompts`` through ``engine`` with ``concurrency`` in flight; the summary.
    ``turnaround`` (a function returning seconds): each finished request's successor is
    sent that long after it ends, as an HTTP client's would be (default: at once)."""
    from engine.api import EngineDeadError, FinishedEvent, Request, SamplingParams, TokenEvent

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    timings = [RequestTiming(sent=0.0) for _ in prompts]
    lock = threading.Lock()
    all_done = threading.Event()
    state = {"next": 0, "finished": 0}

    def submit_next() -> None:  # under the lock
        i = state["next"]
        if i >= len(prompts):
            return
        state["next"] += 1
        timings[i].sent = time.perf_counter()
        try:
            engine.submit(Request(prompt_token_ids=prompts[i], params=params),
                          on_event=lambda ev, i=i: on_event(i, ev))
        except EngineDeadError as e:
            # shut down (Ctrl-C: its aborts end here, not in a logged traceback) or dead: the
            # loop ends, and the wait says why (it waited for requests never sent)
            state["dead"] = str(e)
            all_done.set()

    def on_event(i: int, ev) -> None:  # the engine's thread: quick
        now = time.perf_counter()
        if isinstance(ev, TokenEvent):
            timings[i].token(now, len(ev.token_ids))
        elif isinstance(ev, FinishedEvent):
            timings[i].tokens = ev.usage.completion_tokens
            if ev.reason not in ("length", "stop"):
                timings[i].error = ev.reason
            with lock:
                state["finished"] += 1
                if state["finished"] == len(prompts):
                    all_done.set()
                elif turnaround is None:
                    submit_next()
                else:
                    threading.Timer(turnaround(), locked_submit).start()

    def locked_submit() -> None:
        with lock:
            submit_next()

    start = time.perf_counter()
    with lock:
        for _ in range(min(concurrency, len(prompts))):
            submit_next()
    all_done.wait()
    if "dead" in state:
        raise EngineDeadError(state["dead"])
    return latency_summary(timings, time.perf_counter() - start)


def run_offline_serving(load: dict, prompt_len: int, output_len: int, concurrencies: tuple[int, ...],
                        num_requests: dict[int, int], seed: int, say) -> tuple[dict, dict[int, dict], int]:
    """Load the model with ``load`` (``Engine.load``'s keywords, ``model`` included), run
    the closed loop at each concurrency after a warm-up, unload. Returns the rows' common
    fields (``RowMaker``), each concurrency's summary, and the vocabulary size (the HTTP
    run draws the same prompts from it)."""
    import torch

    from engine.api import Engine, release_memory
    from engine.bench.rows import RowMaker

    options = dict(load)
    model = options.pop("model")
    say(f"loading {model} for the offline twin of the serving run")
    engine = Engine.load(model, progress=say, **options)
    try:
        info = engine.model_info
        vocab = info.vocab_size
        figures = {}
        for c in concurrencies:
            closed_loop(engine, serve_prompts(vocab, c, prompt_len, seed, stream=1), output_len, c)  # warm-up
            figures[c] = closed_loop(engine, serve_prompts(vocab, num_requests[c], prompt_len, seed),
                                     output_len, c)
            say(f"offline, {c} in flight: {figures[c]['output_tok_s']:.1f} tok/s")
        common = RowMaker(info.name, torch.device(info.device), getattr(torch, info.dtype), info.attention,
                          info.quantization).common
        common["attention"] = info.attention
    finally:
        engine.shutdown()
        del engine
        release_memory()
    return common, figures, vocab
