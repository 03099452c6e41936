"""Zeroed int32 counters for kernels whose last program to arrive finishes the job.

A split launch (the split-K fixups of ``quant_mma``, ``quant_dp4a`` and ``fp8``) has each program
write its partial result, then add one to its output tile's counter; the program that
sees ``count == parts - 1`` adds the partials in a fixed order, writes the output and sets
the counter back to zero for the next launch. One fixed-size tensor per device, never
replaced (CUDA graphs keep its address), made outside graph capture: at load
(``make_counters``) or by a launch's first eager run (``capture_graph`` runs the forward
once before capturing it). Shared by every launch on the device, which is safe because
launches on one device are serialized (the engine runs on one stream, and a PDL-launched
kernel waits for the one before it to finish before touching memory); two streams
running split launches at once would need counters of their own.

Every split launch fences before its count goes up: ``hearth_kernels/split_fence.py``.
"""

from __future__ import annotations

import torch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_COUNTER_SLOTS = 1 << 16  # output tiles of one launch; 256 KiB per device


def make_counters(device: torch.device) -> None:
    """Allocate ``device``'s counters now (at load: never inside graph capture)."""
    counters(torch.device(device), 0)


def counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's counters, for a launch with ``n`` output tiles."""
    if n > _COUNTER_SLOTS:
        raise ValueError(f"{n} output tiles in one split-K launch (at most {_COUNTER_SLOTS}); "
                         "use wider tiles or no split")
    have = _COUNTERS.get(device)
    if have is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the split-K counters must be made before CUDA graph capture "
                               "(hearth_kernels.counters.make_counters, or one split-K launch outside capture first)")
        have = _COUNTERS[device] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return have
