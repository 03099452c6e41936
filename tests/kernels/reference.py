"""Shared pieces of the kernel tests: paged-cache builders and float64 references.

The references are written from the definitions (gather each sequence's keys through its
block table, mask, softmax in float64), independently of both the kernels and the engine's
TorchAttention. Caches are poisoned: every slot that no sequence owns, and a dedicated
block that pads the block tables, hold NaN, so a kernel that reads outside a sequence's
context turns its output into NaN instead of passing by luck.
"""

from __future__ import annotations

import math

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_paged_cache(seq_lens: list[int], kv_heads: int, head_dim: int, block_size: int,
                     dtype=torch.float32, device=DEVICE, seed: int = 0, extra_cols: int = 1):
    """(kv_cache, block_tables) holding random K/V for each sequence's first seq_len tokens.

    Blocks are handed out in a shuffled order (tables are not monotonic); tables are padded
    with ``extra_cols`` extra columns pointing at an all-NaN poison block.
    """
    g = torch.Generator().manual_seed(seed)
    needed = [cdiv(n, block_size) for n in seq_lens]
    num_blocks = sum(needed) + 2  # + poison block + one never used
    order = torch.randperm(num_blocks - 1, generator=g).tolist()
    poison = num_blocks - 1
    width = max(needed + [1]) + extra_cols
    tables = torch.full((len(seq_lens), width), poison, dtype=torch.int32)
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"),
                       dtype=torch.float32, device=device)
    gd = torch.Generator(device=device).manual_seed(seed)
    for i, (n, nb) in enumerate(zip(seq_lens, needed)):
        ids = torch.tensor([order.pop() for _ in range(nb)], dtype=torch.int32)
        tables[i, :nb] = ids
        pos = torch.arange(n)
        blocks, offsets = ids[pos // block_size].long().to(device), (pos % block_size).to(device)
        cache[:, blocks, offsets] = torch.randn(2, n, kv_heads, head_dim, generator=gd, device=device)
    return cache.to(device=device, dtype=dtype), tables.to(device)


def gather_context(cache: torch.Tensor, table: torch.Tensor, seq_len: int):
    """(keys, values) [seq_len, KVH, D] of one sequence, in float64."""
    block_size = cache.shape[2]
    pos = torch.arange(seq_len, device=cache.device)
    blocks = table[pos // block_size].long()
    return cache[0, blocks, pos % block_size].double(), cache[1, blocks, pos % block_size].double()


def reference_attention(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor,
                        query_start: list[int], seq_lens: list[int], scale: float,
                        window: int | None = None) -> torch.Tensor:
    """float64 causal paged attention; q [T, H, D] -> [T, H, D] (float64).

    Sequence i owns rows query_start[i]:query_start[i+1]; its queries are the last tokens
    of its seq_lens[i]-token context. Rows of an empty context (seq_len 0) are zeros.
    """
    t, h, d = q.shape
    group = h // cache.shape[3]
    out = torch.zeros(t, h, d, dtype=torch.float64, device=q.device)
    for i, seq_len in enumerate(seq_lens):
        s0, s1 = query_start[i], query_start[i + 1]
        if seq_len == 0 or s1 == s0:
            continue
        keys, vals = gather_context(cache, tables[i], seq_len)
        keys = keys.repeat_interleave(group, dim=1)
        vals = vals.repeat_interleave(group, dim=1)
        kpos = torch.arange(seq_len, device=q.device)
        for c0 in range(s0, s1, 256):  # query chunks bound the [H, q, k] score memory
            c1 = min(c0 + 256, s1)
            qpos = torch.arange(c0 - s0, c1 - s0, device=q.device) + seq_len - (s1 - s0)
            visible = kpos[None, :] <= qpos[:, None]
            if window is not None:
                visible &= kpos[None, :] > qpos[:, None] - window
            scores = torch.einsum("qhd,khd->hqk", q[c0:c1].double(), keys) * scale
            scores = scores.masked_fill(~visible[None], -math.inf)
            out[c0:c1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals)
    return out


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of last place between two same-dtype 16-bit float tensors."""
    assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)

    def ordered(x):  # map the bit patterns onto a monotonic integer line
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0
