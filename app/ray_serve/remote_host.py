"""``RayEngineHost``: the face of ``EngineHost`` that Hearth's server uses (``model_info``,
``engine``, ``subscribe``, ``submit``, ``abort``, ``shutdown``; ``EngineProcess`` is the
other one), over a Ray Serve deployment of engine replicas. The ingress's FastAPI app
(``app.server.create_app``) runs on it unchanged: chat templates, tokenizing, checks,
streaming and errors happen in the ingress; each engine request goes through a
``DeploymentHandle``, whose request router (prefix-aware when configured) picks the
replica, and its events come back as a stream and go to the subscribers on the ingress's
event loop, as ``EngineHost`` would push them."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from app.ray_serve.calls import EngineCall, routing_key
from app.ray_serve.engine_replica import combined
from app.services.subscribers import Subscribers
from app.services.host_events import RequestStarted, ended
from engine.api import EngineStats, FinishedEvent, InvalidRequestError, Request

log = logging.getLogger("ray.serve")

#: How long a scoring call (echo with logprobs) or a stats read may take.
CALL_TIMEOUT_S = 120.0
STATS_TIMEOUT_S = 5.0
#: Scrapes closer together than this share one read of the board.
STATS_FRESH_S = 0.5
REPLICA_FAILED = "the engine replica answering this request failed ({}): try again (Ray Serve replaces it)."


class RayEngineHost:
    """Make with ``await RayEngineHost.connect(engines, board)`` on the ingress's event
    loop (``engines``: the handle of ``HearthEngine``; ``board``: of ``EngineStatsBoard``).
    ``submit`` is called on that loop (the server's routes); ``abort`` from any thread."""

    def __init__(self, engines, board, described: dict) -> None:
        self._engines = engines
        self._board = board
        self._info = described["info"]
        self.engine = _RemoteEngine(self, described["tokenizer"], described["max_model_len"])
        self.unavailable: str | None = None  # (EngineProcess's attribute: the server reads it)
        self._subscribers = Subscribers("a Ray engine host")
        self._lock = threading.Lock()  # the board's cache
        self._tasks: dict[str, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Answers streamed from each engine replica, by its label (the per-replica metrics).
        self.answers: collections.Counter[str] = collections.Counter()
        self._board_read: tuple[float, dict[str, EngineStats]] = (0.0, {})

    @classmethod
    async def connect(cls, engines, board) -> "RayEngineHost":
        """Ask an engine replica what it serves (waits until one has loaded its model)."""
        return cls(engines, board, await engines.describe.remote())

    # -- EngineHost's face -------------------------------------------------------------
    @property
    def model_info(self):
        return self._info

    def subscribe(self, callback: Callable) -> Callable[[], None]:
        return self._subscribers.add(callback)

    def submit(self, request: Request) -> str:
        """Start streaming ``request`` from a replica (on the running event loop)."""
        rid = request.request_id
        if rid is None:
            raise InvalidRequestError("a request to the engine replicas needs an id")
        if rid in self._tasks:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        self._loop = asyncio.get_running_loop()
        self._tasks[rid] = self._loop.create_task(self._stream(request), name=f"hearth-ray-{rid}")
        return rid

    def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(task.cancel)

    def shutdown(self, timeout_s: float = 0.0) -> bool:
        """End every answer being streamed (the replicas abort theirs); the replicas
        themselves are Ray Serve's to stop."""
        for rid in list(self._tasks):
            self.abort(rid)
        self.unavailable = "the server is shutting down"
        return True

    # -- the streams -------------------------------------------------------------------
    async def _stream(self, request: Request) -> None:
        rid = request.request_id
        started = finished = False
        call = EngineCall(routing_key(request.prompt_token_ids or ()), request=request)
        stream = self._engines.options(stream=True).generate.remote(call)
        try:
            async for replica, burst in stream:
                if not started:
                    self.answers[replica] += 1
                for ev in burst:
                    started = started or isinstance(ev, RequestStarted)
                    finished = finished or isinstance(ev, FinishedEvent)
                    self._publish(ev)
        except asyncio.CancelledError:  # aborted: the replica's generator is cancelled too
            stream.cancel()
            if not finished:
                self._publish(ended(rid, "abort"))
        except Exception as e:  # noqa: BLE001 - a replica that died, no replica to route to
            log.warning("request %s failed on its engine replica: %s", rid, e)
            if not finished:
                if not started:  # the server's failure (a 500), not the client's (a refusal before start: 400)
                    self._publish(RequestStarted(rid, self._info.name, 0))
                self._publish(ended(rid, "error", REPLICA_FAILED.format(type(e).__name__)))
        finally:
            self._tasks.pop(rid, None)

    def _publish(self, ev) -> None:
        self._subscribers.publish(ev)

    # -- the replicas' stats -----------------------------------------------------------
    def replica_stats(self) -> dict[str, EngineStats]:
        """Each live replica's latest engine stats (from the board; blocks: call off the
        event loop, as the server's /metrics does)."""
        with self._lock:
            at, stats = self._board_read
            if time.monotonic() - at < STATS_FRESH_S:
                return stats
        stats = self._board.snapshot.remote().result(timeout_s=STATS_TIMEOUT_S)
        with self._lock:
            self._board_read = (time.monotonic(), stats)
        return stats


class _RemoteEngine:
    """What the server reads of the engine: the tokenizer and context (copied from a
    replica), the deployment's combined stats, and prompt scoring on a replica."""

    def __init__(self, owner: RayEngineHost, tokenizer, max_model_len: int) -> None:
        self._owner = owner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def stats(self) -> EngineStats:
        return combined(list(self._owner.replica_stats().values()))

    def score_prompt(self, ids: list[int], top: int):
        call = EngineCall(routing_key(ids), ids=list(ids), top=top)
        return self._owner._engines.score_prompt.remote(call).result(timeout_s=CALL_TIMEOUT_S)


class ReplicaMetrics:
    """A Prometheus collector for the ingress's ``/metrics``: per engine replica (label
    ``replica``), the answers this ingress streamed from it and its engine's load."""

    def __init__(self, host: RayEngineHost) -> None:
        self._host = host

    def describe(self):
        return []  # the replicas come and go: nothing fixed to check

    def collect(self):
        answers = CounterMetricFamily("hearth_replica_answers", "answers streamed from each engine replica",
                                      labels=["replica"])
        for replica, count in sorted(dict(self._host.answers).items()):  # (a copy: the loop adds to it)
            answers.add_metric([replica], count)
        yield answers
        try:
            stats = self._host.replica_stats()
        except Exception as e:  # noqa: BLE001 - a scrape never fails because the board can't answer
            log.debug("reading the engine replicas' stats failed: %s", e)
            return
        for name, doc, value in (
                ("hearth_replica_num_requests_running", "requests each engine replica is running",
                 lambda s: s.num_running),
                ("hearth_replica_num_requests_waiting", "requests waiting for each engine replica",
                 lambda s: s.num_waiting),
                ("hearth_replica_kv_cache_usage_ratio", "the share of each replica's KV-cache blocks in use",
                 lambda s: s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0),
                ("hearth_replica_prefix_cache_hit_rate", "the share of each replica's prompt tokens its "
                 "prefix cache served", lambda s: s.prefix_cache_hit_rate)):
            gauge = GaugeMetricFamily(name, doc, labels=["replica"])
            for replica, s in stats.items():
                gauge.add_metric([replica], float(value(s)))
            yield gauge
