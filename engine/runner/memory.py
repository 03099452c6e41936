"""Memory sizing of a load: will the weights fit, will an explicit KV cache fit, and how
many KV blocks to allocate (shared by the native and the transformers fallback runners).

The rules themselves live in ``engine.memory_plan`` (torch-free, so the app's fit estimate
applies the same ones); this module applies them to the device as it is now.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.config import EngineConfig
from engine.device import available_ram_bytes, free_memory_bytes, gib, restart_cuda_peak
from engine.errors import OutOfMemoryError
from engine.memory_plan import context_blocks, cpu_kv_budget, explicit_kv_problem, kv_pool_blocks


def check_weights_fit(need: int, device: torch.device, dtype_name: str) -> None:
    """Refuse weights of ``need`` bytes (what the transformed model will hold) that don't
    fit in the device's free memory."""
    free, _ = free_memory_bytes(device)
    if need > free:
        where = "GPU" if device.type == "cuda" else "RAM"
        raise OutOfMemoryError(
            f"the weights need {gib(need)} in {dtype_name} but the {where} has "
            f"{gib(free)} free: pick a smaller model or a quantized one, or free memory."
        )


def check_explicit_kv(config: EngineConfig, device: torch.device, block_bytes: int, max_model_len: int,
                      weights_bytes: int) -> None:
    """Refuse an explicit ``kv_cache_memory`` whose pool doesn't fit in the device's free
    memory (RAM on the CPU, where the kernel's OOM killer would end the process instead;
    VRAM on a GPU), leaving ``weights_bytes`` for weights still to load and some headroom."""
    cc, sc = config.cache, config.scheduler
    if cc.kv_cache_memory is None or cc.num_blocks is not None:
        return
    pool = kv_pool_blocks(cc.kv_cache_memory, block_bytes, max_model_len, cc.block_size,
                          sc.max_num_seqs) * block_bytes
    free, total = free_memory_bytes(device)
    where = f"GPU {device}" if device.type == "cuda" else "RAM"
    problem = explicit_kv_problem(requested=cc.kv_cache_memory, pool_bytes=pool, free_bytes=free,
                                  total_bytes=total, weights_bytes=weights_bytes, where=where)
    if problem is not None:
        raise OutOfMemoryError(problem, options=("kv_cache_memory",))


def kv_too_small(num_blocks: int, block_size: int, max_model_len: int) -> OutOfMemoryError:
    """The error for a KV pool that can't hold one sequence of the full context."""
    need = context_blocks(max_model_len, block_size)
    return OutOfMemoryError(
        f"the KV cache fits {num_blocks * block_size} tokens but one full context of "
        f"{max_model_len} tokens needs {need * block_size}: load with a shorter context "
        "(--max-model-len) or give the KV cache more memory (--kv-cache-memory).",
        options=("max_model_len", "kv_cache_memory"),
    )


def prompt_tokens(config: EngineConfig, max_model_len: int) -> int:
    """The longest prompt chunk a step can hold: prompt graphs are captured up to it."""
    return min(config.scheduler.max_num_batched_tokens, max_model_len)


def kv_blocks(config: EngineConfig, device: torch.device, block_bytes: int, max_model_len: int, *,
              peak_bytes: Callable[[int], int] = lambda num_tokens: 0,
              graph_bytes: Callable[[int, int], int] | None = None, cpu_share: int = 1) -> int:
    """KV blocks to allocate, with the weights in memory: exactly ``num_blocks``, what fits
    in an explicit ``kv_cache_memory``, or what the device has left (a GPU: within
    ``memory_fraction`` of it, after one step's activations, ``peak_bytes(tokens)``, and
    the CUDA graphs' pool, ``graph_bytes(max_batch, prompt_tokens)``, if any)."""
    cc, sc = config.cache, config.scheduler
    if cc.num_blocks is not None:
        return cc.num_blocks
    if cc.kv_cache_memory is not None:
        budget = cc.kv_cache_memory
        # The weights are in memory now: what is free is what the KV cache can have.
        check_explicit_kv(config, device, block_bytes, max_model_len, weights_bytes=0)
    elif device.type == "cuda":
        _, total = free_memory_bytes(device)
        peak = peak_bytes(sc.max_num_batched_tokens)
        used = torch.cuda.memory_allocated(device)
        budget = int(total * cc.memory_fraction) - used - peak
        # CUDA graphs keep a private memory pool: leave room for it.
        if graph_bytes is not None:
            budget -= graph_bytes(sc.max_num_seqs, prompt_tokens(config, max_model_len))
        # Other processes on the card count too.
        free, _ = free_memory_bytes(device)
        budget = min(budget, free - peak)
        if budget <= 0:
            raise OutOfMemoryError(
                f"no GPU memory left for the KV cache after the weights ({gib(used)}) and "
                f"activations ({gib(peak)}): use a smaller or quantized model."
            )
    else:  # (``cpu_share`` processes share this budget: tensor-parallel CPU ranks)
        budget = cpu_kv_budget(available_ram_bytes(), cc.cpu_memory_fraction) // cpu_share
    # No more blocks than every allowed sequence at full length could use (memory_plan:
    # the app's fit estimate sizes the pool with the same function).
    return kv_pool_blocks(budget, block_bytes, max_model_len, cc.block_size, sc.max_num_seqs)


