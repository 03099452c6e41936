"""Every load choice checked against this machine before anything is read or loaded,
through the one registry of choices (``engine.choices``).

``load_model`` (so ``Engine.load``, the CLI and the app alike) starts here: an unknown or
unusable device, dtype, attention backend, KV-cache dtype or quantization is refused in
milliseconds, not after the model was resolved, converted and its weights loaded (issue
12: ``--attention xformers`` was refused 8 s into the load).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import choices
from engine.config import EngineConfig
from engine.device import resolve_device, resolve_dtype
from engine.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class LoadChoices:
    """The load's choices resolved for this machine (``auto`` replaced by what it means)."""

    device: torch.device
    dtype: torch.dtype
    attention: str
    notes: tuple[str, ...] = ()  # the picked choices' caveats on this device (the load says them)


def check_load_choices(config: EngineConfig, *, writing: bool = False) -> LoadChoices:
    """Resolve and check the device, dtype, attention backend, KV-cache dtype and
    quantization of ``config`` against the choices registry (``engine.choices``): a choice
    that can't run here raises InvalidRequestError naming it, the registry's reasons, and
    what to use instead.

    Only what depends on the model (its native support, for an fp8 KV cache) is left to
    the load itself. ``writing``: the load only writes the weights out (``hearth quantize``),
    so a quantization that can be cast anywhere (``choices.WRITABLE_ANYWHERE``) passes.
    """
    mc, cc = config.model, config.cache
    if mc.devices is not None:  # (before the first device alone is checked: the message names --devices)
        check_devices(config)
    device = resolve_device(mc.device)
    dtype = resolve_dtype(_quantization_dtype(mc.quantization, mc.dtype, device), device)
    where = str(device)
    if dtype == torch.bfloat16:
        reasons = choices.get("dtype", "bfloat16", where).reasons
        if reasons:
            raise InvalidRequestError(
                f"dtype bfloat16 asked for, but {'; '.join(reasons)} (--dtype float16 or auto).",
                options=("dtype",))
    attention = resolve_attention(config.attention, device)
    if cc.kv_cache_dtype == "fp8":
        check_fp8_kv_cache(attention, device)
    if config.attention != "auto":
        reasons = choices.get("attention", attention, where).reasons
        if reasons:
            raise InvalidRequestError(
                f"attention backend {attention!r} can't run here: {'; '.join(reasons)}. "
                "Use auto, or torch, which runs everywhere (--attention auto).", options=("attention",))
    quantization = choices.get("quantization", mc.quantization, where)
    if quantization.reasons and not (writing and quantization.name in choices.WRITABLE_ANYWHERE):
        raise InvalidRequestError(
            f"quantization {quantization.name!r} can't be used here: {'; '.join(quantization.reasons)}. "
            "Load the weights unquantized (--quant none).", options=("quantization",))
    from engine.quant.transform import check_quant_flags

    check_quant_flags(quantization.name, mc.quant_group_size, mc.quant_head, mc.float_head)
    said = [choices.get("kv_cache_dtype", cc.kv_cache_dtype, where), quantization]
    notes = () if writing else tuple(note for c in said if c.load_note for note in c.caveats)
    return LoadChoices(device, dtype, attention, notes)


def check_devices(config: EngineConfig) -> None:
    """A multi-device load's devices exist here and its mode can run (``engine.split``)."""
    from engine.split import check_available

    mc = config.model
    check_available(mc.devices, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if config.model.force_fallback:
        raise InvalidRequestError(f"a {mc.split} split runs Hearth's native models only, not the transformers "
                                  "fallback (drop --devices, or force_fallback).", options=("devices",))


# quantization "bf16"/"fp16": unquantized weights in that dtype (float32 on the CPU, where
# torch's half-precision matmuls are slow).
_UNQUANTIZED_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _quantization_dtype(quantization: str, dtype: str, device: torch.device) -> str:
    """The dtype name a load uses: ``dtype``, or the one quantization bf16/fp16 names."""
    want = _UNQUANTIZED_DTYPES.get(quantization)
    if want is None:
        return dtype
    if dtype not in ("auto", want):
        raise InvalidRequestError(
            f"quantization {quantization} loads the weights in {want}, but dtype {dtype} was asked for: "
            f"drop one of them (--quant {quantization} or --dtype {dtype}).", options=("quantization", "dtype"))
    if dtype == "auto" and device.type != "cuda":
        return "float32"
    return want


def resolve_attention(name: str, device: torch.device) -> str:
    """``auto``: the Triton backend on a CUDA GPU when it can run there, else the torch
    reference. Any other name must be one of the registry's backends."""
    name = choices.canonical("attention", name)
    if name == "auto":
        if device.type == "cuda" and not choices.get("attention", "triton", str(device)).reasons:
            return "triton"
        return "torch"
    return name


def check_fp8_kv_cache(attention: str, device: torch.device) -> None:
    """Refuse an fp8 KV cache the attention backend can't read on ``device``."""
    if attention not in ("torch", "triton"):
        raise InvalidRequestError(
            f"the {attention!r} attention backend can't read an fp8 KV cache: use the triton (CUDA) "
            "or torch backend (--attention), or a KV cache in the model's dtype (--kv-cache-dtype auto).",
            options=("attention", "kv_cache_dtype"))
    if attention == "triton" and device.type == "cuda":
        reasons = choices.get("kv_cache_dtype", "fp8", str(device)).reasons
        if reasons:
            major, minor = torch.cuda.get_device_capability(device)
            raise InvalidRequestError(
                f"{'; '.join(reasons)}; this one is {major}.{minor}. Use a KV cache in the model's dtype "
                "(--kv-cache-dtype auto), or the torch backend (--attention torch).",
                options=("attention", "kv_cache_dtype"))
