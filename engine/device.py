"""Device and dtype choice, and how much memory there is to use."""

from __future__ import annotations

import os

import torch

from engine.errors import InvalidRequestError
from engine.memory_plan import auto_dtype


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError(
                f"device {spec!r} asked for, but torch sees no CUDA GPU here "
                f"(torch {torch.__version__}); run on the CPU (--device cpu), or install a CUDA "
                "build of torch.", options=("device",),
            )
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise InvalidRequestError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here."
            )
        return torch.device("cuda", index)
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # the rule lives in memory_plan, where the app's fit estimate reads it too
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return getattr(torch, auto_dtype(device.type, bf16_supported=bf16))
    return getattr(torch, name)


def available_ram_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_memory_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes on ``device`` (RAM for the CPU)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:  # pragma: no cover
        return available_ram_bytes(), available_ram_bytes()


#: CUDA device index -> the highest ``max_memory_allocated`` seen before a peak restart
#: inside the engine (``restart_cuda_peak``), so that a caller's own peak measurement
#: (``engine.metrics.peak_device_memory_bytes``) does not lose what a load held before the
#: KV sizing restarted torch's peak counter
_CARRIED_PEAK: dict[int, int] = {}


def restart_cuda_peak(device: torch.device) -> None:
    """``torch.cuda.reset_peak_memory_stats(device)``, keeping the peak so far for
    ``carried_cuda_peak``: the engine restarts the counter to measure one forward pass."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    _CARRIED_PEAK[index] = max(_CARRIED_PEAK.get(index, 0), int(torch.cuda.max_memory_allocated(index)))
    torch.cuda.reset_peak_memory_stats(index)


def carried_cuda_peak(index: int) -> int:
    """The peak ``restart_cuda_peak`` kept for CUDA device ``index`` (0: none)."""
    return _CARRIED_PEAK.get(index, 0)


def forget_cuda_peak(index: int) -> None:
    """Drop the kept peak of CUDA device ``index`` (a caller starting its own measurement)."""
    _CARRIED_PEAK.pop(index, None)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def cuda_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Mean milliseconds of ``fn()`` on the GPU after ``warmup`` untimed calls (CUDA events;
    the load-time tuner and the profiling scripts share it)."""
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