def size_kv_cache(runner, config: EngineConfig, device: torch.device, block_bytes: int, max_model_len: int,
                  info: dict[str, Any], say: Callable[[str], None], stop: Callable[[], None], *,
                  peak_bytes: Callable[[int], int] = lambda num_tokens: 0,
                  graph_bytes: Callable[[int, int], int] | None = None,
                  count: Callable[[], int] | None = None) -> int:
    """Size the KV pool (``kv_blocks``, or ``count()``: a layer split's own count) and
    allocate it on ``runner``; records ``weight_bytes``, ``kv_cache_bytes`` and
    ``num_kv_blocks`` in ``info``; returns the blocks."""
    cc = config.cache
    info["weight_bytes"] = runner.weight_bytes()
    stop()
    num_blocks = count() if count is not None else kv_blocks(config, device, block_bytes, max_model_len,
                                                             peak_bytes=peak_bytes, graph_bytes=graph_bytes)
    if num_blocks < context_blocks(max_model_len, cc.block_size) and cc.num_blocks is None:
        raise kv_too_small(num_blocks, cc.block_size, max_model_len)
    say(f"allocating KV cache: {num_blocks} blocks of {cc.block_size} tokens ({gib(num_blocks * block_bytes)})")
    try:
        runner.allocate_kv_cache(num_blocks)
    except torch.OutOfMemoryError:
        raise OutOfMemoryError(
            f"could not allocate {gib(num_blocks * block_bytes)} for the KV cache: give it less "
            "memory (--kv-cache-memory).", options=("kv_cache_memory",),
        ) from None
    info["kv_cache_bytes"] = num_blocks * block_bytes
    info["num_kv_blocks"] = num_blocks
    return num_blocks


def graph_reserve_bytes(runner, max_batch: int, prompt_tokens: int = 0) -> int:
    """Memory a native runner's graphs take: their one shared pool (the larger of a decode
    step's activations at ``max_batch`` rows and a prompt graph's at its largest bucket
    within ``prompt_tokens``, plus slack) and the decode graphs' shared logits buffer."""
    from engine.runner import cuda_graphs, prompt_graphs

    s, size = runner.spec, runner.dtype.itemsize
    decode = cuda_graphs.reserve_bytes(max_batch, s.hidden_size, s.vocab_size,
                                       s.intermediate_size, size)
    top = max(prompt_graphs.prompt_buckets(prompt_tokens), default=0)
    prompt = prompt_graphs.reserve_bytes(top, s.hidden_size, s.intermediate_size, size)
    # (a prompt graph's head takes one row: the last token's)
    return (cuda_graphs.POOL_SLACK + max(decode + scratch_bytes(runner.model, max_batch, size),
                                         prompt + scratch_bytes(runner.model, top, size, head_rows=1))
            + cuda_graphs.logits_bytes(max_batch, s.vocab_size, size))


def scratch_bytes(model, rows: int, itemsize: int, head_rows: int | None = None) -> int:
    """The largest temporary a projection's kernel allocates for ``rows`` rows (``head_rows``
    for the LM head, when given): a quantized one's dequantized weight
    (``QuantKernel.scratch_bytes``), freed after its matmul, so one at a time."""
    head = getattr(model, "lm_head", None)
    largest = 0
    for m in model.modules():
        kernel = getattr(m, "kernel", None)
        if hasattr(kernel, "scratch_bytes"):
            n = head_rows if m is head and head_rows is not None else rows
            largest = max(largest, kernel.scratch_bytes(m, n, itemsize))
    return largest


@torch.inference_mode()
def activation_peak_bytes(runner, num_tokens: int) -> int:
    """Peak activation memory of one forward of a native runner over ``num_tokens`` tokens
    (CUDA only: 0 elsewhere)."""
    if runner.device.type != "cuda":
        return 0
    device = runner.device
    blocks = -(-num_tokens // runner.block_size)
    saved = runner.kv_caches
    runner.allocate_kv_cache(blocks)
    torch.cuda.synchronize(device)
    restart_cuda_peak(device)  # keeps the load's peak so far for whoever measures the whole load
    before = torch.cuda.memory_allocated(device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    # The token budget may exceed the context (long prefill budgets, short contexts):
    # keep positions inside the RoPE tables.
    pos = torch.arange(num_tokens, device=device) % runner.model.rotary.max_positions
    meta = runner._metadata([list(range(blocks))], [0], [num_tokens])
    hidden = runner.model(ids, pos, runner.kv_caches, meta)
    runner.model.compute_logits(hidden[-1:]).float()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    runner.kv_caches = saved
    del hidden
    torch.cuda.empty_cache()
    return peak
