"""Everything ``Engine`` does at load time: resolve, tokenizer, model, runner, KV pool."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from engine.config import EngineConfig
from engine.device import available_ram_bytes, free_memory_bytes, gib, resolve_device, resolve_dtype
from engine.errors import InvalidRequestError, OutOfMemoryError, UnsupportedModelError
from engine.loader.shape_model import (SHAPE_PREFIX, SHAPE_SEED, TokenIdsOnlyTokenizer, is_shape_model,
                                       shape_model_config)
from engine.models.spec import ModelSpec, read_config
from engine.tokenizer import Tokenizer

log = logging.getLogger("hearth.loader")

CPU_KV_CAP = 2**30  # never take more than this for the KV pool on CPU by default


@dataclass(slots=True)
class LoadedModel:
    info: dict[str, Any]
    tokenizer: Tokenizer
    runner: Any
    max_model_len: int
    num_blocks: int
    prefix_caching: bool


def load_model(config: EngineConfig, progress: Callable[[str], None] | None = None) -> LoadedModel:
    from engine.loader.resolve import resolve_model

    say = progress or (lambda msg: log.info(msg))
    mc, cc = config.model, config.cache
    device = resolve_device(mc.device)
    dtype = resolve_dtype(mc.dtype, device)
    random_seed = None
    if is_shape_model(mc.model):
        # Benchmark shape: a named config with random weights, no files, no tokenizer.
        shape, cfg = shape_model_config(mc.model, mc.revision)
        name, path, source, random_seed = f"{SHAPE_PREFIX}{shape}", None, "shape", SHAPE_SEED
        if mc.force_fallback:
            raise InvalidRequestError(
                f"{name} has no checkpoint for the transformers fallback to load; drop force_fallback."
            )
        tokenizer = TokenIdsOnlyTokenizer(cfg["vocab_size"], name)
        config_source = f"engine.shapes[{shape!r}]"
    else:
        say(f"resolving model {mc.model or 'default'}")
        resolved = resolve_model(mc.model, mc.revision, progress=say)
        name, path, source = resolved.name, resolved.path, resolved.source
        tokenizer = Tokenizer.from_pretrained(path)
        cfg = read_config(path)
        config_source = str(path / "config.json")

    native_error = None
    spec = None
    if not mc.force_fallback:
        try:
            spec = ModelSpec.from_config(cfg, source=config_source)
        except UnsupportedModelError as e:
            native_error = str(e)
    max_pos = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 4096)
    max_model_len = mc.max_model_len or max_pos
    if max_model_len > max_pos:
        raise InvalidRequestError(
            f"a context of {max_model_len} tokens is longer than the model's ({max_pos}); "
            f"use at most {max_pos} (--max-model-len).", options=("max_model_len",),
        )

    info: dict[str, Any] = {
        "name": name,
        "path": None if path is None else str(path),
        "source": source,
        "model_type": cfg.get("model_type"),
        "vocab_size": int(cfg.get("vocab_size") or len(tokenizer)),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": _resolve_attention(config.attention, device),
        "max_model_len": max_model_len,
        "implementation": "native" if spec is not None else "transformers-fallback",
    }
    kv_dtype = _kv_cache_dtype(cc.kv_cache_dtype, dtype, info["attention"], device, spec is not None)
    info["kv_cache_dtype"] = str(kv_dtype).removeprefix("torch.")
    if spec is None:
        info["fallback_reason"] = native_error or "forced with force_fallback"
        info["attention"] = "transformers"
        say(f"no native implementation ({info['fallback_reason']}); using the transformers fallback")
        from engine.runner.hf_runner import HFRunner

        runner = HFRunner.load(path, device, dtype)
        block_bytes = runner.kv_block_bytes(cc.block_size)
        prefix = False
    else:
        from engine.layers.attention import get_backend
        from engine.loader.build import build_native
        from engine.runner.model_runner import ModelRunner

        multiple = get_backend(info["attention"]).required_block_multiple
        if cc.block_size % multiple:
            say(f"the {info['attention']} backend pages the KV cache in blocks of {multiple} tokens: "
                f"using block_size={multiple}")
            cc.block_size = multiple
        say(f"loading weights ({spec.num_params() / 1e6:.0f}M parameters, {info['dtype']})")
        model = build_native(path, spec, device, dtype, max_model_len, random_seed=random_seed)
        try:
            runner = ModelRunner(model, spec, device, dtype, cc.block_size, info["attention"],
                                 enforce_eager=config.enforce_eager, kv_dtype=kv_dtype)
        except BaseException:
            del model
            gc.collect()
            raise
        block_bytes = runner.kv_block_bytes()
        prefix = cc.enable_prefix_caching
    info["weight_bytes"] = runner.weight_bytes()

    num_blocks = _kv_blocks(config, runner, device, block_bytes, max_model_len)
    need = -(-max_model_len // cc.block_size)
    if num_blocks < need and cc.num_blocks is None:
        _free(runner, device)
        raise OutOfMemoryError(
            f"the KV cache fits {num_blocks * cc.block_size} tokens but one full context of "
            f"{max_model_len} tokens needs {need * cc.block_size}: load with a shorter context "
            "(--max-model-len) or give the KV cache more memory (--kv-cache-memory).",
            options=("max_model_len", "kv_cache_memory"),
        )
    say(f"allocating KV cache: {num_blocks} blocks of {cc.block_size} tokens ({gib(num_blocks * block_bytes)})")
    try:
        runner.allocate_kv_cache(num_blocks)
    except torch.OutOfMemoryError:
        _free(runner, device)
        raise OutOfMemoryError(
            f"could not allocate {gib(num_blocks * block_bytes)} for the KV cache: give it less "
            "memory (--kv-cache-memory).", options=("kv_cache_memory",),
        ) from None
    info["kv_cache_bytes"] = num_blocks * block_bytes
    info["num_kv_blocks"] = num_blocks
    if runner.gemv_reason() is None:
        info["batch1_matmul"] = runner.tune_gemv(say)
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
    return LoadedModel(info, tokenizer, runner, max_model_len, num_blocks, prefix)


def _kv_cache_dtype(name: str, dtype: torch.dtype, attention: str, device: torch.device,
                    native: bool) -> torch.dtype:
    """The KV cache's element type for ``kv_cache_dtype`` (auto: the model's dtype), or a
    clear error where an fp8 cache can't be used."""
    if name == "auto":
        return dtype
    if not native:
        raise InvalidRequestError(
            "an fp8 KV cache needs Hearth's native model code; this model runs on the "
            "transformers fallback, which keeps its own cache: load it with kv_cache_dtype=auto.")
    from engine.layers.attention import backend_names

    if attention not in ("torch", "triton") and attention in backend_names():
        raise InvalidRequestError(
            f"the {attention!r} attention backend can't read an fp8 KV cache: use attention=triton "
            "(CUDA) or attention=torch, or kv_cache_dtype=auto.")
    if attention == "triton" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise InvalidRequestError(
            f"the triton backend's fp8 KV cache needs an Ada or Hopper GPU (compute capability "
            f"8.9+); this one is {major}.{minor}. Use kv_cache_dtype=auto, or attention=torch.")
    return torch.float8_e4m3fn


def _resolve_attention(name: str, device: torch.device) -> str:
    """``auto``: the Triton backend on a CUDA GPU when it can run there, else the reference."""
    if name != "auto":
        return name
    if device.type == "cuda":
        from engine.layers.attention import backend_reasons

        if not backend_reasons("triton", device):
            return "triton"
    return "torch"


def _kv_blocks(config: EngineConfig, runner, device, block_bytes: int, max_model_len: int) -> int:
    cc, sc = config.cache, config.scheduler
    if cc.num_blocks is not None:
        return cc.num_blocks
    # No point in more blocks than every allowed sequence at full length could use.
    useful = -(-max_model_len // cc.block_size) * sc.max_num_seqs
    if cc.kv_cache_memory is not None:
        budget = cc.kv_cache_memory
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
        budget = min(int(available_ram_bytes() * cc.cpu_memory_fraction), CPU_KV_CAP)
    return max(1, min(budget // block_bytes, useful))


def _prompt_tokens(config: EngineConfig, max_model_len: int) -> int:
    """The longest prompt chunk a step can hold: prompt graphs are captured up to it."""
    return min(config.scheduler.max_num_batched_tokens, max_model_len)


def _free(runner, device) -> None:
    runner.model = None
    runner.kv_caches = []
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
