"""Everything ``Engine`` does at load time: resolve, tokenizer, model, runner, KV pool."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.config import EngineConfig
from engine.device import available_ram_bytes, free_memory_bytes, gib
from engine.errors import InvalidRequestError, LoadCancelledError, OutOfMemoryError, UnsupportedModelError
from engine.loader.choices import check_load_choices
from engine.loader.shape_model import (SHAPE_PREFIX, SHAPE_SEED, TokenIdsOnlyTokenizer, is_shape_model,
                                       shape_model_config)
from engine.memory_plan import context_blocks, cpu_kv_budget, explicit_kv_problem, kv_pool_blocks
from engine.model_info import ModelInfo
from engine.models.spec import ModelSpec, read_config
from engine.tokenizer import Tokenizer

log = logging.getLogger("hearth.loader")


@dataclass(slots=True)
class LoadedModel:
    info: ModelInfo
    tokenizer: Tokenizer
    runner: Any
    max_model_len: int
    num_blocks: int
    prefix_caching: bool


@dataclass(slots=True)
class FoundModel:
    """A model found and its config read, nothing loaded yet (``load_model``'s first step,
    and all that ``check_model`` needs to size a load before making it)."""

    name: str
    path: Path | None  # None: a benchmark shape (no files)
    source: str
    cfg: dict[str, Any]
    config_source: str
    random_seed: int | None = None


def find_model(config: EngineConfig, say: Callable[[str], None]) -> FoundModel:
    """Resolve ``config.model`` (download, convert, validate) and read its config."""
    from engine.loader.resolve import resolve_model

    mc = config.model
    if is_shape_model(mc.model):
        # Benchmark shape: a named config with random weights, no files, no tokenizer.
        shape, cfg = shape_model_config(mc.model, mc.revision)
        name = f"{SHAPE_PREFIX}{shape}"
        if mc.force_fallback:
            raise InvalidRequestError(
                f"{name} has no checkpoint for the transformers fallback to load; drop force_fallback."
            )
        return FoundModel(name, None, "shape", cfg, f"engine.shapes[{shape!r}]", SHAPE_SEED)
    say(f"resolving model {mc.model or 'default'}")
    resolved = resolve_model(mc.model, mc.revision, progress=say)
    return FoundModel(resolved.name, resolved.path, resolved.source, resolved.config or read_config(resolved.path),
                      str(resolved.path / "config.json"))


def native_spec(found: FoundModel, force_fallback: bool) -> tuple[ModelSpec | None, str | None]:
    """The model's native spec, or None and why it runs on the transformers fallback."""
    if force_fallback:
        return None, None
    try:
        return ModelSpec.from_config(found.cfg, source=found.config_source), None
    except UnsupportedModelError as e:
        return None, str(e)


def context_length(cfg: dict[str, Any], max_model_len: int | None) -> int:
    """The load's context: ``max_model_len``, or the model's own maximum; refused when
    longer than the model's."""
    max_pos = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 4096)
    if max_model_len is not None and max_model_len > max_pos:
        raise InvalidRequestError(
            f"a context of {max_model_len} tokens is longer than the model's ({max_pos}); "
            f"use at most {max_pos} (--max-model-len).", options=("max_model_len",),
        )
    return max_model_len or max_pos


def kv_block_size(attention: str, block_size: int) -> int:
    """The KV block size a load uses: the backend may need a multiple of its own."""
    from engine.layers.attention import get_backend

    multiple = get_backend(attention).required_block_multiple
    return multiple if block_size % multiple else block_size


def stop_check(should_stop: Callable[[], bool] | None) -> Callable[[], None]:
    """A function that raises ``LoadCancelledError`` once ``should_stop()`` is true."""
    def check() -> None:
        if should_stop is not None and should_stop():
            raise LoadCancelledError("loading cancelled")
    return check


