"""Stopping a load and freeing what a model or runner holds (a cancel, a failure, an unload)."""

from __future__ import annotations

import logging
import torch


log = logging.getLogger("hearth.loader")


def release_module(model) -> None:
    """Free every tensor ``model`` (a ``torch.nn.Module``) holds, even where something else
    still references the module: parameters and buffers become storage-less (meta), and
    tensors kept as plain attributes (RoPE tables) are dropped. The module can't run
    afterwards. Anything else is ignored."""
    if not isinstance(model, torch.nn.Module):
        return
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):
                setattr(module, key, None)
        if getattr(module, "kernel", None) is not None and hasattr(module, "qweight"):
            # A bound quantized kernel holds the weight's tensors (or a repacked copy).
            from engine.layers.quant_kernels import DequantMatmul

            module.kernel = DequantMatmul()
        elif getattr(getattr(module, "kernel", None), "holds_tensors", False):  # the C LM head's
            from engine.layers.linear_kernels import Matmul

            module.kernel = Matmul()
    try:
        model.to("meta")
    except Exception:  # pragma: no cover - freeing must never fail a shutdown
        log.debug("could not move the model to the meta device", exc_info=True)


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
    if getattr(runner, "cpu_step", None) is not None:
        runner.cpu_step = None  # it holds the weights and cache (and C pointers into them)
    placement = getattr(runner, "placement", None)
    if placement is not None:  # a layer split's hooks hold each device's RoPE tables
        from engine.runner.layer_split import remove_hops

        remove_hops(placement)
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
    close_ranks = getattr(runner, "close_ranks", None)
    if close_ranks is not None:  # tensor parallel: the other ranks end, then the group (after the graphs)
        try:
            close_ranks()
        except Exception:  # pragma: no cover - freeing must never fail a shutdown
            log.exception("could not end the tensor-parallel ranks")


def empty_device_cache(device: torch.device) -> None:
    """Hand CUDA's cached blocks back after freeing. No gc.collect() here: a load runs on a
    worker thread in the desktop app, where collecting others' garbage (Qt widgets in a
    cycle) crashes; the tensors were let go of directly."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
