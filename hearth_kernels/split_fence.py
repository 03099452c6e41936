"""The GPU-scope fences of the split-K launches whose last program sums the others' partials
(``hearth_kernels/counters.py``: ``quant_mma``'s and ``fp8_mma``'s ``_write_tile``, the dp4a GEMV,
the Gluon int4 kernel).

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

import triton
import triton.language as tl

from hearth_kernels._compat import interpreting

#: ``fence_mode``'s bits: the writers' fence (after the partial, before the count), the last
#: program's (after the count, before reading the others' partials)
WRITER, READER = 1, 2
_MODES = {"writer": WRITER, "0": 0, "reader": READER, "both": WRITER | READER, "1": WRITER | READER}


def fence_mode() -> int:
    """Which of the split launches' fences run (a launch passes it as its ``FENCE``): the
    writers' (``WRITER``) by default; none in the interpreter (which runs programs one after
    another and has no inline assembly). ``HEARTH_SPLIT_FENCE`` (A/B only, for timing the fences
    and looking for races): ``0`` none (a split may then sum partials not yet written),
    ``writer``, ``reader`` the last program's alone, ``both`` (or ``1``, as it meant on
    2026-12-06 when both were the default); unset or empty, the default; anything else is refused."""
    want = (os.environ.get("HEARTH_SPLIT_FENCE") or "writer").strip().lower()
    if want not in _MODES:
        raise ValueError(f"HEARTH_SPLIT_FENCE={want!r}: use writer (the default), both, reader or 0")
    return 0 if interpreting() else _MODES[want]


def launch_fence(split: int) -> int:
    """A launch's ``FENCE``: ``fence_mode()`` for a launch split along K, else 0 (nothing to fence)."""
    return fence_mode() if split > 1 else 0


@triton.jit
def fence_gpu(FENCE: tl.constexpr):
    """``fence.acq_rel.gpu`` in every thread of the program (a 32-element tensor is held by
    every warp: Triton replicates it), when ``FENCE`` (a launch's ``FENCE & WRITER`` or
    ``FENCE & READER``: ``fence_mode``)."""
    if FENCE:
        zero = tl.full([32], 0, tl.int32)
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [zero], dtype=tl.int32,
                                  is_pure=False, pack=1)
