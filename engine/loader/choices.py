"""Every load choice checked against this machine before anything is read or loaded.

``load_model`` (so ``Engine.load``, the CLI and the app alike) starts here: an unknown or
unusable device, dtype, attention backend or KV-cache dtype is refused in milliseconds,
not after the model was resolved, converted and its weights loaded (issue 12:
``--attention xformers`` was refused 8 s into the load).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.device import resolve_device, resolve_dtype
from engine.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class LoadChoices:
    """The load's choices resolved for this machine (``auto`` replaced by what it means)."""

    device: torch.device
    dtype: torch.dtype
    attention: str


def check_load_choices(config: EngineConfig) -> LoadChoices:
    """Resolve and check the device, dtype, attention backend and KV-cache dtype of
    ``config``; raises InvalidRequestError naming the choice, why, and what to use instead.

    Only what depends on the model (its native support, for an fp8 KV cache) is left to
    the load itself.
    """
    mc, cc = config.model, config.cache
    device = resolve_device(mc.device)
    dtype = resolve_dtype(mc.dtype, device)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidRequestError(
            f"dtype bfloat16 asked for, but {torch.cuda.get_device_name(device)} has no bfloat16 "
            "support: use float16 or auto (--dtype float16).", options=("dtype",))
    attention = resolve_attention(config.attention, device)
    if cc.kv_cache_dtype == "fp8":
        check_fp8_kv_cache(attention, device)
    if config.attention != "auto":
        from engine.layers.attention import backend_reasons

        reasons = backend_reasons(attention, device)
        if reasons:
            raise InvalidRequestError(
                f"attention backend {attention!r} can't run here: {'; '.join(reasons)}. "
                "Use auto, or torch, which runs everywhere (--attention auto).", options=("attention",))
    return LoadChoices(device, dtype, attention)


def resolve_attention(name: str, device: torch.device) -> str:
    """``auto``: the Triton backend on a CUDA GPU when it can run there, else the torch
    reference. Any other name must be a registered backend."""
    from engine.layers.attention import backend_names, backend_reasons

    if name == "auto":
        if device.type == "cuda" and not backend_reasons("triton", device):
            return "triton"
        return "torch"
    if name not in backend_names():
        raise InvalidRequestError(
            f"unknown attention backend {name!r}; choose one of: auto, {', '.join(backend_names())} "
            "(--attention; `hearth doctor` shows which run here).", options=("attention",))
    return name


def check_fp8_kv_cache(attention: str, device: torch.device) -> None:
    """Refuse an fp8 KV cache the attention backend can't read on ``device``."""
    from engine.layers.attention import backend_names

    if attention not in ("torch", "triton") and attention in backend_names():
        raise InvalidRequestError(
            f"the {attention!r} attention backend can't read an fp8 KV cache: use the triton (CUDA) "
            "or torch backend (--attention), or a KV cache in the model's dtype (--kv-cache-dtype auto).",
            options=("attention", "kv_cache_dtype"))
    if attention == "triton" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise InvalidRequestError(
            f"the triton backend's fp8 KV cache needs an Ada or Hopper GPU (compute capability "
            f"8.9+); this one is {major}.{minor}. Use a KV cache in the model's dtype (--kv-cache-dtype "
            "auto), or the torch backend (--attention torch).", options=("attention", "kv_cache_dtype"))
