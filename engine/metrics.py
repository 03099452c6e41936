"""Memory telemetry (process RSS, device memory via torch / nvidia-ml-py)."""

from __future__ import annotations

import os


def process_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:  # pragma: no cover
        return 0


def memory_snapshot(engine) -> dict:
    info = engine.model_info
    snap = {
        "weights_bytes": info.weight_bytes,
        "kv_cache_bytes": info.kv_cache_bytes,
        "process_rss_bytes": process_rss_bytes(),
    }
    if info.device.startswith("cuda"):
        import torch

        dev = torch.device(info.device)
        free, total = torch.cuda.mem_get_info(dev)
        snap.update(device_total_bytes=total, device_used_bytes=total - free,
                    torch_allocated_bytes=torch.cuda.memory_allocated(dev))
    return snap


def reset_peak_device_memory() -> None:
    """Start a new peak for ``peak_device_memory_bytes`` on every CUDA device torch has
    set up (none set up yet: their peaks start at zero anyway). A no-op without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    from engine.device import forget_cuda_peak

    for index in range(torch.cuda.device_count()):
        forget_cuda_peak(index)
        torch.cuda.reset_peak_memory_stats(index)


def peak_device_memory_bytes(device: str) -> int | None:
    """The most bytes torch's allocator held on CUDA ``device`` ("cuda", "cuda:N") since
    ``reset_peak_device_memory`` (weights, KV pool, activations, CUDA graphs' pools; not
    the CUDA context or the allocator's unused cache), including what a load held before
    the engine restarted torch's counter to size the KV cache (``restart_cuda_peak``).
    None for a non-CUDA device or where CUDA isn't set up."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    from engine.device import carried_cuda_peak

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return max(int(torch.cuda.max_memory_allocated(index)), carried_cuda_peak(index))
