"""CUDA graphs per device segment of a layer split (``engine.runner.layer_split``).

A decode step of a split model runs its layers device by device. Each GPU's run of
consecutive layers (with the embedding before it, or the final norm and LM head after it,
where that GPU holds them) is one segment, captured per batch bucket like
``DecodeGraphs`` captures the whole model; a CPU's layers run eagerly between them. The
hidden states and residual cross between segments through static buffers: a segment's
graph reads its input buffers and leaves its outputs in tensors it owns, which the next
segment copies in.

Same contract as ``DecodeGraphs.run`` (``execute`` replays either): ids, positions, slots,
context lengths and block tables in, logits of the real rows out (on the head's GPU).
Padding rows run only on the GPUs (slot -1, one junk token of context); a CPU segment
takes the real rows only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine.layers.attention import AttentionMetadata, padded_table_width
from engine.runner.cuda_graphs import batch_buckets, capture_graph

log = logging.getLogger("hearth.runner")


@dataclass(slots=True)
class _Segment:
    device: torch.device
    start: int  # layers [start, stop)
    stop: int
    embeds: bool = False  # runs the embedding first (ids in)
    tail: bool = False  # runs the final norm and the LM head last (logits out)
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)
    outputs: dict[int, tuple] = field(default_factory=dict)  # bucket -> (x, residual) or (logits,)


def segments_of(placement, num_layers: int) -> list[_Segment]:
    """The placement's runs of layers, device by device, and where the embedding and the
    head go (the head on a device of its own after CPU layers: a segment of no layers)."""
    segs: list[_Segment] = []
    for i in range(num_layers):
        d = placement.layer_devices[i]
        if segs and segs[-1].device == d:
            segs[-1].stop = i + 1
        else:
            segs.append(_Segment(d, i, i + 1))
    if placement.embed != segs[0].device:
        segs.insert(0, _Segment(placement.embed, 0, 0))
    segs[0].embeds = True
    if placement.head != segs[-1].device:
        segs.append(_Segment(placement.head, num_layers, num_layers))
    segs[-1].tail = True
    return segs


class _DeviceInputs:
    """One GPU's static step inputs (as ``DecodeGraphs`` keeps them)."""

    def __init__(self, device: torch.device, n: int, width: int, max_model_len: int, block_size: int,
                 hidden: int, dtype: torch.dtype) -> None:
        self.longs = torch.zeros(3, n, dtype=torch.long, device=device)  # ids, positions, slots
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.x = torch.zeros(n, hidden, dtype=dtype, device=device)  # a segment's input
        self.residual = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.max_model_len = max_model_len
        self.block_size = block_size

    def meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.longs[2, :bs], block_tables=self.block_tables[:bs], seq_lens=self.seq_lens[:bs],
            query_start=self.query_start[:bs + 1], seq_lens_cpu=[1] * bs, query_lens_cpu=[1] * bs,
            max_seq_len=self.max_model_len, block_size=self.block_size, max_seq_len_bound=self.max_model_len,
            captured=True)


