"""Before a load: will it load, how much memory will it take, and can it load beside the
model that is loaded now?

A caller that has a model serving (the desktop app) asks this first, so it learns that a
load can't work (a bad choice, no tokenizer, a context longer than the model's, weights or
an explicit KV cache that won't fit even with the loaded model gone) *before* giving that
model up, and whether the new one can load while the old one keeps serving. Weights files
are refused when their headers are truncated or corrupt (only the headers are read), and on
a GPU a full context that won't fit beside the weights is refused as the load would.

The sizes come from the rules the load itself applies, not a copy: the same dtype and KV
block size, ``memory_plan``'s pool sizing (``cpu_kv_budget``, ``kv_pool_blocks``) and
explicit-KV check (``explicit_kv_problem``), bring-up's weights check over the bytes the
transformed meta model holds (``engine.runner.bring_up.transformed_weight_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.device import free_memory_bytes, gib
from engine.errors import OutOfMemoryError
from engine.loader.choices import check_load_choices
from engine.loader.engine_loader import (context_length, find_model, kv_block_size, kv_cache_dtype, native_spec,
                                         own_tokenizer)
from engine.loader.weights import read_metadata
from engine.memory_plan import (DeviceShare, ModelCheck, context_blocks, cpu_kv_budget, explicit_kv_problem,
                                kv_headroom, kv_pool_blocks)
from engine.models.summary import SpecSummary
from engine.runner.memory import kv_too_small


def check_model(config: EngineConfig, *, progress: Callable[[str], None] | None = None,
                should_stop: Callable[[], bool] | None = None, loaded_device: str | None = None,
                loaded_bytes: int = 0) -> ModelCheck:
    """Check and size a load of ``config`` (see the module docstring). ``loaded_device``
    and ``loaded_bytes``: where the model loaded now is and what unloading it would give
    back. Raises what the load would raise first (InvalidRequestError, ModelLoadError,
    OutOfMemoryError)."""
    say = progress or (lambda msg: None)
    mc, cc, sc = config.model, config.cache, config.scheduler
    choices = check_load_choices(config)
    device, dtype = choices.device, choices.dtype
    found = find_model(config, say, should_stop=should_stop)  # (a GGUF is converted here)
    if mc.tokenizer:  # refused now if the load would refuse it; a shape takes its vocabulary
        own_tokenizer(mc.tokenizer, found)
    spec, _ = native_spec(found, mc.force_fallback)
    max_model_len = context_length(found.cfg, mc.max_model_len)
    kv_dtype = kv_cache_dtype(cc.kv_cache_dtype, dtype, spec is not None)
    calibration = 0  # bytes a first awq/gptq load holds while it calibrates
    if spec is not None:
        if found.path is not None:
            # Only the headers are read: a truncated or corrupt file (an interrupted
            # download) is refused now, not after the loaded model was given up for it.
            read_metadata(found.path)
        if mc.devices is not None:
            return _check_split(config, found, spec, dtype, kv_dtype, max_model_len, loaded_device)
        from engine.runner.bring_up import model_transforms, transformed_weight_bytes

        block_size = kv_block_size(choices.attention, cc.block_size)
        # What the load will hold: the meta model after the load's transforms (quantized
        # weights count as what they are), the count bring-up checks before materializing.
        sizing, calibrating = _sizing(config, found)
        weights = transformed_weight_bytes(spec, dtype, max_model_len, model_transforms(sizing, found.path),
                                           device_type=torch.device(device).type)
        if calibrating:  # the first awq/gptq load holds the float model on the device while it calibrates
            calibration = transformed_weight_bytes(spec, dtype, max_model_len, model_transforms(
                _with_quant(config, "none"), found.path))
        block_bytes = spec.kv_bytes_per_token(kv_dtype.itemsize) * block_size
    else:  # the transformers fallback: its weights in the load dtype, its cache by config
        block_size = cc.block_size
        weights = _checkpoint_params(found.path) * dtype.itemsize
        # What its cache keeps per token, read as the fit estimate reads a config (one reading).
        per_token = SpecSummary.fallback(found.cfg).kv_bytes_per_token(dtype.itemsize)
        block_bytes = (per_token or 2 * dtype.itemsize) * block_size

    free, total = free_memory_bytes(device)
    reclaim = loaded_bytes if _same_device(loaded_device, device) else 0
    where = f"GPU {device}" if device.type == "cuda" else "RAM"
    if calibration > free + reclaim:
        raise OutOfMemoryError(
            f"{mc.quantization} calibrates the float weights first, once ({gib(calibration)} in "
            f"{str(dtype).removeprefix('torch.')}), but the {where} has {gib(free)} free: quantize it on a larger "
            f"device with hearth quantize --quant {mc.quantization}, or free memory.", options=("quantization",))
    if weights > free + reclaim:  # bring-up's weights check, counting what unloading gives back
        alone = f" ({gib(free + reclaim)} with the loaded model unloaded)" if reclaim else ""
        raise OutOfMemoryError(
            f"the weights need {gib(weights)} in {str(dtype).removeprefix('torch.')} but the {where} has "
            f"{gib(free)} free{alone}: pick a smaller model or a quantized one, or free memory.")

    def pool(budget: int) -> int:
        return kv_pool_blocks(budget, block_bytes, max_model_len, block_size, sc.max_num_seqs)

    headroom = kv_headroom(total)
    if cc.num_blocks is not None:
        kv = cc.num_blocks * block_bytes
        beside_ok = weights + kv + headroom <= free
    elif cc.kv_cache_memory is not None:
        kv = pool(cc.kv_cache_memory) * block_bytes
        problem = explicit_kv_problem(
            requested=cc.kv_cache_memory, pool_bytes=kv, free_bytes=free + reclaim, total_bytes=total,
            weights_bytes=weights, where=f"{where} (with the loaded model unloaded)" if reclaim else where)
        if problem is not None:
            raise OutOfMemoryError(problem, options=("kv_cache_memory",))
        beside_ok = weights + kv + headroom <= free
    elif device.type == "cpu":
        # The load sizes the pool from the RAM left after its weights: beside the loaded
        # model that is less, so it only fits beside if the pool comes out the same.
        alone = pool(cpu_kv_budget(free + reclaim - weights, cc.cpu_memory_fraction))
        if alone < context_blocks(max_model_len, block_size):
            raise kv_too_small(alone, block_size, max_model_len)
        now = pool(cpu_kv_budget(free - weights, cc.cpu_memory_fraction))
        kv = alone * block_bytes
        beside_ok = now >= alone and weights + kv + headroom <= free
    else:
        # The pool takes what the card has left after the weights (and the step's
        # activations, CUDA graphs: the headroom stands in for them, as for an explicit
        # size), within memory_fraction of the card; it must hold one full context.
        kv = context_blocks(max_model_len, block_size) * block_bytes
        room = min(free + reclaim - headroom, int(total * cc.memory_fraction)) - weights
        if kv > room:
            raise _no_room_for_context(max(0, room) // block_bytes, block_size, max_model_len, weights, where,
                                       bool(reclaim))
        beside_ok = False  # the pool takes the rest of the card: never beside another model
    fits_beside = reclaim == 0 or (device.type == "cpu" and beside_ok and calibration + headroom <= free)
    return ModelCheck(found.name, str(device), int(weights), int(kv), int(free), fits_beside)


def _check_split(config: EngineConfig, found, spec, dtype: torch.dtype, kv_dtype: torch.dtype, max_model_len: int,
                 loaded_device: str | None) -> ModelCheck:
    """``check_model`` of a load over several devices: each device's share as the load
    plans it (a layer split: ``plan_placement``'s ranges, weights and one full context of
    KV per layer; tensor parallel: each rank's sharded model), refused as the load would
    refuse it when a device can't hold its share."""
    from engine.runner.bring_up import build_on_meta, load_bytes, model_transforms

    mc = config.model
    sizing, _ = _sizing(config, found)
    kv_token = spec.kv_bytes_per_token(kv_dtype.itemsize)
    shares = []
    if any(d != "cpu" for d in mc.devices):  # from NVML: asking torch would make a CUDA context on each GPU here
        from engine.doctor import gpus

        gpu_mem = {f"cuda:{g['index']}": (g["free_bytes"], g["total_bytes"]) for g in gpus()}
    else:
        gpu_mem = {}

    def memory_of(name: str) -> tuple[int, int]:
        return gpu_mem[name] if name in gpu_mem else free_memory_bytes(torch.device(name))

    def free_of(name: str) -> int:
        return memory_of(name)[0]

    if mc.split == "tensor":
        from engine.layers.parallel import TPGroup
        from engine.loader.engine_loader import check_tensor_parallel_quant, loaded_quantization

        check_tensor_parallel_quant(loaded_quantization(config, found.path, True))
        world = len(mc.devices)
        for rank, name in enumerate(mc.devices):
            model = build_on_meta(spec, dtype, max_model_len,
                                  model_transforms(sizing, found.path, TPGroup(rank, world, sizing=True)))
            d = torch.device(name)
            shares.append(DeviceShare(name, f"rank {rank} of {world}",
                                      load_bytes(model, d.type),
                                      model.spec.kv_bytes_per_token(kv_dtype.itemsize) * max_model_len,
                                      free_of(name)))
    else:
        from engine.runner.layer_split import plan_placement
        from engine.split import head_device_index

        model = build_on_meta(spec, dtype, max_model_len, model_transforms(sizing, found.path))
        placement = plan_placement(model, config, kv_token_bytes=kv_token, max_model_len=max_model_len,
                                   attention={"cuda": "auto", "cpu": "torch"}, gpu_memory=memory_of)
        plan = placement.split
        kv_layer = kv_token // spec.num_layers * max_model_len
        head = head_device_index(plan.devices)
        for i, (name, r, total) in enumerate(zip(plan.devices, plan.ranges, plan.bytes_per_device)):
            holds = [f"layers {r.start}-{r.stop - 1}"]
            if i == 0 and not spec.tie_word_embeddings:
                holds.append("embedding")
            if i == head:
                holds.append("LM head" + (" and embedding" if spec.tie_word_embeddings else ""))
            kv = len(r) * kv_layer
            shares.append(DeviceShare(name, ", ".join(holds), total - kv, kv, free_of(name)))
    _refuse_short_devices(shares)
    gpus = {s.device: s.free_bytes for s in shares}
    return ModelCheck(found.name, ",".join(mc.devices), sum(s.weights_bytes for s in shares),
                      sum(s.kv_cache_bytes for s in shares), sum(gpus.values()),
                      not any(_same_device(loaded_device, torch.device(d)) for d in mc.devices), tuple(shares))


def _refuse_short_devices(shares: list[DeviceShare]) -> None:
    """A GPU whose share (weights and one context of KV) exceeds its free memory, or CPU
    entries whose shares together exceed the RAM available, refused naming the device."""
    cpu = [s for s in shares if s.device == "cpu"]
    short = [(s.device, s.need_bytes, s.free_bytes) for s in shares
             if s.device != "cpu" and s.need_bytes > s.free_bytes]
    if cpu and sum(s.need_bytes for s in cpu) > cpu[0].free_bytes:
        short.append(("cpu", sum(s.need_bytes for s in cpu), cpu[0].free_bytes))
    if short:
        what = "; ".join(f"{d} needs {gib(n)} (weights and one full context of KV cache) but has {gib(f)} free"
                         for d, n, f in short)
        raise OutOfMemoryError(f"the model does not fit its devices: {what}. Add a device, pick a smaller "
                               "quantization or a shorter context, or free memory.", options=("devices",))


def _sizing(config: EngineConfig, found) -> tuple[EngineConfig, bool]:
    """(the config whose transforms size the load, whether the load calibrates first):
    awq/gptq of float weights are calibrated into an int4 checkpoint of the same group size
    when the load starts (engine_loader's ``calibrated``), so they weigh what int4 does
    (fp8-gptq: into an fp8 checkpoint, so what fp8 does); the first such load (nothing
    cached) holds the float model while it calibrates."""
    from engine.loader.engine_loader import calibrated_path
    from engine.quant.export import CALIBRATED
    from engine.quant.transform import PUBLISHED, checkpoint_quant_method

    mc = config.model
    if mc.quantization not in CALIBRATED or checkpoint_quant_method(found.path) in PUBLISHED:
        return config, False
    cached = (calibrated_path(found, config)[1] / "config.json").is_file()
    # the calibrated checkpoint keeps the head as the float model has it (export: not_converted)
    fmt = "fp8" if CALIBRATED[mc.quantization][1] else "int4"
    return _with_quant(config, fmt, float_head=True), not cached


def _with_quant(config: EngineConfig, method: str, **model_options) -> EngineConfig:
    from dataclasses import replace

    return replace(config, model=replace(config.model, quantization=method, **model_options))


def _no_room_for_context(blocks: int, block_size: int, max_model_len: int, weights: int,
                         where: str, unloading: bool) -> OutOfMemoryError:
    """What the load would raise for a GPU KV pool that can't hold one full context."""
    if blocks:
        return kv_too_small(blocks, block_size, max_model_len)
    alone = ", even with the loaded model unloaded" if unloading else ""
    return OutOfMemoryError(
        f"no memory left on the {where} for the KV cache after the weights ({gib(weights)}){alone}: "
        "use a smaller or quantized model, or free GPU memory.")


def _same_device(loaded: str | None, device: torch.device) -> bool:
    if not loaded:
        return False
    try:
        other = torch.device(loaded)
    except (RuntimeError, ValueError):
        return False
    if other.type != device.type:
        return False
    return device.type != "cuda" or (other.index or 0) == (device.index or 0)


def _checkpoint_params(path: Path | None) -> int:
    """Parameters in a checkpoint's safetensors headers (no tensor data is read)."""
    return sum(math.prod(shape) for shape, _ in read_metadata(path).values()) if path is not None else 0

