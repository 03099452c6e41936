"""CUDA-event timing shared by the profiling scripts (imported as a sibling module: the
scripts run as ``python benchmarks/<script>.py`` with the repository on PYTHONPATH). The
timer itself is the engine's, which its load-time GEMV tuning uses too."""

from __future__ import annotations

from engine.device import cuda_ms

__all__ = ["cuda_ms"]
