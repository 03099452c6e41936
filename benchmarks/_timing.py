"""CUDA-event timing shared by the profiling scripts (imported as a sibling module: the
scripts run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations


def cuda_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Mean milliseconds of ``fn()`` on the GPU after ``warmup`` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
