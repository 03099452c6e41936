"""Weights requested into L2 ahead of the kernel that reads them (batch-1 decode, sm_90+).

A batch-1 decode step streams every weight once, but memory is not busy all the time: the
norms, RoPE, the KV write and attention read almost nothing, and the smaller projections (a
quantized layer's q/k/v and o: 9-25 MB) are too short to reach full bandwidth (the 8B int4
q/k/v GEMV streamed 2.0 TB/s, o 1.7 TB/s, against 3.3 TB/s for gate/up: a fixed cost per
kernel, not bandwidth). ``L2Prefetch`` launches a small kernel that asks the memory system
to bring such a weight into L2 early (``cp.async.bulk.prefetch.L2``: a hint that loads
nothing into the program) while the kernels before its reader run; the reader then finds
its weight in L2.

It runs beside the decode step, on a stream of its own, never in its chain of kernels: a
program holding bulk prefetches finishes only when they have landed (measured on the H200:
put in the chain, with PDL, every kernel after it waited for the prefetched bytes, and int4
batch-1 decode fell from 490 to 385 tok/s). Nothing waits for it but the end of the step
(``engine/runner/l2_prefetch.py`` forks and joins the streams). It reads nothing any kernel
writes (weights only) and writes nothing, so the results are bit for bit the same with it
or without.

Up to ``MAX_RANGES`` byte ranges per launch (a quantized weight's codes, scales, mins and
bias), cut into ``CHUNK``-byte prefetches, one per lane of one-warp programs spread over
the SMs. On CPU and under Triton's interpreter (no inline PTX) it can only record what it
would prefetch (``lanes``, for tests).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


#: bytes per prefetch instruction (a multiple of 16)
CHUNK = 8192
#: prefetch instructions per program (one warp, one each)
LANES = 32
#: byte ranges one launch takes
MAX_RANGES = 4


@triton.jit
def _prefetch_l2(addr, size):
    """``cp.async.bulk.prefetch.L2`` of ``size`` bytes at ``addr`` (int64 addresses, 16-byte
    aligned; int32 sizes, multiples of 16; a size of 0 issues nothing): a hint to the memory
    system, it loads nothing into the program."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _lane_range(c, a, n, first, CHUNK_: tl.constexpr):
    """Chunk ``c`` (of all ranges) in the range of ``n`` bytes at ``a`` whose chunks start at
    ``first``: (address, bytes; 0 where c is not in it)."""
    j = c - first
    inside = (j >= 0) & (j.to(tl.int64) * CHUNK_ < n)
    off = tl.where(inside, j, 0).to(tl.int64) * CHUNK_
    left = n - off
    return a + off, tl.where(inside, tl.where(left < CHUNK_, left, CHUNK_), 0).to(tl.int32)


@triton.jit
def _l2_prefetch_kernel(a0, n0, a1, n1, a2, n2, a3, n3, c1, c2, c3, rec_ptr, CHUNK_: tl.constexpr,
                        LANES_: tl.constexpr, RECORD: tl.constexpr):
    # a*: range addresses (16-byte aligned), n*: their bytes (multiples of 16, 0: unused),
    # c*: the chunk where ranges 1..3 start (range 0 at chunk 0). RECORD (tests, under the
    # interpreter, which has no inline PTX): store each lane's (address, bytes) in rec_ptr
    # instead of prefetching.
    c = tl.program_id(0) * LANES_ + tl.arange(0, LANES_)
    p0, s0 = _lane_range(c, a0, n0, 0, CHUNK_)
    p1, s1 = _lane_range(c, a1, n1, c1, CHUNK_)
    p2, s2 = _lane_range(c, a2, n2, c2, CHUNK_)
    p3, s3 = _lane_range(c, a3, n3, c3, CHUNK_)
    addr = tl.where(s0 > 0, p0, tl.where(s1 > 0, p1, tl.where(s2 > 0, p2, p3)))
    size = s0 + s1 + s2 + s3  # (at most one is non-zero)
    if RECORD:
        tl.store(rec_ptr + 2 * c, addr)
        tl.store(rec_ptr + 2 * c + 1, size.to(tl.int64))
    else:
        _prefetch_l2(addr, size)


def l2_prefetch_on(device: torch.device) -> bool:
    """Whether ``L2Prefetch`` can run on ``device``: a CUDA GPU of compute capability 9.0 or
    newer (the bulk prefetch instruction), not under Triton's interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=16)
def l2_bytes(index: int) -> int:
    """The L2 cache size of CUDA device ``index`` in bytes."""
    return int(torch.cuda.get_device_properties(index).L2_cache_size)


def byte_ranges(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(address, bytes) of each distinct tensor's storage span, widened to 16-byte
    alignment at the start (inside its allocation: those are 512-byte aligned) and cut to a
    multiple of 16 at the end; tensors sharing memory are taken once."""
    spans = []
    for t in tensors:
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()  # (contiguous tensors: the planner checks)
        a = start - start % 16
        n = (end - a) // 16 * 16
        if n > 0:
            spans.append((a, n))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, n in spans:
        if merged and a <= merged[-1][0] + merged[-1][1]:
            pa, pn = merged[-1]
            merged[-1] = (pa, max(pn, (a + n) - pa) // 16 * 16)
        else:
            merged.append((a, n))
    return merged


class L2Prefetch:
    """One prefetch launch, planned once (at load): ``ranges`` (at most ``MAX_RANGES``
    (address, bytes) pairs from ``byte_ranges``) on ``device``; calling it launches the
    kernel on the current stream (captured like any launch inside a CUDA graph; see the
    module docstring for the stream to launch it on)."""

    def __init__(self, ranges: list[tuple[int, int]], device: torch.device) -> None:
        if not 0 < len(ranges) <= MAX_RANGES:
            raise ValueError(f"l2_prefetch takes 1 to {MAX_RANGES} ranges, got {len(ranges)}")
        for a, n in ranges:
            if a % 16 or n % 16 or n <= 0 or n >= 2 ** 31:
                raise ValueError(f"l2_prefetch: range ({a:#x}, {n}) is not 16-byte aligned or sized")
        self.ranges = list(ranges)
        self.device = device
        self.nbytes = sum(n for _, n in ranges)
        padded = self.ranges + [(0, 0)] * (MAX_RANGES - len(self.ranges))
        chunks = [-(-n // CHUNK) for _, n in padded]
        starts = [sum(chunks[:i]) for i in range(MAX_RANGES)]
        self._args = [v for a, n in padded for v in (a, n)] + starts[1:]
        self._grid = (triton.cdiv(sum(chunks), LANES),)

    def __call__(self) -> None:
        _l2_prefetch_kernel[self._grid](*self._args, None, CHUNK_=CHUNK, LANES_=LANES, RECORD=False, num_warps=1)

    def lanes(self) -> torch.Tensor:
        """What each lane would prefetch, [programs x LANES, 2] int64 (address, bytes; 0
        bytes: nothing), from the kernel itself with RECORD (any device; tests)."""
        rec = torch.zeros((self._grid[0] * LANES, 2), dtype=torch.int64, device=self.device)
        _l2_prefetch_kernel[self._grid](*self._args, rec, CHUNK_=CHUNK, LANES_=LANES, RECORD=True, num_warps=1)
        return rec
