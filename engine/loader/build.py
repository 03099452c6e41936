"""Build a native model from a resolved folder: meta device -> storage -> weights."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from engine.device import free_memory_bytes, gib
from engine.errors import LoadCancelledError, OutOfMemoryError
from engine.loader.weights import iter_weights
from engine.models.llama import LlamaForCausalLM
from engine.models.spec import ModelSpec

log = logging.getLogger("hearth.loader")


def build_native(path, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                 max_positions: int, random_seed: int | None = None,
                 should_stop: Callable[[], bool] | None = None) -> LlamaForCausalLM:
    """Build the model on the meta device, allocate it on ``device`` and load weights.

    Tensors are streamed one at a time from the mmap'd safetensors files and copied into
    place, so RAM never holds a second full copy. With ``random_seed`` the weights are
    random (benchmark shapes) and ``path`` is not read. ``should_stop`` is asked before
    each tensor: True raises ``LoadCancelledError`` (a big model's weights take minutes,
    and a cancel must not wait for all of them). On any failure or cancel nothing stays
    allocated.
    """
    need = spec.num_params() * dtype.itemsize
    free, _ = free_memory_bytes(device)
    if need > free:
        where = "GPU" if device.type == "cuda" else "RAM"
        raise OutOfMemoryError(
            f"the weights need {gib(need)} in {spec.torch_dtype or dtype} but the {where} has "
            f"{gib(free)} free: pick a smaller model or a quantized one, or free memory."
        )
    model = None
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(spec, dtype, max_positions)
        model.materialize(device)
        if random_seed is not None:
            model.init_random(random_seed)
        else:
            weights = iter_weights(path)
            if should_stop is not None:
                weights = _stoppable(weights, should_stop)
            model.load_weights(weights, source=str(path))
        model.eval()
        return model
    except torch.OutOfMemoryError as e:
        release_module(model)
        _release(device)
        raise OutOfMemoryError(
            f"out of memory while loading the weights ({gib(need)}): {e}. Pick a smaller or "
            "quantized model, or free memory."
        ) from None
    except BaseException:
        # The traceback being raised still references the half-loaded model (load_weights'
        # frame holds it), so dropping our name for it frees nothing: let go of its tensors.
        release_module(model)
        _release(device)
        raise


def _stoppable(weights: Iterable[tuple[str, torch.Tensor]],
               should_stop: Callable[[], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    for item in weights:
        if should_stop():
            raise LoadCancelledError("loading cancelled")
        yield item


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
    try:
        model.to("meta")
    except Exception:  # pragma: no cover - freeing must never fail a shutdown
        log.debug("could not move the model to the meta device", exc_info=True)


def _release(device: torch.device) -> None:
    # No gc.collect() here: a load runs on a worker thread in the desktop app, where
    # collecting others' garbage (Qt widgets in a cycle) crashes; the tensors were let go
    # of directly (release_module).
    if device.type == "cuda":
        torch.cuda.empty_cache()