class SplitDecodeGraphs:
    """Decode graphs of a layer split: one per GPU segment and batch bucket."""

    def __init__(self, model, kv_caches: list[torch.Tensor], placement, block_size: int, max_batch: int,
                 max_model_len: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        self.max_batch = n = self.buckets[-1]
        self.segments = segments_of(placement, len(model.model.layers))
        width = padded_table_width(-(-max_model_len // block_size))
        hidden = model.spec.hidden_size
        self.inputs = {s.device: _DeviceInputs(s.device, n, width, max_model_len, block_size, hidden, model.dtype)
                       for s in self.segments if s.device.type == "cuda"}
        self.device = placement.head
        self.logits_out = torch.empty(n, model.spec.vocab_size, dtype=model.dtype, device=placement.head)
        self.routes = {b: b for b in self.buckets}
        self.bucket_ms: dict[int, float] = {}
        self.pool_bytes = 0
        self.replays = 0
        self._tables: list[list[int]] | None = None  # the last block tables given (tables=None keeps them)

    # -- one segment ---------------------------------------------------------------------
    def _layers(self, seg: _Segment, positions, x, residual, meta):
        layers = self.model.model.layers
        for i in range(seg.start, seg.stop):
            x, residual = layers[i](positions, x, residual, self.kv_caches[i], meta, self.model.rotary)
        return x, residual

    def _graph_forward(self, seg: _Segment, bs: int) -> tuple:
        """What a GPU segment's graph runs, from its device's static inputs."""
        inp = self.inputs[seg.device]
        positions = inp.longs[1, :bs]
        meta = inp.meta(bs)
        if seg.embeds:
            x, residual = self.model.model.embed_tokens(inp.longs[0, :bs]), None
        else:
            x, residual = inp.x[:bs], inp.residual[:bs]
        x, residual = self._layers(seg, positions, x, residual, meta)
        if seg.tail:
            x, _ = self.model.model.norm(x, residual)
            return (self.model.compute_logits(x, out=self.logits_out[:bs]),)
        return x, _residual(x, residual)

    @torch.inference_mode()
    def capture(self, progress=None) -> None:
        """Capture every GPU segment at every bucket, largest first; one memory pool per GPU."""
        t0 = time.perf_counter()
        for inp in self.inputs.values():
            inp.longs[2].fill_(-1)  # capture runs write nothing into the KV cache
        before = {d: torch.cuda.memory_reserved(d) for d in self.inputs}
        pools: dict[torch.device, object] = {}
        gpu_segments = [s for s in self.segments if s.device.type == "cuda"]
        for i, bs in enumerate(reversed(self.buckets)):
            if progress is not None:
                progress(f"capturing CUDA graphs: batch {bs} ({i + 1} of {len(self.buckets)}), "
                         f"{len(gpu_segments)} GPU segment(s)")
            for seg in gpu_segments:
                with torch.cuda.device(seg.device):
                    graph, out = capture_graph(lambda: self._graph_forward(seg, bs), pools.get(seg.device))
                pools.setdefault(seg.device, graph.pool())
                seg.graphs[bs] = graph
                seg.outputs[bs] = out
        for d in self.inputs:
            torch.cuda.synchronize(d)
        self.pool_bytes = sum(torch.cuda.memory_reserved(d) - before[d] for d in self.inputs)
        log.info("captured %d split decode graphs in %.1f s (%.0f MiB)", len(self.buckets) * len(gpu_segments),
                 time.perf_counter() - t0, self.pool_bytes / 2**20)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    # -- a step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, ids, positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]] | None) -> torch.Tensor:
        """One decode step for ``len(positions)`` sequences (``DecodeGraphs.run``'s
        contract); returns their logits [n, vocab] on the head's GPU."""
        n = len(positions)
        bs = self.bucket_for(n)
        pad = bs - n
        if tables is not None:
            self._tables = tables
        tables = self._tables
        on_host = not isinstance(ids, torch.Tensor)
        longs = torch.tensor(([ids + [0] * pad] if on_host else []) + [positions + [0] * pad, slots + [-1] * pad],
                             dtype=torch.long)
        lens = torch.tensor(seq_lens + [1] * pad, dtype=torch.int32)
        width = max(len(t) for t in tables)
        table_rows = torch.tensor([t + [0] * (width - len(t)) for t in tables] + [[0] * width] * pad,
                                  dtype=torch.int32)
        for d, inp in self.inputs.items():
            if on_host:
                inp.longs[:, :bs].copy_(longs, non_blocking=True)
            else:
                inp.longs[1:, :bs].copy_(longs, non_blocking=True)
            inp.seq_lens[:bs].copy_(lens, non_blocking=True)
            inp.block_tables[:bs, :width].copy_(table_rows, non_blocking=True)
        if not on_host:
            first = self.segments[0]
            if first.device.type == "cuda":
                self.inputs[first.device].longs[0, :n].copy_(ids)
            else:
                ids = ids.to(first.device)
        out: tuple = ()
        for k, seg in enumerate(self.segments):
            if seg.device.type == "cuda":
                if k > 0:  # the previous segment's outputs are this one's inputs
                    inp = self.inputs[seg.device]
                    x, residual = out
                    rows = x.shape[0]
                    inp.x[:rows].copy_(x)
                    inp.residual[:rows].copy_(residual)
                seg.graphs[bs].replay()
                out = seg.outputs[bs]
            else:
                out = self._eager(seg, k, out, ids, n, positions, slots, seq_lens, tables, on_host)
        self.replays += 1
        return out[0][:n]

    def _eager(self, seg: _Segment, k: int, prev: tuple, ids, n: int, positions, slots, seq_lens, tables,
               on_host: bool) -> tuple:
        """A CPU segment: the real rows only, with metadata of this step's host lists."""
        d = seg.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long), block_tables=torch.tensor(
                [t + [0] * (padded_table_width(max(len(t) for t in tables)) - len(t)) for t in tables],
                dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start=torch.arange(n + 1, dtype=torch.int32), seq_lens_cpu=list(seq_lens),
            query_lens_cpu=[1] * n, max_seq_len=max(seq_lens), block_size=self.block_size, num_decode=n)
        pos = torch.tensor(positions, dtype=torch.long, device=d)
        if seg.embeds:
            tok = torch.tensor(ids, dtype=torch.long) if on_host else ids[:n]
            x, residual = self.model.model.embed_tokens(tok), None
        else:
            x, residual = (t[:n].to(d) for t in prev)
        x, residual = self._layers(seg, pos, x, residual, meta)
        if seg.tail:
            x, _ = self.model.model.norm(x, residual)
            return (self.model.compute_logits(x),)
        return x, _residual(x, residual)


def _residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual a segment hands on: after the embedding alone (a tied embedding on
    another device than the first layer) there is none yet, and zeros stand in for it (the
    first layer's norm then adds x + 0 = x, exactly what it does without one)."""
    return torch.zeros_like(x) if residual is None else residual
