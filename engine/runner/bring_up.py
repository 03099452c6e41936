"""Bring-up: a native model from nothing to serving, in one entry (``ModelRunner.create``).

The steps, in order:

1. build the model on the meta device (shapes only, no memory);
2. apply the load's model transforms (``model_transforms``): the one hook where weight
   quantization and tensor-parallel sharding replace modules, still on the meta device;
3. check memory: the bytes the transformed model will hold (``module_bytes``, not
   "parameters x dtype"), and an explicit KV cache beside them;
4. materialize, then fill every parameter through its own loader, streaming the
   checkpoint one tensor at a time (``should_stop`` is asked before each);
5. the kernel plan (``engine.layers.kernel_plan``): attention backend, fused kernels;
6. size the KV cache and allocate it (``engine.runner.memory``); on a CPU, hand the model
   and the cache to the C decode step (``engine.runner.cpu_step``);
7. tune the batch-1 GEMV (``engine.runner.gemv_tuning``);
8. capture CUDA graphs, which so hold the final kernel choices.

A cancel or a failure at any step frees what the earlier ones took before it propagates.
What a load measures goes into ``runner.load_info`` (merged into ``model_info``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import EngineConfig, step_budget
from engine.device import gib
from engine.errors import InvalidRequestError, LoadCancelledError, OutOfMemoryError, stop_check
from engine.layers.attention import AttentionBackend, get_backend
from engine.layers.kernel_plan import KernelPlan, apply_kernel_plan
from engine.layers.parallel import TPGroup
from engine.layers.modules import module_bytes
from engine.layers.quant_linear import gpu_float_extra
from engine.loader.weights import iter_weights
from engine.models.llama import LlamaForCausalLM
from engine.models.spec import ModelSpec
from engine.runner.lifecycle import empty_device_cache, release_module, release_runner
from engine.runner.memory import (activation_peak_bytes, check_explicit_kv, check_weights_fit, graph_reserve_bytes,
                                  kv_blocks, prompt_tokens, size_kv_cache)

log = logging.getLogger("hearth.loader")

#: A model transform: called on the model while it is still on the meta device, it may
#: replace modules (``engine.layers.modules.replace_module``): quantized linears, shards.
Transform = Callable[[nn.Module], None]


@dataclass(frozen=True, slots=True)
class RandomWeights:
    """Weights drawn at random from ``seed`` instead of read from a checkpoint
    (benchmark shapes: a model's speed without its files)."""

    seed: int


#: Where a load's weights come from: a model folder (or one .safetensors file), or random.
WeightsSource = Path | RandomWeights


def model_transforms(config: EngineConfig, weights: "WeightsSource | None" = None,
                     tp: TPGroup | None = None) -> list[Transform]:
    """The model transforms a load of ``config`` from ``weights`` applies, in order:
    tensor-parallel sharding for rank ``tp.rank`` (``engine.runner.tensor_parallel``),
    then weight quantization (``engine.quant.transform``)."""
    from engine.quant.transform import quantization_plan

    mc = config.model
    path = weights if isinstance(weights, Path) else None
    plan = quantization_plan(mc.quantization, path, group_size=mc.quant_group_size, head=mc.quant_head,
                             float_head=mc.float_head)
    if tp is None:
        return [plan.transform()] if plan.quantizes else []
    from engine.runner.tensor_parallel import shard_quantized, shard_transform

    return [shard_transform(tp), plan.transform(), shard_quantized(tp)] if plan.quantizes else [shard_transform(tp)]


def build_on_meta(spec: ModelSpec, dtype: torch.dtype, max_model_len: int,
                  transforms: Sequence[Transform] = ()) -> LlamaForCausalLM:
    """The model on the meta device with ``transforms`` applied (modules they create land
    on the meta device too)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, dtype, max_model_len)
        for transform in transforms:
            transform(model)
    return model


def transformed_weight_bytes(spec: ModelSpec, dtype: torch.dtype, max_model_len: int,
                             transforms: Sequence[Transform] = (), device_type: str = "cpu") -> int:
    """Bytes the model's weights will take once loaded with ``transforms`` on a device of
    ``device_type`` (the load pre-flight, ``engine.loader.load_check``, counts them so)."""
    return load_bytes(build_on_meta(spec, dtype, max_model_len, transforms), device_type)


def load_bytes(model: nn.Module, device_type: str) -> int:
    """Bytes ``model`` (on the meta device, transformed) holds once loaded on a device of
    ``device_type``: its tensors, plus on a GPU the float copies of projections its kernels
    don't read (``gpu_float_extra``)."""
    return module_bytes(model) + (gpu_float_extra(model) if device_type == "cuda" else 0)


def usable_backend(attention: str, device: torch.device) -> type[AttentionBackend]:
    """The attention backend class ``attention`` names, if it can run on ``device``."""
    backend = get_backend(attention)
    reasons = backend.available(device)
    if reasons:
        raise InvalidRequestError(f"attention backend {attention!r} can't run here: {'; '.join(reasons)}")
    return backend


def materialize_weights(model: LlamaForCausalLM, weights: WeightsSource, device: torch.device, need: int,
                        should_stop: Callable[[], bool] | None = None,
                        progress: Callable[[str], None] | None = None, placement=None) -> None:
    """Allocate ``model`` on ``device`` (or where a layer split's ``placement`` puts each
    part) and fill it: random, or streamed from the checkpoint one tensor at a time
    (mmap'd, so RAM never holds a second full copy), each through its parameter's loader.
    ``should_stop`` is asked before each tensor."""
    try:
        if placement is None:
            model.materialize(device)
        else:
            from engine.runner.layer_split import materialize_placed_model

            materialize_placed_model(model, placement)
        if isinstance(weights, RandomWeights):
            model.init_random(weights.seed)
        else:
            stream = iter_weights(weights)
            quantizing = _quantizing(model)
            if progress is not None and quantizing:  # the slow loads: say how far they are
                stream = _layer_progress(stream, progress, model.spec.num_layers, quantizing)
            if should_stop is not None:
                stream = _stoppable(stream, should_stop)
            model.load_weights(stream, source=str(weights))
        model.eval()
    except torch.OutOfMemoryError as e:
        raise OutOfMemoryError(
            f"out of memory while loading the weights ({gib(need)}): {e}. Pick a smaller or "
            "quantized model, or free memory."
        ) from None


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _quantizing(model: nn.Module) -> str:
    """" (quantizing to int4)" when the load quantizes float tensors as they stream in."""
    labels = {m.source.label for m in model.modules() if getattr(m, "checkpoint_params", None)
              and "weight" in m.checkpoint_params and getattr(m.source, "quantizes_on_load", True)}
    return f" (quantizing to {', '.join(sorted(labels))})" if labels else ""


def _layer_progress(weights: Iterable[tuple[str, torch.Tensor]], say: Callable[[str], None], layers: int,
                    what: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Say "loading weights: layer i of n" each time the stream reaches a new layer."""
    seen = -1
    for name, tensor in weights:
        m = _LAYER.search(name)
        if m is not None and int(m.group(1)) != seen:
            seen = int(m.group(1))
            say(f"loading weights: layer {seen + 1} of {layers}{what}")
        yield name, tensor


def _stoppable(weights: Iterable[tuple[str, torch.Tensor]],
               should_stop: Callable[[], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    for item in weights:
        if should_stop():
            raise LoadCancelledError("loading cancelled")
        yield item


def bring_up(runner_cls, config: EngineConfig, spec: ModelSpec, weights: WeightsSource, *,
             device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype, attention: str,
             max_model_len: int, tp: TPGroup | None = None,
             progress: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
             transforms: Sequence[Transform] | None = None):
    """``ModelRunner.create``'s steps (see the module docstring); returns the runner.
    ``tp``: this process is rank ``tp.rank`` of a tensor-parallel load (every rank runs
    these steps in the same order: their collectives pair up)."""
    say = progress or (lambda msg: log.info(msg))
    stop = stop_check(should_stop)
    config = step_budget(config, device)  # (load_model has settled it; a runner made directly too)
    cc = config.cache
    if transforms is None:
        transforms = model_transforms(config, weights, tp)
    model = build_on_meta(spec, dtype, max_model_len, transforms)
    spec = model.spec  # a tensor-parallel rank's own heads and MLP width
    if config.model.devices is not None and tp is None:
        return _bring_up_split(runner_cls, config, spec, model, weights, dtype=dtype, kv_dtype=kv_dtype,
                               attention=attention, max_model_len=max_model_len, say=say, stop=stop,
                               should_stop=should_stop)
    backend = usable_backend(attention, device)
    need = load_bytes(model, device.type)
    # An explicit KV size that can't fit is refused now, not after the weights load.
    check_explicit_kv(config, device, spec.kv_bytes_per_token(kv_dtype.itemsize) * cc.block_size,
                      max_model_len, weights_bytes=need)
    say(f"loading weights ({spec.num_params() / 1e6:.0f}M parameters, {str(dtype).removeprefix('torch.')})")
    quantized = any(hasattr(m, "qweight") or hasattr(m, "quant_form") for m in model.modules())
    check_weights_fit(need, device, "quantized" if quantized else str(dtype).removeprefix("torch."))
    runner = None
    try:
        materialize_weights(model, weights, device, need, should_stop, say)
        plan = KernelPlan.for_backend(backend)
        apply_kernel_plan(model, plan)
        if tp is not None:
            from engine.runner.tensor_parallel import reduce_row_parallel

            reduce_row_parallel(model, tp)
        runner = runner_cls(model, spec, device, dtype, cc.block_size, attention, plan,
                            enforce_eager=config.enforce_eager, kv_dtype=kv_dtype)
        runner.tp = tp
        info = runner.load_info
        # From here on a failure or a cancel frees the runner's weights and cache at once.
        graphs = runner.graphs_reason() is None
        count = None
        if tp is not None and tp.collective:  # every rank holds the same blocks: the fewest any can
            # CPU ranks share the RAM's budget
            def count() -> int:
                return tp.agree_min([kv_blocks(config, device, runner.kv_block_bytes(), max_model_len,
                                               peak_bytes=lambda n: activation_peak_bytes(runner, n),
                                               graph_bytes=(lambda b, p: graph_reserve_bytes(runner, b, p))
                                               if graphs else None, cpu_share=tp.world)], device)[0]
        size_kv_cache(runner, config, device, runner.kv_block_bytes(), max_model_len, info, say, stop,
                      peak_bytes=lambda n: activation_peak_bytes(runner, n),
                      graph_bytes=(lambda b, p: graph_reserve_bytes(runner, b, p)) if graphs else None,
                      count=count)
        stop()
        if device.type == "cpu" and tp is None:  # batch-1 decode in one C call (no collectives), over the new cache
            from engine.runner.cpu_step import CpuDecodeStep, use_c_head

            info["cpu_head"] = use_c_head(runner) or True
            runner.cpu_step, reason = CpuDecodeStep.build(runner)
            info["cpu_decode"] = True if reason is None else reason
            say("decode steps: one C call per token" if reason is None else f"decode steps run eagerly: {reason}")
        _tune_and_capture(runner, config, max_model_len, info, say, stop)
        return runner
    except BaseException:
        _free_failed_load(runner, model, [device])
        raise


def _bring_up_split(runner_cls, config: EngineConfig, spec: ModelSpec, model: LlamaForCausalLM,
                    weights: WeightsSource, *, dtype: torch.dtype, kv_dtype: torch.dtype, attention: str,
                    max_model_len: int, say: Callable[[str], None], stop: Callable[[], None],
                    should_stop: Callable[[], bool] | None):
    """``bring_up`` for a layer split over ``config.model.devices``
    (``engine.runner.layer_split``): the same steps, each per device."""
    from engine.loader.choices import resolve_attention
    from engine.runner import layer_split as ls

    cc = config.cache
    # The CPU's layers run the torch reference; the GPUs' the backend asked for (auto: Triton).
    gpu = next((torch.device(d) for d in config.model.devices if d != "cpu"), None)
    kinds = {"cpu": "torch", "cuda": resolve_attention(config.attention, gpu) if gpu is not None else "torch"}
    placement = ls.plan_placement(model, config, kv_token_bytes=spec.kv_bytes_per_token(kv_dtype.itemsize),
                                  max_model_len=max_model_len, attention=kinds)
    need = ls.weight_bytes_per_device(model, placement)
    say(f"layer split: {placement.describe(need)}")
    ls.check_split_fits(need, ratio=config.model.split_ratio is not None)
    if cc.kv_cache_memory is not None and cc.num_blocks is None:  # refused now, not after the weights load
        ls.check_split_kv(config, placement, max_model_len,
                          spec.kv_bytes_per_token(kv_dtype.itemsize) // spec.num_layers * cc.block_size, need)
    expected = ls.expected_speed(model, placement, need)
    say(f"expected batch-1 decode at best: about {expected:.0f} tok/s (each device's weights read once per "
        "token at its measured bandwidth)")
    plans = {d: KernelPlan.for_backend(usable_backend(placement.attention[d], d)) for d in placement.devices}
    say(f"loading weights ({spec.num_params() / 1e6:.0f}M parameters, {str(dtype).removeprefix('torch.')})")
    runner = None
    try:
        materialize_weights(model, weights, placement.embed, load_bytes(model, "cuda"), should_stop, say,
                            placement=placement)
        apply_kernel_plan(model, lambda name: plans[placement.device_of(name)])
        ls.install_hops(model, placement, plans)
        first = placement.layer_devices[0]
        runner = runner_cls(model, spec, placement.embed, dtype, cc.block_size, placement.attention[first],
                            plans[first], enforce_eager=config.enforce_eager, kv_dtype=kv_dtype)
        runner.placement = placement
        runner.logits_device = placement.head
        # A CPU segment would make a step launched ahead block the host until it ran: the
        # tokens of each step would arrive one step late.
        runner.launch_ahead = all(d.type == "cuda" for d in placement.devices)
        info = runner.load_info
        info["layer_split"] = {**placement.info(), "expected_decode_tok_s": round(expected, 1)}
        layer_block = runner.kv_block_bytes() // spec.num_layers
        peaks = ls.split_activation_peaks(runner, config.scheduler.max_num_batched_tokens)
        size_kv_cache(runner, config, placement.embed, runner.kv_block_bytes(), max_model_len, info, say, stop,
                      count=lambda: ls.split_kv_blocks(runner, config, max_model_len, layer_block, peaks,
                                                       graphs=runner.graphs_reason() is None))
        stop()
        _tune_and_capture(runner, config, max_model_len, info, say, stop)
        return runner
    except BaseException:
        _free_failed_load(runner, model, placement.devices)
        raise


def _tune_and_capture(runner, config: EngineConfig, max_model_len: int, info: dict[str, Any],
                      say: Callable[[str], None], stop: Callable[[], None]) -> None:
    """Bring-up's last steps: the batch-1 GEMV choice, then the CUDA graphs (which so hold it)."""
    if runner.gemv_reason() is None:
        t0 = time.perf_counter()
        info["batch1_matmul"] = runner.tune_gemv(say)
        info["batch1_tune_s"] = round(time.perf_counter() - t0, 2)
    if runner.device.type == "cuda":  # (PDL applies to Hearth's fused Triton kernels only)
        from hearth_kernels.pdl import pdl_on

        info["pdl"] = runner.gemv_reason() is None and pdl_on(runner.device)
    stop()
    capture_graphs(runner, config, max_model_len, info, say)


def _free_failed_load(runner, model: nn.Module, devices: Iterable[torch.device]) -> None:
    """Let go of what a cancelled or failed load took. The traceback being raised still
    references the half-loaded model (load_weights' frame holds it), so dropping our name
    for it frees nothing: its tensors are released directly."""
    if runner is not None:
        release_runner(runner)
    else:
        release_module(model)
    for d in devices:
        empty_device_cache(d)


def capture_graphs(runner, config: EngineConfig, max_model_len: int, info: dict[str, Any],
                   say: Callable[[str], None]) -> None:
    """Capture the prompt and decode CUDA graphs where they can run; a capture that fails
    leaves the runner eager rather than failing the load (tensor parallel: fails it on
    every rank, whose collectives are paired with this one's). Records what happened in ``info``."""
    graphs_reason = runner.graphs_reason()
    info["cuda_graphs"] = graphs_reason is None
    tp = getattr(runner, "tp", None)
    ranks = tp is not None and tp.collective
    if graphs_reason is None:
        try:
            info["cuda_graph_bytes"] = runner.capture_graphs(
                config.scheduler.max_num_seqs, max_model_len, say, prompt_tokens(config, max_model_len),
                strict=ranks)
            if ranks:  # every rank keeps the same graphs, or none does
                graphs_reason = _agree_graphs(runner, tp, graphs_reason)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # run eagerly rather than not at all
            if ranks:  # the other ranks are in this capture's collectives: they can't carry on alone
                raise
            log.warning("CUDA graph capture failed, running eagerly: %s", e)
            runner.graphs = runner.prompt_graphs = None
            torch.cuda.empty_cache()
            graphs_reason = f"capture failed: {e}"
        if graphs_reason is None:
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
    elif ranks and runner.device.type == "cuda":  # (a rank whose graphs can't run: none does)
        graphs_reason = _agree_graphs(runner, tp, graphs_reason)
    info["cuda_graphs"] = graphs_reason is None
    if graphs_reason is not None:
        info["cuda_graphs_off"] = graphs_reason


def _agree_graphs(runner, tp: TPGroup, reason: str | None) -> str | None:
    """Tensor parallel: every rank replays the same graphs or none does (a step padded to a
    bucket on one rank and not on another would pair all-reduces of different sizes): every
    rank serves a batch in rank 0's decode bucket (the timed routes may differ) and keeps
    the prompt buckets every rank kept (each keeps its smallest ones, timed in lock-step)."""
    kept = len(runner.prompt_graphs.graphs) if reason is None and runner.prompt_graphs is not None else 0
    ok, kept = tp.agree_min([int(reason is None), kept], runner.device)
    if ok == 0:
        runner.graphs = runner.prompt_graphs = None
        return reason or "capture failed on another tensor-parallel rank"
    graphs = runner.graphs
    buckets = sorted(graphs.routes)
    routes = torch.tensor([graphs.routes[b] for b in buckets], dtype=torch.int64, device=runner.device)
    graphs.routes = dict(zip(buckets, tp.broadcast(routes).tolist()))
    if runner.prompt_graphs is not None:
        runner.prompt_graphs.keep(kept)
        if kept == 0:
            runner.prompt_graphs = None
    return None
