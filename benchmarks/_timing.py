"""CUDA-event timing and the JSON writer shared by the profiling scripts (imported as a
sibling module: the scripts run as ``python benchmarks/<script>.py`` with the repository
on PYTHONPATH). The timer itself is the engine's, which its load-time GEMV tuning uses too."""

from __future__ import annotations

import json

from engine.device import cuda_ms

__all__ = ["cuda_ms", "dump_rows"]


def dump_rows(path: str | None, shape: str, rows: list[dict], **extra) -> None:
    """Write ``{"card", "shape", "rows", **extra}`` to ``path`` (nothing when None)."""
    import torch

    if path:
        with open(path, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "shape": shape, "rows": rows, **extra}, f, indent=1)
