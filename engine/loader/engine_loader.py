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
    say(f"resolving model {mc.model or 'default'}")
    resolved = resolve_model(mc.model, mc.revision, progress=say)
    tokenizer = Tokenizer.from_pretrained(resolved.path)
    cfg = read_config(resolved.path)

    native_error = None
    spec = None
    if not mc.force_fallback:
        try:
            spec = ModelSpec.from_config(cfg, source=str(resolved.path / "config.json"))
        except UnsupportedModelError as e:
            native_error = str(e)
    max_pos = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 4096)
    max_model_len = mc.max_model_len or max_pos
    if max_model_len > max_pos:
        raise InvalidRequestError(
            f"max_model_len {max_model_len} is longer than the model's context ({max_pos}); "
            f"use at most {max_pos}."
        )

    info: dict[str, Any] = {
        "name": resolved.name,
        "path": str(resolved.path),
        "source": resolved.source,
        "model_type": cfg.get("model_type"),
        "vocab_size": int(cfg.get("vocab_size") or len(tokenizer)),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": config.attention,
        "max_model_len": max_model_len,
        "implementation": "native" if spec is not None else "transformers-fallback",
    }
    if spec is None:
        info["fallback_reason"] = native_error or "forced with force_fallback"
        info["attention"] = "transformers"
        say(f"no native implementation ({info['fallback_reason']}); using the transformers fallback")
        from engine.runner.hf_runner import HFRunner

        runner = HFRunner.load(resolved.path, device, dtype)
        block_bytes = runner.kv_block_bytes(cc.block_size)
        prefix = False
    else:
        from engine.loader.build import build_native
        from engine.runner.model_runner import ModelRunner

        say(f"loading weights ({spec.num_params() / 1e6:.0f}M parameters, {info['dtype']})")
        model = build_native(resolved.path, spec, device, dtype, max_model_len)
        try:
            runner = ModelRunner(model, spec, device, dtype, cc.block_size, config.attention)
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
            "(--max-model-len) or give the KV cache more memory (--kv-cache-memory)."
        )
    say(f"allocating KV cache: {num_blocks} blocks of {cc.block_size} tokens ({gib(num_blocks * block_bytes)})")
    try:
        runner.allocate_kv_cache(num_blocks)
    except torch.OutOfMemoryError:
        _free(runner, device)
        raise OutOfMemoryError(
            f"could not allocate {gib(num_blocks * block_bytes)} for the KV cache: lower "
            "--kv-cache-memory or the memory fraction."
        ) from None
    info["kv_cache_bytes"] = num_blocks * block_bytes
    info["num_kv_blocks"] = num_blocks
    return LoadedModel(info, tokenizer, runner, max_model_len, num_blocks, prefix)


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


def _free(runner, device) -> None:
    runner.model = None
    runner.kv_caches = []
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