def load_model(config: EngineConfig, progress: Callable[[str], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> LoadedModel:
    """Load ``config``'s model: the weights, the runner, the KV pool, CUDA graphs.
    ``should_stop`` is asked between the stages and before each weight tensor; True
    stops the load (``LoadCancelledError``) and frees what it had taken."""
    say = progress or (lambda msg: log.info(msg))
    stop = stop_check(should_stop)
    mc, cc = config.model, config.cache
    choices = check_load_choices(config)  # before anything is resolved, read or loaded
    device, dtype = choices.device, choices.dtype
    found = find_model(config, say)
    stop()
    name, path, source, cfg = found.name, found.path, found.source, found.cfg
    if path is None:
        tokenizer = TokenIdsOnlyTokenizer(cfg["vocab_size"], name)
    else:
        tokenizer = Tokenizer.from_pretrained(path)

    spec, native_error = native_spec(found, mc.force_fallback)
    max_model_len = context_length(cfg, mc.max_model_len)

    info: dict[str, Any] = {
        "name": name,
        # What was asked for (``"default"``, a repo id, a path): loading it again gives this model.
        "ref": (mc.model or "default").strip(),
        "path": None if path is None else str(path),
        "source": source,
        "model_type": cfg.get("model_type"),
        "vocab_size": int(cfg.get("vocab_size") or len(tokenizer)),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": choices.attention,
        "max_model_len": max_model_len,
        "implementation": "native" if spec is not None else "transformers-fallback",
    }
    kv_dtype = kv_cache_dtype(cc.kv_cache_dtype, dtype, spec is not None)
    info["kv_cache_dtype"] = str(kv_dtype).removeprefix("torch.")
    stop()
    if spec is None:
        info["fallback_reason"] = native_error or "forced with force_fallback"
        info["attention"] = "transformers"
        say(f"no native implementation ({info['fallback_reason']}); using the transformers fallback")
        from engine.runner.hf_runner import HFRunner

        runner = HFRunner.load(path, device, dtype, should_stop=should_stop)
        prefix = False
    else:
        from engine.loader.build import build_native
        from engine.runner.model_runner import ModelRunner

        block_size = kv_block_size(info["attention"], cc.block_size)
        if block_size != cc.block_size:
            say(f"the {info['attention']} backend pages the KV cache in blocks of {block_size} tokens: "
                f"using block_size={block_size}")
            cc.block_size = block_size
        # An explicit KV size that can't fit is refused now, not after the weights load.
        _check_explicit_kv(config, device, spec.kv_bytes_per_token(kv_dtype.itemsize) * cc.block_size,
                           max_model_len, weights_bytes=spec.num_params() * dtype.itemsize)
        say(f"loading weights ({spec.num_params() / 1e6:.0f}M parameters, {info['dtype']})")
        model = build_native(path, spec, device, dtype, max_model_len, random_seed=found.random_seed,
                             should_stop=should_stop)
        try:
            runner = ModelRunner(model, spec, device, dtype, cc.block_size, info["attention"],
                                 enforce_eager=config.enforce_eager, kv_dtype=kv_dtype)
        except BaseException:
            from engine.loader.build import release_module

            release_module(model)
            del model
            raise
        prefix = cc.enable_prefix_caching
    try:  # from here on a failure or a cancel frees the runner's weights and cache at once
        num_blocks = _prepare_runner(config, runner, info, device, max_model_len, say, stop)
    except BaseException:
        _free(runner, device)
        raise
    return LoadedModel(ModelInfo.from_dict(dict(info, quantization=mc.quantization)), tokenizer, runner, max_model_len, num_blocks, prefix)


def _prepare_runner(config: EngineConfig, runner, info: dict[str, Any], device: torch.device,
                    max_model_len: int, say: Callable[[str], None], stop: Callable[[], None]) -> int:
    """Size and allocate the KV pool, tune and capture CUDA graphs; returns the KV blocks."""
    cc = config.cache
    block_bytes = runner.kv_block_bytes(cc.block_size) if info["implementation"] != "native" \
        else runner.kv_block_bytes()
    info["weight_bytes"] = runner.weight_bytes()
    stop()
    num_blocks = _kv_blocks(config, runner, device, block_bytes, max_model_len)
    need = context_blocks(max_model_len, cc.block_size)
    if num_blocks < need and cc.num_blocks is None:
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
    stop()
    if runner.gemv_reason() is None:
        info["batch1_matmul"] = runner.tune_gemv(say)
    stop()
    graphs_reason = runner.graphs_reason()
    info["cuda_graphs"] = graphs_reason is None
    if graphs_reason is None:
        try:
            info["cuda_graph_bytes"] = runner.capture_graphs(
                config.scheduler.max_num_seqs, max_model_len, say, _prompt_tokens(config, max_model_len))
            # One sequence's prompt (or chunk) up to this many tokens replays a graph.
            pg = runner.prompt_graphs
            info["prompt_graph_tokens"] = top = pg.max_tokens if pg else 0
            if pg:  # bucket -> [replay ms, eager ms] as measured at load
                info["prompt_graph_ms"] = {q: [round(pg.graph_ms[q], 3), round(pg.eager_ms[q], 3)]
                                           for q in pg.graph_ms}
            say(f"prompt graphs: prompts up to {top} tokens" if top else
                "prompt graphs: none pays on this GPU; prompts run eagerly")
            # Buckets served by a larger graph because it measured faster (cuBLAS cliffs).
            info["cuda_graph_routes"] = routes = {b: r for b, r in runner.graphs.routes.items() if b != r}
            if routes:
                say("decode graphs timed: " + ", ".join(f"batches up to {b} run in the {r} graph"
                                                        for b, r in sorted(routes.items())))
        except (RuntimeError, torch.OutOfMemoryError) as e:  # run eagerly rather than not at all
            log.warning("CUDA graph capture failed, running eagerly: %s", e)
            runner.graphs = runner.prompt_graphs = None
            torch.cuda.empty_cache()
            graphs_reason = f"capture failed: {e}"
            info["cuda_graphs"] = False
    if graphs_reason is not None:
        info["cuda_graphs_off"] = graphs_reason
    return num_blocks


def kv_too_small(num_blocks: int, block_size: int, max_model_len: int) -> OutOfMemoryError:
    """The error for a KV pool that can't hold one sequence of the full context."""
    need = context_blocks(max_model_len, block_size)
    return OutOfMemoryError(
        f"the KV cache fits {num_blocks * block_size} tokens but one full context of "
        f"{max_model_len} tokens needs {need * block_size}: load with a shorter context "
        "(--max-model-len) or give the KV cache more memory (--kv-cache-memory).",
        options=("max_model_len", "kv_cache_memory"),
    )


def kv_cache_dtype(name: str, dtype: torch.dtype, native: bool) -> torch.dtype:
    """The KV cache's element type for ``kv_cache_dtype`` (auto: the model's dtype), or a
    clear error where an fp8 cache can't be used with this model (the backend and device
    were checked with the other choices, before the load)."""
    if name == "auto":
        return dtype
    if not native:
        raise InvalidRequestError(
            "an fp8 KV cache needs Hearth's native model code; this model runs on the "
            "transformers fallback, which keeps its own cache: load it with kv_cache_dtype=auto.")
    return torch.float8_e4m3fn


def _kv_blocks(config: EngineConfig, runner, device, block_bytes: int, max_model_len: int) -> int:
    cc, sc = config.cache, config.scheduler
    if cc.num_blocks is not None:
        return cc.num_blocks
    if cc.kv_cache_memory is not None:
        budget = cc.kv_cache_memory
        # The weights are in memory now: what is free is what the KV cache can have.
        _check_explicit_kv(config, device, block_bytes, max_model_len, weights_bytes=0)
    elif device.type == "cuda":
        _, total = free_memory_bytes(device)
        peak = runner.profile_peak_bytes(sc.max_num_batched_tokens)
        used = torch.cuda.memory_allocated(device)
        budget = int(total * cc.memory_fraction) - used - peak
        # CUDA graphs keep a private memory pool: leave room for it.
        if runner.graphs_reason() is None:
            budget -= runner.graph_reserve_bytes(sc.max_num_seqs, _prompt_tokens(config, max_model_len))
        # Other processes on the card count too.
        free, _ = free_memory_bytes(device)
        budget = min(budget, free - peak)
        if budget <= 0:
            raise OutOfMemoryError(
                f"no GPU memory left for the KV cache after the weights ({gib(used)}) and "
                f"activations ({gib(peak)}): use a smaller or quantized model."
            )
    else:
        budget = cpu_kv_budget(available_ram_bytes(), cc.cpu_memory_fraction)
    # No more blocks than every allowed sequence at full length could use (memory_plan:
    # the app's fit estimate sizes the pool with the same function).
    return kv_pool_blocks(budget, block_bytes, max_model_len, cc.block_size, sc.max_num_seqs)


def _check_explicit_kv(config: EngineConfig, device: torch.device, block_bytes: int, max_model_len: int,
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


def _prompt_tokens(config: EngineConfig, max_model_len: int) -> int:
    """The longest prompt chunk a step can hold: prompt graphs are captured up to it."""
    return min(config.scheduler.max_num_batched_tokens, max_model_len)


def _free(runner, device) -> None:
    # Tensors are let go of directly, without gc.collect(): the desktop app loads on a
    # worker thread, where collecting others' garbage (Qt widgets in a cycle) crashes.
    release_runner(runner)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def release_runner(runner) -> None:
    """Free the weights, KV cache and CUDA graphs a runner holds, even where something
    else still references the runner or its model.

    Something often does: a library that looks at its caller's frame
    (``inspect.currentframe()``) while being imported lazily during the first load keeps
    that whole call stack alive in a reference cycle, and with it the model being built
    and the runner (only the cyclic garbage collector frees them, which the desktop app
    runs rarely and on its GUI thread only). So the tensors are let go of here, from the
    objects themselves, rather than by dropping references to those objects. The runner
    can't run afterwards.
    """
    from engine.loader.build import release_module

    release_module(getattr(runner, "model", None))
    caches = getattr(runner, "kv_caches", None)
    if isinstance(caches, list):
        caches.clear()  # in place: CUDA graphs hold the same list
    for name in ("_caches", "_requests"):
        held = getattr(runner, name, None)
        if isinstance(held, dict):
            held.clear()
    for name in ("_ahead", "model", "graphs", "prompt_graphs", "_pinned"):  # a step's output first
        if hasattr(runner, name):
            setattr(runner, name, None)


def return_freed_memory(collect: bool = False) -> None:
    """Hand memory freed by an unload back to the system: CUDA's cached blocks to the
    driver, and glibc's free heap pages to the OS (``malloc_trim``; without it the RSS of
    a CPU model stays put after unloading). ``collect`` first runs the cyclic garbage
    collector; only do that on a thread where collecting others' garbage is safe (the
    desktop app's GUI thread)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (not musl)
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
