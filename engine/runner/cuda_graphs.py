"""CUDA graphs for decode steps: capture once at load, replay every decode step.

A decode step of a small batch is a few hundred tiny kernels; launched one by one from
Python they cost more host time than the GPU needs to run them. Capturing the whole step
(embedding -> layers -> final norm -> logits) in a CUDA graph per bucketed batch size
turns it into one launch. Inputs live in static buffers the graphs read from; a step
copies its ids, positions, slots, context lengths and block tables in, pads the batch up
to the bucket (padding rows write to slot -1, which the KV-write kernel skips, and see a
context of one junk token), replays, and reads the first ``n`` rows of the logits.

The attention backend must be graph-safe: its decode path may depend only on tensor
contents and on static shapes; ``max_seq_len_bound`` (the model's context length) stands
in for the per-step maximum. All buckets share one memory pool (captured largest first),
and the engine sizes the KV pool with ``reserve_bytes`` set aside before capture.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.layers.attention import AttentionMetadata, padded_table_width

log = logging.getLogger("hearth.runner")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 and every 32 beyond, up to max_batch (itself
    included). Padding a batch of 270 to 288 rows costs little: cuBLAS tiles M by 64 or
    128 anyway, and padding rows attend to nothing; fewer buckets capture faster."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, min(max_batch, 256) + 1, 8))
    sizes += list(range(288, max_batch + 1, 32))
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sorted(set(sizes))


# Buckets of fewer rows are never rerouted: their attention split (and so their speed at
# long contexts) depends on the batch size, which timing at one-token contexts can't see.
MIN_ROUTED_ROWS = 256


def route_buckets(bucket_ms: dict[int, float], margin: float = 0.03,
                  min_rows: int = MIN_ROUTED_ROWS) -> dict[int, int]:
    """Bucket -> the bucket that should serve it. A bucket of at least ``min_rows`` rows
    that is slower by more than ``margin`` than the cheapest bucket at least as large is
    served by the smallest larger bucket within ``margin`` of that cheapest one."""
    routes: dict[int, int] = {}
    sizes = sorted(bucket_ms)
    for i, bs in enumerate(sizes):
        cheapest = min(bucket_ms[c] for c in sizes[i:])
        limit = cheapest * (1 + margin)
        if bs < min_rows or bucket_ms[bs] <= limit:
            routes[bs] = bs
        else:
            routes[bs] = next(c for c in sizes[i:] if bucket_ms[c] <= limit)
    return routes


def capture_graph(forward, pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run ``forward()`` once eagerly (compiles Triton kernels, sets up cuBLAS workspaces),
    then capture it in a new CUDA graph in memory pool ``pool`` (a new pool when None);
    returns the graph and its static output. Graphs sharing a pool must be replayed one
    at a time on one stream, each one's output consumed before the next replay."""
    forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: another engine may be serving on another thread (the app keeps the old
    # model answering while a new one loads); in the default "global" mode any CUDA call of
    # its that is unsafe during a capture would break this capture, or its own step.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = forward()
    return graph, out


def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    """GPU time of one replay (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


POOL_SLACK = 64 * 2**20  # beyond the largest graph's activations: the allocator's rounding


def reserve_bytes(max_batch: int, hidden: int, vocab: int, intermediate: int, itemsize: int) -> int:
    """A decode step's activations at the largest bucket, in the graphs' pool (a few
    [bs, hidden] and [bs, intermediate] buffers and a [bs, vocab] transient). The shared
    logits buffer (``logits_bytes``) and the pool's slack (``POOL_SLACK``) come on top."""
    return max_batch * (4 * hidden + 3 * intermediate + vocab) * itemsize


def logits_bytes(max_batch: int, vocab: int, itemsize: int) -> int:
    """The one [max_batch, vocab] logits buffer every decode bucket writes into."""
    return max_batch * vocab * itemsize


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], device: torch.device, block_size: int,
                 max_batch: int, max_model_len: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        width = padded_table_width(-(-max_model_len // block_size))
        n = self.max_batch
        # ids, positions and slots share one int64 buffer: one host->device copy per step.
        self.longs = torch.zeros(3, n, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Every bucket writes its logits into the head of one buffer: a [bs, vocab] output
        # kept alive per bucket would hold the sum of all bucket sizes in rows (the 35
        # buckets up to 256 sum to 4,231 rows: 1.1 GB at Llama-3's vocabulary in bf16).
        self.logits_out = torch.empty(n, model.spec.vocab_size, dtype=model.dtype, device=device)
        self.logits: dict[int, torch.Tensor] = {}
        self.pool_bytes = 0
        self.replays = 0  # decode steps served by a graph (tests and stats)
        self.bucket_ms: dict[int, float] = {}  # measured replay time of each bucket's graph
        self.routes: dict[int, int] = {}  # bucket -> the (larger or same) bucket that serves it

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.longs[2, :bs], block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs], query_start=self.query_start[:bs + 1],
            seq_lens_cpu=[1] * bs, query_lens_cpu=[1] * bs, max_seq_len=self.max_model_len,
            block_size=self.block_size, max_seq_len_bound=self.max_model_len, captured=True,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.longs[0, :bs], self.longs[1, :bs], self.kv_caches, self._meta(bs))
        return self.model.compute_logits(hidden, out=self.logits_out[:bs])

    @torch.inference_mode()
    def capture(self, progress=None, pool=None) -> None:
        """Capture every bucket, largest first, in one memory pool (``pool``: one that
        other graphs already use, as ``capture_graph`` allows)."""
        t0 = time.perf_counter()
        self.longs[2].fill_(-1)  # capture runs write nothing into the KV cache
        before = torch.cuda.memory_reserved(self.device)
        for i, bs in enumerate(reversed(self.buckets)):
            if progress is not None:
                progress(f"capturing CUDA graphs: batch {bs} ({i + 1} of {len(self.buckets)})")
            graph, self.logits[bs] = capture_graph(lambda: self._forward(bs), pool)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - before
        self.time_buckets()
        log.info("captured %d decode graphs in %.1f s (%.0f MiB); rerouted buckets: %s",
                 len(self.graphs), time.perf_counter() - t0, self.pool_bytes / 2**20,
                 {b: r for b, r in self.routes.items() if b != r} or "none")

    @torch.inference_mode()
    def time_buckets(self, rounds: int = 3, margin: float = 0.03) -> None:
        """Time each bucket's graph and route each bucket of ``MIN_ROUTED_ROWS`` or more to
        a cheaper larger one (``route_buckets``). cuBLAS's kernel choice is not monotone in
        M: on an H100 the 8B shape's GEMMs took 14.5 ms at 448 rows against 10.3 ms at 512,
        so a batch of 440 is served faster padded to a larger graph (padding rows attend to
        one junk token and write no K/V). A larger bucket must win by ``margin``. Rounds go
        over all buckets in turn and each bucket keeps its fastest replay, so clock changes
        during the measurement do not favour the buckets timed later."""
        self.longs[2].fill_(-1)  # timing replays write nothing into the KV cache
        for bs in self.buckets:  # one untimed pass: every graph's first replay
            self.graphs[bs].replay()
        best: dict[int, float] = {}
        for _ in range(rounds):
            for bs in self.buckets:
                ms = replay_ms(self.graphs[bs])
                best[bs] = min(best.get(bs, ms), ms)
        self.bucket_ms = best
        self.routes = route_buckets(self.bucket_ms, margin)

    def bucket_for(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return self.routes.get(b, b)
        return None

    @torch.inference_mode()
    def run(self, ids, positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]] | None) -> torch.Tensor:
        """One decode step for ``len(positions)`` sequences; returns their logits [n, vocab].

        ``ids`` is a host list, or a device tensor (the previous step's sampled tokens,
        copied in on the GPU: no host round trip). ``tables=None`` keeps the block tables
        of the previous launch (valid when no sequence crossed into a new block).
        """
        n = len(positions)
        bs = self.bucket_for(n)
        pad = bs - n
        on_host = not isinstance(ids, torch.Tensor)
        rows = ([ids + [0] * pad] if on_host else []) + [positions + [0] * pad, slots + [-1] * pad]
        longs = torch.tensor(rows, dtype=torch.long)
        if on_host:
            self.longs[:, :bs].copy_(longs, non_blocking=True)
        else:
            self.longs[0, :n].copy_(ids)
            self.longs[1:, :bs].copy_(longs, non_blocking=True)
        self.seq_lens[:bs].copy_(torch.tensor(seq_lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        if tables is not None:
            width = max(len(t) for t in tables)
            table_rows = [t + [0] * (width - len(t)) for t in tables] + [[0] * width] * pad
            self.block_tables[:bs, :width].copy_(torch.tensor(table_rows, dtype=torch.int32),
                                                 non_blocking=True)
        self.graphs[bs].replay()
        self.replays += 1
        return self.logits[bs][:n]
