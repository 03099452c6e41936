"""ModelRunner: runs Hearth's native model on the paged KV cache, one step at a time.

All device state lives here (weights, KV cache, per-request RNGs); the scheduler only
ever sees block ids. A step is plain data in and out (``execute(RunnerInput) ->
RunnerOutput``, in engine/runner/execute.py), so the runner could live in another process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from engine.errors import LoadCancelledError
from engine.layers.attention import AttentionMetadata, padded_table_width
from engine.layers.kernel_plan import KernelPlan
from engine.models.spec import ModelSpec
from engine.runner.execute import NativeExecuteMixin
from engine.runner.request_state import KeptRequest
from engine.runner.scoring import NativeScoreMixin
from engine.runner.sampler import Sampler

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.layers.parallel import TPGroup
    from engine.runner.bring_up import Transform, WeightsSource


log = logging.getLogger(__name__)


class ModelRunner(NativeExecuteMixin, NativeScoreMixin):
    """Runs Hearth's native model on the paged KV cache."""

    cpu_step = None  # CpuDecodeStep: batch-1 decode in one C call (CPU loads; set at bring-up)

    def __init__(self, model, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                 block_size: int, attention: str, plan: KernelPlan, enforce_eager: bool = False,
                 kv_dtype: torch.dtype | None = None) -> None:
        """A runner over ``model`` (loaded, its kernel plan ``plan`` applied); build one
        with ``create``."""
        self.model = model
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # the KV cache's element type (fp8 or the model's)
        self.block_size = block_size
        self.attention = attention
        self.plan = plan
        self.backend_cls = plan.attention
        self.enforce_eager = enforce_eager
        self.load_info: dict = {}  # what bring-up measured (weight_bytes, batch1_matmul, ...)
        self.graphs = None  # DecodeGraphs once captured
        self.prompt_graphs = None  # PromptGraphs once captured (and some bucket pays)
        self._ahead = None  # a decode step launched ahead (greedy pipelining)
        self._pinned = None
        self._ring = 0
        self.steps_ahead_used = 0
        self.kv_caches: list[torch.Tensor] = []
        # A layer split (engine.runner.layer_split): where each layer and the logits are.
        # ``device`` is where a step's inputs go (the embedding's device).
        self.placement = None
        self.logits_device = device
        self.launch_ahead = True  # pipelined greedy decode (off for a split with a CPU segment)
        self.tp = None  # TPGroup: this runner is one rank of a tensor-parallel load
        self.sampler = Sampler()
        self._requests: dict[str, KeptRequest] = {}  # request id -> its params and RNG

    @classmethod
    def create(cls, config: EngineConfig, spec: ModelSpec, weights: WeightsSource, *, device: torch.device,
               dtype: torch.dtype, kv_dtype: torch.dtype | None = None, attention: str, max_model_len: int,
               tp: TPGroup | None = None, progress: Callable[[str], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               transforms: Sequence[Transform] | None = None) -> "ModelRunner":
        """Bring a native model up, ready to serve: build it on the meta device, apply
        ``transforms`` (default: ``model_transforms(config)``), check memory against what
        the transformed model holds, load ``weights`` (a checkpoint folder, or
        ``RandomWeights``) one tensor at a time through each parameter's loader, apply the
        kernel plan of backend ``attention``, size and allocate the KV cache, tune the
        batch-1 GEMV, capture CUDA graphs (``engine/runner/bring_up.py``).

        ``should_stop`` is asked before each weight tensor and between the steps: True
        raises LoadCancelledError. A cancel or failure frees everything taken so far.
        ``tp``: this process's rank of a tensor-parallel load (``engine.runner.tp_host``)."""
        from engine.runner.bring_up import bring_up

        return bring_up(cls, config, spec, weights, device=device, dtype=dtype, kv_dtype=kv_dtype or dtype,
                        attention=attention, max_model_len=max_model_len, tp=tp,
                        progress=progress, should_stop=should_stop, transforms=transforms)

    # -- CUDA graphs -------------------------------------------------------------------
    def graphs_reason(self) -> str | None:
        """Why decode steps will run eagerly (None: they will use CUDA graphs)."""
        if self.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if self.enforce_eager:
            return "turned off (enforce_eager)"
        if not self.backend_cls.cuda_graphs:
            return f"the {self.attention!r} attention backend can't be captured in a graph"
        # A module a transform put in (bitsandbytes' LLM.int8()) may say why it can't be captured.
        return next((m.cuda_graphs_off for m in self.model.modules() if getattr(m, "cuda_graphs_off", None)), None)

    def gemv_reason(self) -> str | None:
        """Why batch-1 matmuls stay on cuBLAS without even trying the Triton GEMV."""
        if not self._gpus():
            return "the Triton GEMV is tuned on CUDA GPUs only"
        if not self.plan.fused:
            return f"the {self.attention!r} backend runs the plain torch reference path"
        return None

    def tune_gemv(self, progress=None) -> dict[str, str]:
        """Fix the batch-1 kernels on each GPU that holds layers; kind -> choice (a split
        over GPUs: each GPU's choice, by device, where they differ)."""
        from engine.runner.gemv_tuning import tune_gemv

        chosen: dict[str, list[str]] = {}
        # Tensor parallel: each rank times its own slices, without collectives (the ranks'
        # timings, retries and choices differ; a collective would pair them out of step).
        with self.tp.local() if self.tp is not None else nullcontext():
            for d in self._gpus():
                for kind, name in tune_gemv(self.model, d, progress).items():
                    if name not in chosen.setdefault(kind, []):
                        chosen[kind].append(name)
        return {kind: " | ".join(names) for kind, names in chosen.items()}

    def _gpus(self) -> list[torch.device]:
        if self.placement is None:
            return [self.device] if self.device.type == "cuda" else []
        return [d for d in self.placement.devices if d.type == "cuda"]

    def attention_warmup_tokens(self, max_tokens: int) -> int:
        """Prompt length up to which ``warm_attention`` would prepare work (0: nothing to do)."""
        attn = self.model.model.layers[0].self_attn.attn
        if getattr(attn, "warm_fresh_prefill", None) is None or self.device.type != "cuda":
            return 0
        window = self.spec.sliding_window
        return min(max_tokens, window) if window else max_tokens  # longer: not the SDPA path

    def warm_attention(self, max_tokens: int, should_stop: Callable[[], bool] | None = None) -> int:
        """Prepare what a served step would otherwise build on first use: cuDNN's SDPA plan
        for every fresh-prompt length bucket up to ``max_tokens``, then the kernel variants
        and cuBLAS state of mixed and chunked steps (``_warm_steps``). Returns how many
        prompt lengths it prepared. Call it on the thread that will run the steps: torch
        keeps cuDNN plans and cuBLAS handles per thread. ``should_stop`` (the load's) is
        asked between the stages and the synthetic steps: True raises LoadCancelledError."""
        def check() -> None:
            if should_stop is not None and should_stop():
                raise LoadCancelledError("loading cancelled")

        warm = self.model.model.layers[0].self_attn.attn.warm_fresh_prefill
        check()
        # Tensor parallel: a rank that skipped a warm-up step would leave the others
        # waiting in its collectives: a failure fails them all.
        ranks = self.tp is not None and self.tp.collective
        lengths = _guarded("prompt-attention", lambda: warm(max_tokens, self.device, self.dtype), ranks)
        check()
        if self.placement is None or all(d.type == "cuda" for d in self.placement.devices):
            # (a CPU segment's torch reference can't take the synthetic steps' slot -1 writes,
            # and has nothing to compile)
            _guarded("mixed-step", lambda: self._warm_steps(check), ranks)
        check()  # a cancel during the last step: the load must not go on to serve
        return lengths or 0

    # Query lengths of the synthetic steps: decode rows with long chunks, decode rows with
    # short chunks, short chunks alone, long chunks alone (every tile shape of the paged
    # prefill kernel, with and without the decode kernel beside it).
    WARM_STEPS = ((1, 1, 1, 40, 33), (1, 5, 2), (2, 3), (24, 17))

    def _warm_steps(self, check: Callable[[], None] = lambda: None) -> None:
        """Run a few synthetic steps with a cached prefix through the whole model: the
        first mixed step of a throughput run compiled the paged prefill kernel on the
        request path (1.6-1.9 s per variant on an H100). They write nothing (slot -1) and
        read block 0 as their "prefix"."""
        bs = self.block_size
        limit = self.model.rotary.max_positions
        for qlens in self.WARM_STEPS:
            check()  # raises to stop a cancelled load (_guarded lets it through)
            if max(qlens) > limit:
                continue  # a context this short can't hold such a chunk at all
            prefix = min(2 * bs, limit - max(qlens))
            tables = [[0] * -(-(prefix + n) // bs) for n in qlens]
            meta = self._metadata(tables, [prefix] * len(qlens), list(qlens))
            meta.slot_mapping.fill_(-1)
            total = sum(qlens)
            ids = torch.zeros(total, dtype=torch.long, device=self.device)
            pos = torch.cat([torch.arange(prefix, prefix + n, device=self.device) for n in qlens])
            hidden = self.model(ids, pos, self.kv_caches, meta)
            self.model.compute_logits(hidden[-len(qlens):])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def capture_graphs(self, max_batch: int, max_model_len: int, progress=None,
                       prompt_tokens: int = 0, strict: bool = False) -> int:
        """Capture prompt graphs for prompts (or chunks) of up to ``prompt_tokens`` tokens
        (0: leave them as they are), then decode graphs, all in one memory pool (after the
        KV cache exists); returns the bytes the captures took. ``strict`` (tensor parallel:
        the ranks time their prompt graphs in lock-step): a failed prompt capture fails."""
        from engine.runner.cuda_graphs import DecodeGraphs
        from engine.runner.prompt_graphs import PromptGraphs, prompt_buckets

        if self.placement is not None:  # a layer split: decode graphs per GPU segment, prompts eagerly
            from engine.runner.split_graphs import SplitDecodeGraphs

            graphs = SplitDecodeGraphs(self.model, self.kv_caches, self.placement, self.block_size, max_batch,
                                       max_model_len)
            graphs.capture(progress)
            self.graphs = graphs
            return graphs.pool_bytes + graphs.logits_out.numel() * graphs.logits_out.element_size()
        before = torch.cuda.memory_reserved(self.device)
        pool = None
        if prompt_buckets(prompt_tokens):
            prompts = PromptGraphs(self.model, self.kv_caches, self.device, self.block_size,
                                   prompt_tokens, max_model_len)
            try:
                prompts.capture(progress)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # decode graphs still help
                if strict:
                    raise
                log.warning("prompt graph capture failed, prompts run eagerly: %s", e)
                prompts = None
                torch.cuda.empty_cache()
            if prompts is not None and prompts.max_tokens:
                pool = prompts.pool
                self.prompt_graphs = prompts  # else every bucket was dropped, and its pool with it
        graphs = DecodeGraphs(self.model, self.kv_caches, self.device, self.block_size,
                              max_batch, max_model_len)
        graphs.capture(progress, pool=pool)
        self.graphs = graphs
        return torch.cuda.memory_reserved(self.device) - before

    # -- memory ------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        return self.spec.kv_bytes_per_token(self.kv_dtype.itemsize) * self.block_size

    def weight_bytes(self) -> int:
        """Bytes of the model's parameters and buffers (what bring-up's memory check counted)."""
        from engine.layers.modules import module_bytes

        return module_bytes(self.model)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        s = self.spec
        shape = (2, num_blocks, self.block_size, s.num_kv_heads, s.head_dim)
        where = self.placement.layer_devices if self.placement is not None else [self.device] * s.num_layers
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=d) for d in where]
        self.num_blocks = num_blocks

    # -- a step ------------------------------------------------------------------------
    def _metadata(self, tables: list[list[int]], starts: list[int], qlens: list[int],
                  num_decode: int | None = None) -> AttentionMetadata:
        """A step's attention metadata. ``num_decode``: its leading rows that decode (one
        token past the prompt each; default: every leading single-token row)."""
        bs = self.block_size
        slots: list[int] = []
        seq_lens = []
        for table, start, n in zip(tables, starts, qlens):
            for p in range(start, start + n):
                slots.append(table[p // bs] * bs + p % bs)
            seq_lens.append(start + n)
        width = padded_table_width(max(len(t) for t in tables))
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
            # With graphs, eager decode rows use the graphs' static bound too, so the decode
            # kernel's split count (and compiled variant) is one the capture already built.
            max_seq_len_bound=self.graphs.max_model_len if self.graphs is not None else None,
            # Leading single-token rows (callers list decode rows first): the decode kernel's.
            num_decode=next((i for i, n in enumerate(qlens) if n != 1), len(qlens)) if num_decode is None
            else num_decode,
        )


def _guarded(what: str, job, strict: bool = False):
    """job() under inference mode; a warm-up that fails (a full GPU) is logged and skipped:
    what it would have prepared is then built on first use (``strict``: raised)."""
    try:
        with torch.inference_mode():
            return job()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if strict:
            raise
        log.warning("%s warm-up skipped: %s", what, e)
        torch.cuda.empty_cache()
        return None
