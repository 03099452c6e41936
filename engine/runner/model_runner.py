"""ModelRunner: turns a scheduled batch into tensors, runs the model, samples.

All device state lives here (weights, KV cache, per-request RNGs); the scheduler only
ever sees block ids. The runner is an object that could live in another process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.scheduler import SchedulerOutput
from engine.layers.attention import AttentionMetadata, get_backend
from engine.models.spec import ModelSpec
from engine.runner.sampler import Sampler, make_generator


@dataclass(slots=True)
class RunnerOutput:
    token_ids: list[int]  # one per scheduled sequence with sample=True, in order
    logprobs: list | None  # per sampled sequence: TokenLogprobs or None


class SamplingMixin:
    """Per-request RNGs and the device sampler, shared by the native and fallback runners."""

    sampler: Sampler
    device: torch.device
    _generators: dict

    def sample(self, logits: torch.Tensor, seqs) -> RunnerOutput:
        gens = []
        for seq in seqs:
            if seq.request_id not in self._generators:
                self._generators[seq.request_id] = make_generator(seq.params.seed, self.device)
            gens.append(self._generators[seq.request_id])
        res = self.sampler(
            logits,
            [s.params for s in seqs],
            [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs],
            gens,
        )
        return RunnerOutput(res.token_ids, res.logprobs)

    def release(self, request_id: str) -> None:
        """Forget per-request device state (its RNG) once the request is finished."""
        self._generators.pop(request_id, None)


class ModelRunner(SamplingMixin):
    """Runs Hearth's native model on the paged KV cache."""

    paged = True  # the KV cache is Hearth's own (prefix caching works)

    def __init__(self, model, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                 block_size: int, attention: str, enforce_eager: bool = False) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.attention = attention
        backend_cls = get_backend(attention)
        reasons = backend_cls.available(device)
        if reasons:
            from engine.errors import InvalidRequestError

            raise InvalidRequestError(
                f"attention backend {attention!r} can't run here: {'; '.join(reasons)}"
            )
        scale = spec.head_dim ** -0.5
        model.set_attention(lambda: backend_cls(spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                                scale, spec.sliding_window))
        if backend_cls.fused_kernels:
            model.use_fused_kernels(True)
        self.backend_cls = backend_cls
        self.enforce_eager = enforce_eager
        self.graphs = None  # DecodeGraphs once captured
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator | None] = {}

    # -- CUDA graphs -------------------------------------------------------------------
    def graphs_reason(self) -> str | None:
        """Why decode steps will run eagerly (None: they will use CUDA graphs)."""
        if self.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if self.enforce_eager:
            return "turned off (enforce_eager)"
        if not self.backend_cls.cuda_graphs:
            return f"the {self.attention!r} attention backend can't be captured in a graph"
        return None

    def graph_reserve_bytes(self, max_batch: int) -> int:
        from engine.runner.cuda_graphs import reserve_bytes

        s = self.spec
        return reserve_bytes(max_batch, s.hidden_size, s.vocab_size, s.intermediate_size,
                             self.dtype.itemsize)

    def capture_graphs(self, max_batch: int, max_model_len: int, progress=None) -> int:
        """Capture decode graphs (after the KV cache exists); returns their pool's bytes."""
        from engine.runner.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(self.model, self.kv_caches, self.device, self.block_size,
                              max_batch, max_model_len)
        graphs.capture(progress)
        self.graphs = graphs
        return graphs.pool_bytes

    # -- memory ------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        return self.spec.kv_bytes_per_token(self.dtype.itemsize) * self.block_size

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        s = self.spec
        shape = (2, num_blocks, self.block_size, s.num_kv_heads, s.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(s.num_layers)]
        self.num_blocks = num_blocks

    @torch.inference_mode()
    def profile_peak_bytes(self, num_tokens: int) -> int:
        """Peak activation memory of one forward over ``num_tokens`` tokens (CUDA only)."""
        if self.device.type != "cuda":
            return 0
        blocks = -(-num_tokens // self.block_size)
        saved = self.kv_caches
        self.allocate_kv_cache(blocks)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        # The token budget may exceed the context (long prefill budgets, short contexts):
        # keep positions inside the RoPE tables.
        pos = torch.arange(num_tokens, device=self.device) % self.model.rotary.max_positions
        meta = self._metadata([list(range(blocks))], [0], [num_tokens])
        hidden = self.model(ids, pos, self.kv_caches, meta)
        self.model.compute_logits(hidden[-1:]).float()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self.kv_caches = saved
        del hidden
        torch.cuda.empty_cache()
        return peak

    # -- a step ------------------------------------------------------------------------
    def _metadata(self, tables: list[list[int]], starts: list[int], qlens: list[int]) -> AttentionMetadata:
        bs = self.block_size
        slots: list[int] = []
        seq_lens = []
        for table, start, n in zip(tables, starts, qlens):
            for p in range(start, start + n):
                slots.append(table[p // bs] * bs + p % bs)
            seq_lens.append(start + n)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        qstart = [0]
        for n in qlens:
            qstart.append(qstart[-1] + n)
        dev = self.device
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start=torch.tensor(qstart, dtype=torch.int32, device=dev),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=list(qlens),
            max_seq_len=max(seq_lens),
            block_size=bs,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if not out.scheduled:
            return RunnerOutput([], None)
        if self.graphs is not None:
            graph_out = self._execute_graph(out)
            if graph_out is not None:
                return graph_out
        ids: list[int] = []
        positions: list[int] = []
        tables, starts, qlens = [], [], []
        for sc in out.scheduled:
            seq = sc.seq
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + sc.num_new_tokens])
            positions.extend(range(start, start + sc.num_new_tokens))
            tables.append(seq.block_table)
            starts.append(start)
            qlens.append(sc.num_new_tokens)
        meta = self._metadata(tables, starts, qlens)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, self.kv_caches, meta)

        rows, sampled = [], []
        end = 0
        for sc, n in zip(out.scheduled, qlens):
            end += n
            if sc.sample:
                rows.append(end - 1)
                sampled.append(sc.seq)
        if not sampled:
            return RunnerOutput([], None)
        logits = self.model.compute_logits(hidden[rows])
        return self.sample(logits, sampled)


    def _execute_graph(self, out: SchedulerOutput) -> RunnerOutput | None:
        """A pure decode step (one new token per sequence, all sampled) by graph replay."""
        scheduled = out.scheduled
        if len(scheduled) > self.graphs.max_batch:
            return None
        bs = self.block_size
        ids, positions, slots, seq_lens, tables, seqs = [], [], [], [], [], []
        for sc in scheduled:
            seq = sc.seq
            if sc.num_new_tokens != 1 or not sc.sample:
                return None
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            positions.append(p)
            table = seq.block_table
            slots.append(table[p // bs] * bs + p % bs)
            seq_lens.append(p + 1)
            tables.append(table)
            seqs.append(seq)
        logits = self.graphs.run(ids, positions, slots, seq_lens, tables)
        return self.sample(logits, seqs)
