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

Every thread of a program fences at GPU scope (``fence_gpu``) after writing its partial and
before the count goes up: CUDA's documented pattern for a last block that sums the others'
results (the programming guide's memory-fence example: each writer fences before the atomic; the
last block reads after a barrier, from L2 here: ``.cg`` loads). Without it, on H100s at one tree
(030aea2) the Gluon int4 kernel summed partials not yet written (``quant_mma_gluon.fits``);
the same kernel without fences at a later tree (f0e08b0) and the Triton kernels' split GPU tests
gave no race in three calls each, so which side a race needs was not pinned down there: the
writers' fence is the default, ``HEARTH_SPLIT_FENCE=both`` adds the last program's
(``benchmarks/results/2026-12-06-i14-split-fence-*-h100-*``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hearth_kernels._compat import interpreting

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


#: ``fence_mode``'s bits: the writers' fence (after the partial, before the count), the last
#: program's (after the count, before reading the others' partials)
WRITER, READER = 1, 2


def fence_mode() -> int:
    """Which of the split launches' fences run (a launch passes it as its ``FENCE``): the
    writers' (``WRITER``) by default; none in the interpreter (which runs programs one after
    another and has no inline assembly). ``HEARTH_SPLIT_FENCE`` (A/B only, for timing the fences
    and looking for races): ``0`` none (a split may then sum partials not yet written),
    ``reader`` the last program's alone, ``both``."""
    if interpreting():
        return 0
    want = os.environ.get("HEARTH_SPLIT_FENCE", "writer")
    return {"0": 0, "reader": READER, "both": WRITER | READER}.get(want, WRITER)


@triton.jit
def fence_gpu(FENCE: tl.constexpr):
    """``fence.acq_rel.gpu`` in every thread of the program (a 32-element tensor is held by
    every warp: Triton replicates it), when ``FENCE`` (a launch's ``FENCE & WRITER`` or
    ``FENCE & READER``: ``fence_mode``)."""
    if FENCE:
        zero = tl.full([32], 0, tl.int32)
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [zero], dtype=tl.int32,
                                  is_pure=False, pack=1)
