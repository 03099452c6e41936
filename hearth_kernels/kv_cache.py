"""Scatter this step's keys and values into the paged KV cache.

The cache of one layer is ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then
V). Token ``t`` of the step goes to flat slot ``slot_mapping[t] = block * block_size +
offset`` (the runner computes it from the block table, as in PagedAttention, Kwon et al.
2023). A negative slot means "no slot": padding rows of a CUDA-graph batch are skipped, so
the launcher needs no host-side filtering (no sync, graph-capturable).

One program writes all kv heads of one token (a [heads, head_dim] tile of K and of V, a few
KiB: enough work per program at prefill, one small wave at decode); values are cast to the
cache dtype on store. An fp8 (e4m3) cache stores values unscaled, clamped to its finite
range +-448 (a finite value never becomes NaN; a NaN stays NaN), as vLLM does without
calibrated scales; K and V of attention layers sit far inside that range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hearth_kernels.pdl import pdl_args, pdl_start, pdl_wait

# The largest finite float8_e4m3fn value; fp8 caches saturate there.
FP8_MAX = tl.constexpr(448.0)
FP8_DTYPES = (torch.float8_e4m3fn,)


@triton.jit
def _round_to_e4m3(x):
    """fp32 ``x`` rounded to the nearest e4m3 value (ties to even), saturated at +-448, so
    that the cast to fp8 after it is exact. The same as the hardware's satfinite cast; done
    by hand because Triton's CPU interpreter mis-rounds when the rounding carries into the
    next power of two (1.98 became 1.0).

    e4m3 has 3 mantissa bits: a value in [2^e, 2^(e+1)) is a multiple of 2^(e-3), for
    e >= -6 (below that, subnormals: multiples of 2^-9). Round x / quantum to an integer
    with the 1.5 * 2^23 trick (fp32 adds round to nearest even), scale back, saturate.
    Scaling multiplies by exact powers of two (a compiled division may be approximate)."""
    c = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    e = ((c.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # exact: a power of two
    magic = 12582912.0  # 1.5 * 2^23
    y = (c * inverse + magic) - magic
    y = tl.where(y == 0.0, c * 0.0, y)  # keeps the sign of a value that rounds to zero
    y = tl.minimum(tl.maximum(y * quantum, -FP8_MAX), FP8_MAX)
    return tl.where(x != x, x, y)  # NaN stays NaN (as torch's cast), never a number


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head,
    NUM_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr, D_PAD: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    pdl_wait(PDL)  # (hearth_kernels/pdl.py)
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    # A padding row (slot < 0) masks every lane off: nothing is read or written.
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM) & (slot >= 0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    dst = (cache_ptr + blk * stride_c_blk + off * stride_c_tok
           + offs_h[:, None] * stride_c_head + offs_d[None, :])
    k = tl.load(k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if FP8:
        k = _round_to_e4m3(k.to(tl.float32))
        v = _round_to_e4m3(v.to(tl.float32))
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write ``k``/``v`` ``[T, num_kv_heads, head_dim]`` into ``kv_cache`` at ``slot_mapping``.

    ``slot_mapping`` is ``[T]`` int32/int64; rows with a negative slot are skipped. ``k`` and
    ``v`` may be strided views (e.g. slices of a fused qkv output) as long as their last
    dimension is contiguous. Works in place; returns nothing.
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"write_kv_cache: k and v must both be [T, kv_heads, head_dim], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    t, h, d = k.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != (h, d):
        raise ValueError(f"write_kv_cache: kv_cache must be [2, blocks, block_size, {h}, {d}], "
                         f"got {tuple(kv_cache.shape)}")
    if slot_mapping.shape != (t,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"write_kv_cache: slot_mapping must be int32/int64 of shape [{t}], got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("write_kv_cache: the head_dim axis of k, v and kv_cache must be "
                         "contiguous (stride 1); pass .contiguous() tensors")
    if t == 0:
        return
    h_pad, d_pad = triton.next_power_of_2(h), triton.next_power_of_2(d)
    _write_kv_kernel[(t,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_HEADS=h, BLOCK_SIZE=kv_cache.shape[2], HEAD_DIM=d, H_PAD=h_pad, D_PAD=d_pad,
        FP8=kv_cache.dtype in FP8_DTYPES, num_warps=4 if h_pad * d_pad >= 1024 else 1, **pdl_args(k.device),
    )
