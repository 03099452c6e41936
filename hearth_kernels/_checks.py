"""Argument checks shared by the paged-attention launchers (clear errors, not crashes)."""

from __future__ import annotations

import torch


def check_paged_cache(op: str, q: torch.Tensor, kv_cache: torch.Tensor, q_layout: str) -> tuple[int, int]:
    """Validate ``q`` ([rows, H, D]) against ``kv_cache`` ([2, blocks, block_size, KVH, D]);
    returns (block_size, kv_heads)."""
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"{op}: q must be {q_layout} and kv_cache "
                         f"[2, blocks, block_size, KVH, D], got {tuple(q.shape)} and {tuple(kv_cache.shape)}")
    heads, dim = q.shape[1], q.shape[2]
    _, _, block_size, kv_heads, cache_dim = kv_cache.shape
    if cache_dim != dim or heads % kv_heads:
        raise ValueError(f"{op}: q has {heads} heads of {dim}, the cache "
                         f"{kv_heads} kv heads of {cache_dim}; need equal head_dim and H % KVH == 0")
    if q.dtype != kv_cache.dtype and kv_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{op}: q is {q.dtype} but the cache is {kv_cache.dtype} (a cache "
                         "must hold q's dtype, or float8_e4m3fn)")
    return block_size, kv_heads


# How bf16 queries meet an fp8 cache: "fp16" widens each K/V tile to fp16 (one conversion
# instruction per two values on Hopper, exact: every e4m3 value is an fp16 value) and runs
# the dots in fp16 with the queries and probabilities rounded to fp16 (10 mantissa bits
# against bf16's 7; queries beyond fp16's 65504 would overflow, which attention layers
# don't produce). "bf16" widens to bf16, which Hopper has no direct conversion for.
FP8_WIDEN = "fp16"


def fp8_as_fp16(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether attention over this cache runs its dots in fp16 (bf16 queries, fp8 cache)."""
    return FP8_WIDEN == "fp16" and q_dtype == torch.bfloat16 and cache_dtype == torch.float8_e4m3fn
