"""Build a native model from a resolved folder: meta device -> storage -> weights."""

from __future__ import annotations

import gc

import torch

from engine.device import free_memory_bytes, gib
from engine.errors import OutOfMemoryError
from engine.loader.weights import iter_weights
from engine.models.llama import LlamaForCausalLM
from engine.models.spec import ModelSpec


def build_native(path, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                 max_positions: int, random_seed: int | None = None) -> LlamaForCausalLM:
    """Build the model on the meta device, allocate it on ``device`` and load weights.

    Tensors are streamed one at a time from the mmap'd safetensors files and copied into
    place, so RAM never holds a second full copy. With ``random_seed`` the weights are
    random (benchmark shapes) and ``path`` is not read. On any failure nothing stays
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
            model.load_weights(iter_weights(path), source=str(path))
        model.eval()
        return model
    except torch.OutOfMemoryError as e:
        del model
        _release(device)
        raise OutOfMemoryError(
            f"out of memory while loading the weights ({gib(need)}): {e}. Pick a smaller or "
            "quantized model, or free memory."
        ) from None
    except BaseException:
        del model
        _release(device)
        raise


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
