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
