"""CUDA graphs for one prompt at a time: captured at load, replayed for short prompts.

A chat's time to first token is the prefill of one sequence: a new conversation, or the
new turn after a cached prefix. Run eagerly, a prefill of a few hundred tokens is bound by
the host, not the GPU: the 8B shape's 32 layers launch some 500 kernels from Python, about
20 ms, where the GPU needs about 5 ms for 128 tokens (on an H200, Hearth took 26.7 ms to
the first token of a 128-token prompt, transformers 20.8; results/*-h200-d02591d.json).

So the forward of one sequence with ``Q`` new tokens, over any cached prefix, is captured
for each bucket ``Q`` and replayed for a prompt (or chunk) of ``n <= Q`` tokens:

- the new tokens sit in rows ``0..n-1``; rows ``n..Q-1`` are padding (token 0, position 0,
  slot -1, so nothing is written to the KV cache);
- attention runs the backend's paged prefill kernel with ``query_start = [0, n]`` and
  ``seq_len = prefix + n`` read from device buffers, so each real row sees exactly the keys
  it sees eagerly. Padding rows belong to no sequence (the kernel leaves them alone), and
  every other operation is row-wise, so they never reach a real row;
- the last real row's hidden state is gathered by a device index and goes through the
  head: one row of logits.

Which buckets pay is measured at load: padding costs GPU time, so past some length a
replay padded up to the next bucket is slower than running the prompt eagerly. Each
bucket's replay is timed against an eager forward at the bucket below it (which a prompt
just over that bucket would otherwise run at, at the least); the buckets kept are those up
to the first that doesn't win by ``MARGIN``.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.layers.attention import AttentionMetadata, padded_table_width
from engine.runner.cuda_graphs import capture_graph, replay_ms

log = logging.getLogger("hearth.runner")

# Query-length buckets: padding a prompt to the next one costs at most 2x up to 128 tokens
# (where the GPU's time is mostly the weight read, not the rows) and at most 1.5x beyond.
BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
MARGIN = 0.05


def prompt_buckets(max_tokens: int) -> list[int]:
    """The buckets up to ``max_tokens`` (the step's token budget or the context, if less)."""
    return [b for b in BUCKETS if b <= max_tokens]


def reserve_bytes(max_tokens: int, hidden: int, intermediate: int, itemsize: int) -> int:
    """Activations a replay of ``max_tokens`` rows keeps in the graphs' pool: hidden-sized
    buffers (residual, norms, q, attention and projection outputs) and the MLP's
    [gate | up] and its activation."""
    return max_tokens * (8 * hidden + 3 * intermediate) * itemsize


def keep_buckets(graph_ms: dict[int, float], eager_ms: dict[int, float],
                 margin: float = MARGIN) -> list[int]:
    """Buckets worth replaying, in order: each must beat, by ``margin``, the eager time at
    the bucket below it (at its own for the smallest); stop at the first that doesn't."""
    kept: list[int] = []
    for b in sorted(graph_ms):
        rival = eager_ms[kept[-1] if kept else b]
        if graph_ms[b] > (1 - margin) * rival:
            break
        kept.append(b)
    return kept


class PromptGraphs:
    """One CUDA graph per prompt-length bucket, for steps that are one sequence's prompt
    (or chunk) of more than one token. See the module docstring."""

    def __init__(self, model, kv_caches: list[torch.Tensor], device: torch.device, block_size: int,
                 max_tokens: int, max_model_len: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = prompt_buckets(max_tokens)
        if not self.buckets:
            raise ValueError(f"no prompt-graph bucket fits in {max_tokens} tokens")
        top = self.buckets[-1]
        # ids, positions, slots: one int64 buffer; the last-row index rides in column 0 of row 3.
        self.longs = torch.zeros(4, top, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=device)
        self.query_start = torch.tensor([0, 1], dtype=torch.int32, device=device)
        width = padded_table_width(-(-max_model_len // block_size))
        self.block_table = torch.zeros(1, width, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.graph_ms: dict[int, float] = {}
        self.eager_ms: dict[int, float] = {}
        self.pool = None
        self.replays = 0  # prompt steps served by a graph (tests and stats)

    @property
    def max_tokens(self) -> int:
        """The longest prompt (or chunk) a kept graph serves; 0 when none was kept."""
        return max(self.graphs, default=0)

    def _meta(self, q: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.longs[2, :q], block_tables=self.block_table, seq_lens=self.seq_lens,
            query_start=self.query_start, seq_lens_cpu=[self.max_model_len], query_lens_cpu=[q],
            max_seq_len=self.max_model_len, block_size=self.block_size,
            max_seq_len_bound=self.max_model_len, captured=True,
        )

    def _forward(self, q: int) -> torch.Tensor:
        hidden = self.model(self.longs[0, :q], self.longs[1, :q], self.kv_caches, self._meta(q))
        return self.model.compute_logits(hidden.index_select(0, self.longs[3, :1]))

    def _set_synthetic(self, q: int) -> None:
        """A q-token fresh prompt that writes nothing (capture, timing)."""
        self.longs[0].zero_()
        self.longs[1].copy_(torch.arange(self.longs.shape[1], device=self.device)
                            % self.model.rotary.max_positions)
        self.longs[2].fill_(-1)
        self.longs[3, 0] = q - 1
        self.seq_lens.fill_(q)
        self.query_start[1] = q

    @torch.inference_mode()
    def capture(self, progress=None, pool=None) -> None:
        """Capture every bucket (largest first, one shared memory pool, ``pool`` if given),
        time each replay against eager forwards, and keep the buckets that pay."""
        t0 = time.perf_counter()
        for i, q in enumerate(reversed(self.buckets)):
            if progress is not None:
                progress(f"capturing prompt graphs: {q} tokens ({i + 1} of {len(self.buckets)})")
            self._set_synthetic(q)
            graph, self.logits[q] = capture_graph(lambda: self._forward(q), pool)
            pool = graph.pool() if pool is None else pool
            self.graphs[q] = graph
        self.pool = pool
        self.time_buckets()
        kept = keep_buckets(self.graph_ms, self.eager_ms)
        for q in list(self.graphs):
            if q not in kept:
                del self.graphs[q], self.logits[q]
        log.info("captured prompt graphs in %.1f s; kept up to %d tokens (replay / eager ms: %s)",
                 time.perf_counter() - t0, self.max_tokens,
                 {q: (round(self.graph_ms[q], 2), round(self.eager_ms[q], 2)) for q in self.buckets})

    def keep(self, n: int) -> None:
        """Keep only the ``n`` smallest buckets (what every tensor-parallel rank kept)."""
        for q in sorted(self.graphs)[n:]:
            del self.graphs[q], self.logits[q]

    def time_buckets(self, rounds: int = 3) -> None:
        """Fastest of ``rounds`` for each bucket: the graph's replay (CUDA events) and the
        same forward launched eagerly (host clock around a synchronised run: launch time is
        exactly what the graph saves). Rounds go over all buckets in turn, so clock changes
        during the measurement favour no bucket."""
        for _ in range(rounds):
            for q in self.buckets:
                self._set_synthetic(q)
                ms = replay_ms(self.graphs[q])
                self.graph_ms[q] = min(self.graph_ms.get(q, ms), ms)
                torch.cuda.synchronize(self.device)
                t = time.perf_counter()
                self._forward(q)
                torch.cuda.synchronize(self.device)
                ms = 1e3 * (time.perf_counter() - t)
                self.eager_ms[q] = min(self.eager_ms.get(q, ms), ms)

    def bucket_for(self, n: int) -> int | None:
        return next((q for q in sorted(self.graphs) if q >= n), None)

    @torch.inference_mode()
    def run(self, ids: list[int], start: int, table: list[int]) -> torch.Tensor | None:
        """Prefill ``ids`` (n tokens at positions ``start..start+n-1`` of a sequence whose
        blocks are ``table``); returns the last token's logits [1, vocab], or None when no
        kept bucket holds n tokens (or the table is wider than the captured one)."""
        n = len(ids)
        q = self.bucket_for(n)
        if q is None or len(table) > self.block_table.shape[1]:
            return None
        bs, pad = self.block_size, q - n
        positions = range(start, start + n)
        slots = [table[p // bs] * bs + p % bs for p in positions]
        rows = [ids + [0] * pad, list(positions) + [0] * pad, slots + [-1] * pad, [n - 1] + [0] * (q - 1)]
        self.longs[:, :q].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
        ints = torch.tensor([start + n, n] + table, dtype=torch.int32)
        self.seq_lens.copy_(ints[:1], non_blocking=True)
        self.query_start[1:].copy_(ints[1:2], non_blocking=True)
        self.block_table[0, :len(table)].copy_(ints[2:], non_blocking=True)
        self.graphs[q].replay()
        self.replays += 1
        return self.logits[q]
