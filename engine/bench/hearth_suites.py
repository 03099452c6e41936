"""Hearth's side of the suites, driven through the real ``Engine`` (submit / result).

Timings come from the engine itself: per request from ``Completion.timings`` (TTFT, the
per-sequence decode rate), per step from a ``StepProbe`` that listens to the engine's
steps (``Engine.add_step_listener``: the batch-N decode rate and the KV-cache waste).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from engine.api import Completion, Engine, HearthError, Request, SamplingParams, StepInfo
from engine.bench.workload import TimedRequest, Workload


class BenchRunError(HearthError, RuntimeError):
    """A benchmark request did not produce the tokens it was asked for."""


class StepProbe:
    """Records every engine step while active (a context manager), as the engine's own
    ``StepInfo``: it listens through ``Engine.add_step_listener``, which the engine calls
    once per step, on its thread, right after the sampled ids reached the host as integers
    (so the device has finished the step)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.records: list[StepInfo] = []

    def __enter__(self) -> "StepProbe":
        self._engine.add_step_listener(self.records.append)
        return self

    def __exit__(self, *exc) -> None:
        self._engine.remove_step_listener(self.records.append)

    def aggregate_decode_tok_s(self, num_seqs: int) -> float:
        """See ``aggregate_decode_tok_s``."""
        return aggregate_decode_tok_s(self.records, num_seqs)

    def kv_waste_pct(self) -> float:
        """See ``kv_waste_pct``."""
        return kv_waste_pct(self.records)


def aggregate_decode_tok_s(records: list[StepInfo], num_seqs: int) -> float:
    """Tokens/s of all sequences together once every one of them has its first token.

    The window starts at the step in which the last of ``num_seqs`` sequences got its
    first token and ends at the last step; it counts the tokens sampled after its start.
    So staggered admission (prefill chunks, submission order) is left out, and the rate
    is that of decoding the whole batch, the early finishers' tail included.
    """
    seen, start = 0, None
    for i, r in enumerate(records):
        seen += r.first_tokens
        if seen >= num_seqs:
            start = i
            break
    if start is None or start == len(records) - 1:
        return 0.0
    tokens = sum(r.later_tokens for r in records[start + 1:])
    span = records[-1].finished_at - records[start].finished_at
    return tokens / span if span > 0 else 0.0


def kv_waste_pct(records: list[StepInfo]) -> float:
    """Mean over steps of (allocated - used) / allocated KV slots, in percent."""
    ratios = [(r.kv_slots_allocated - r.kv_slots_used) / r.kv_slots_allocated
              for r in records if r.kv_slots_allocated]
    return 100.0 * statistics.fmean(ratios) if ratios else 0.0


def _run(engine: Engine, prompts: list[list[int]], output_lens: list[int]) -> list[Completion]:
    """Submit all at once (continuous batching), wait for all; each must run to its length."""
    handles = [engine.submit(Request(prompt_token_ids=p, params=SamplingParams(
        temperature=0.0, ignore_eos=True, max_tokens=n))) for p, n in zip(prompts, output_lens)]
    results = [h.result() for h in handles]
    for c, n in zip(results, output_lens):
        if c.finish_reason != "length" or c.completion_tokens != n:
            raise BenchRunError(
                f"a benchmark request stopped after {c.completion_tokens} of {n} tokens "
                f"({c.finish_reason}{': ' + c.error if c.error else ''}); give the KV cache more "
                "memory (--kv-cache-memory) or use smaller sizes."
            )
    return results


@dataclass(slots=True)
class DecodeResult:
    decode_tok_s: float  # batch 1: per sequence; batch N: aggregate (StepProbe)
    ttft_ms: float
    tokens: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (repeat, i) -> ids


def decode(engine: Engine, workload: Workload, batch: int, prompt_len: int, output_len: int,
           repeats: int) -> DecodeResult:
    """Greedy decode of ``batch`` prompts; repeat 0 warms up, the median of the rest counts."""
    rates, ttfts, tokens = [], [], {}
    for r in range(repeats + 1):
        prompts = workload.decode_prompts(batch, prompt_len, r)
        with StepProbe(engine) as probe:
            done = _run(engine, prompts, [output_len] * batch)
        for i, c in enumerate(done):
            tokens[(r, i)] = c.token_ids
        if r == 0:
            continue
        if batch == 1:
            rates.append(done[0].timings.decode_tok_s)
        else:
            rates.append(probe.aggregate_decode_tok_s(batch))
        ttfts.append(statistics.median(c.timings.ttft_ms for c in done))
    return DecodeResult(statistics.median(rates), statistics.median(ttfts), tokens)


def prefill(engine: Engine, workload: Workload, length: int, repeats: int) -> float:
    """Median TTFT (ms) of one ``length``-token prompt with max_tokens=1, after a warm-up."""
    ttfts = []
    for r in range(repeats + 1):
        with StepProbe(engine) as probe:
            (c,) = _run(engine, [workload.prefill_prompt(length, r)], [1])
        if len(probe.records) != 1:
            raise BenchRunError(
                f"the {length}-token prefill ran in {len(probe.records)} chunks, so its TTFT is "
                "not one forward: raise --max-num-batched-tokens."
            )
        if r:
            ttfts.append(c.timings.ttft_ms)
    return statistics.median(ttfts)


@dataclass(slots=True)
class ThroughputResult:
    output_tok_s: float
    kv_waste_pct: float
    num_preemptions: int
    num_steps: int


def throughput(engine: Engine, requests: list[TimedRequest], warmup: list[TimedRequest]) -> ThroughputResult:
    """All ``requests`` at once; output tokens / wall time, and KV waste sampled per step.

    ``warmup`` (other prompts, so no prefix-cache hits) runs first with short outputs.
    """
    _run(engine, [w.prompt for w in warmup], [min(w.output_len, 4) for w in warmup])
    before = engine.stats().num_preemptions
    with StepProbe(engine) as probe:
        t0 = time.perf_counter()
        done = _run(engine, [q.prompt for q in requests], [q.output_len for q in requests])
        wall = time.perf_counter() - t0
    tokens = sum(c.completion_tokens for c in done)
    return ThroughputResult(tokens / wall, probe.kv_waste_pct(),
                            engine.stats().num_preemptions - before, len(probe.records))
