"""One Hearth engine in a Ray Serve replica (``HearthEngine``), and the board where every
replica posts its engine's stats for the ingress's ``/metrics`` (``EngineStatsBoard``).

A replica is one Ray actor: an ``EngineHost`` loads the model in it (``hearth serve`` puts
the engine in a process of its own for the GIL; a replica already is one), and each
request's events stream back to the ingress a burst at a time (Ray Serve's streaming
generator: one object per yield, so a burst of tokens that piled up while the ingress was
busy goes as one)."""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from app.ray_serve.calls import EngineCall
from app.services.engine_host import EngineHost
from app.services.engine_process import load_and_wait
from app.services.host_async import AsyncEngineHost
from engine.api import EngineStats, FinishedEvent, prompt_logprobs

log = logging.getLogger("ray.serve")  # a replica's log lines go to Serve's replica log

#: How often each replica posts its engine's stats on the board (the gauges' freshness).
STATS_PERIOD_S = 1.0
#: A replica that has not posted for this long is gone (stopped, dead): its stats are dropped.
STATS_STALE_S = 5 * STATS_PERIOD_S


def replica_label() -> str:
    """This replica's short name for metrics: its rank in the deployment (0..N-1, taken
    again by a replica that replaces one), else Serve's unique id."""
    context = serve.get_replica_context()
    rank = getattr(context, "rank", None)
    rank = getattr(rank, "rank", rank)
    return str(rank) if isinstance(rank, int) else context.replica_id.unique_id


class HearthEngine:
    """A Serve deployment class: one engine on ``options`` (``Engine.load``'s keywords with
    ``model``), posting its stats on ``board`` (a handle to ``EngineStatsBoard``)."""

    async def __init__(self, options: dict, board) -> None:
        self.replica = replica_label()
        self._host = EngineHost()
        self._board = board
        # The load blocks for seconds to minutes: off the replica's event loop (its health
        # checks and Serve's calls run there); a failure fails the replica with the reason.
        await asyncio.to_thread(load_and_wait, self._host, options, lambda m: log.info("[hearth] %s", m))
        self._events = AsyncEngineHost(self._host)  # on this replica's event loop
        self._posting = asyncio.get_running_loop().create_task(self._post_stats())

    def describe(self) -> dict:
        """What the ingress needs to serve this model: its ``ModelInfo``, its tokenizer (the
        ingress applies the chat template and tokenizes) and its context length."""
        engine = self._host.engine
        return {"info": self._host.model_info, "tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len}

    async def generate(self, call: EngineCall):
        """Run ``call.request``; yields ``(replica, events)`` per burst, the last burst
        ending with its FinishedEvent. When the ingress cancels the stream (its client
        left, it shuts down), the request is aborted."""
        events = self._events.submit(call.request)
        finished = False
        try:
            async for ev in events:
                burst = [ev, *(e for e, _ in events.ready())]
                finished = isinstance(burst[-1], FinishedEvent)
                yield self.replica, burst
        finally:
            if not finished:
                events.abort()

    async def score_prompt(self, call: EngineCall) -> list:
        """``engine.api.prompt_logprobs`` of ``call.ids`` (completions' echo with logprobs)."""
        return await asyncio.to_thread(prompt_logprobs, self._host.engine, call.ids, call.top)

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine is gone, or dead, is replaced."""
        if self._host.model_info is None or self._host.engine is None:
            raise RuntimeError("the engine in this replica has no model loaded any more")
        # An engine that died (a tensor-parallel rank ended) stays loaded, and would fail
        # every request routed here for good.
        dead = getattr(self._host.engine, "dead", None)
        if dead:
            raise RuntimeError(f"the engine in this replica can answer no more: {dead}")

    async def _post_stats(self) -> None:
        while True:
            try:
                stats = await asyncio.to_thread(self._host.engine.stats)  # takes the engine's lock
                await self._board.report.remote(self.replica, stats)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the next period tries again; serving goes on
                log.debug("posting the engine's stats failed: %s", e)
            await asyncio.sleep(STATS_PERIOD_S)

    def __del__(self) -> None:
        # Serve calls this when it stops the replica: end the answers and free the model.
        posting = getattr(self, "_posting", None)
        if posting is not None:
            posting.cancel()
        host = getattr(self, "_host", None)
        if host is not None:
            host.shutdown()


class EngineStatsBoard:
    """A Serve deployment class (one replica, no CPU of its own): the latest stats each
    engine replica posted, for the ingress's gauges. Ray Serve's handles reach *a*
    replica, never each one in turn, so the replicas post here instead."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, EngineStats]] = {}

    def report(self, replica: str, stats: EngineStats) -> None:
        self._latest[replica] = (time.monotonic(), stats)

    def snapshot(self) -> dict[str, EngineStats]:
        """Each live replica's latest stats, by replica label."""
        now = time.monotonic()
        self._latest = {r: (t, s) for r, (t, s) in self._latest.items() if now - t < STATS_STALE_S}
        return {r: s for r, (_, s) in sorted(self._latest.items())}


def combined(stats: list[EngineStats]) -> EngineStats:
    """Several engines' stats as one (the ingress's ``/metrics`` gauges keep their meaning
    for the whole deployment): counts, blocks and rates add up; the prefix-cache hit rate is
    the mean weighted by the requests each engine finished (its prompt tokens are not in
    the stats); ``block_size`` is the first's (one model, one configuration)."""
    if not stats:
        raise LookupError("no engine replica has posted its stats yet")
    weights = [max(s.requests_finished, 0) for s in stats]
    total = sum(weights)
    hit_rate = (sum(w * s.prefix_cache_hit_rate for w, s in zip(weights, stats)) / total if total
                else sum(s.prefix_cache_hit_rate for s in stats) / len(stats))
    return EngineStats(
        num_running=sum(s.num_running for s in stats), num_waiting=sum(s.num_waiting for s in stats),
        kv_blocks_total=sum(s.kv_blocks_total for s in stats), kv_blocks_used=sum(s.kv_blocks_used for s in stats),
        kv_blocks_free=sum(s.kv_blocks_free for s in stats), block_size=stats[0].block_size,
        prefix_cache_hit_rate=hit_rate, generation_tok_s=sum(s.generation_tok_s for s in stats),
        prompt_tok_s=sum(s.prompt_tok_s for s in stats), num_preemptions=sum(s.num_preemptions for s in stats),
        requests_finished=sum(s.requests_finished for s in stats))
