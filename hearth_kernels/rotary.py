"""Rotary position embedding (RoPE, Su et al. 2021, RoFormer), applied in place to q and k.

"Rotate half" layout of Hugging Face checkpoints: a head vector is split into halves
(x1, x2) and, with c/s the cos/sin of angle ``pos * inv_freq_i``,

    rope(x) = (x1*c - x2*s,  x2*c + x1*s)

``cos``/``sin`` are the tables of ``engine.layers.rotary.RotaryEmbedding``: ``[max_pos,
head_dim]`` in the model dtype with duplicated halves, so only the first half is read.
Each product and the sum are rounded to the model dtype in the reference's order
(``x*cos + rotate_half(x)*sin``), so low-precision results match it bit for bit up to
fused multiply-adds the compiler may form.

One program rotates every q and k head of one token: the token's cos/sin row is loaded
once and shared by all heads (GQA and MHA alike).

``apply_rotary_and_write_kv`` does that and also writes the rotated k and the v of each token
into the paged KV cache (``hearth_kernels/kv_cache.py``'s layout and rounding): the two
kernels of every attention layer become one, the same bits in q, k and the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hearth_kernels.kv_cache import FP8_DTYPES, _round_to_e4m3
from hearth_kernels.pdl import pdl_args, pdl_start, pdl_wait


@triton.jit
def _rotated(x_ptr, stride_h, c, s, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
             H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    """The heads at ``x_ptr`` rotated: (pointers to their first halves, mask, first halves,
    second halves), in x's dtype."""
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    p1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    dt = x_ptr.dtype.element_ty
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    # Round every product, then the sum, to the model dtype as the eager reference does.
    o1 = ((f1 * c).to(dt).to(tl.float32) + (-f2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((f2 * c).to(dt).to(tl.float32) + (f1 * s).to(dt).to(tl.float32)).to(dt)
    return p1, mask, o1, o2


@triton.jit
def _rotate_heads(x_ptr, stride_h, c, s, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    p1, mask, o1, o2 = _rotated(x_ptr, stride_h, c, s, NUM_HEADS, HALF, H_PAD, HALF_PAD)
    tl.store(p1, o1, mask=mask)
    tl.store(p1 + HALF, o2, mask=mask)


@triton.jit
def _to_cache(x, cache_ptr, FP8: tl.constexpr):
    """Values as a cache of ``cache_ptr``'s dtype stores them (``write_kv_cache``'s rounding)."""
    if FP8:
        x = _round_to_e4m3(x.to(tl.float32))
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _token_cos_sin(pos_ptr, cos_ptr, sin_ptr, tok, stride_cos, stride_sin, HALF: tl.constexpr,
                   HALF_PAD: tl.constexpr):
    """Token ``tok``'s cos and sin rows (first halves, fp32, [1, HALF_PAD])."""
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    dmask = offs_d < HALF
    c = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    return c, s


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    QH_PAD: tl.constexpr, KH_PAD: tl.constexpr, HALF_PAD: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    pdl_wait(PDL)  # (hearth_kernels/pdl.py)
    tok = tl.program_id(0)
    c, s = _token_cos_sin(pos_ptr, cos_ptr, sin_ptr, tok, stride_cos, stride_sin, HALF, HALF_PAD)
    tok64 = tok.to(tl.int64)
    _rotate_heads(q_ptr + tok64 * stride_qt, stride_qh, c, s, NUM_Q_HEADS, HALF, QH_PAD, HALF_PAD)
    _rotate_heads(k_ptr + tok64 * stride_kt, stride_kh, c, s, NUM_K_HEADS, HALF, KH_PAD, HALF_PAD)


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    QH_PAD: tl.constexpr, KH_PAD: tl.constexpr, HALF_PAD: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    pdl_wait(PDL)  # (hearth_kernels/pdl.py)
    tok = tl.program_id(0)
    tok64 = tok.to(tl.int64)
    c, s = _token_cos_sin(pos_ptr, cos_ptr, sin_ptr, tok, stride_cos, stride_sin, HALF, HALF_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    _rotate_heads(q_ptr + tok64 * stride_qt, stride_qh, c, s, NUM_Q_HEADS, HALF, QH_PAD, HALF_PAD)
    p1, mask, k1, k2 = _rotated(k_ptr + tok64 * stride_kt, stride_kh, c, s, NUM_K_HEADS, HALF, KH_PAD, HALF_PAD)
    tl.store(p1, k1, mask=mask)  # k rotated in place too: a fresh prompt's attention reads it there
    tl.store(p1 + HALF, k2, mask=mask)
    # the cache slot; a padding row (slot < 0) writes nothing there
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    cmask = mask & (slot >= 0)
    offs_h = tl.arange(0, KH_PAD)
    dst = (cache_ptr + (slot // BLOCK_SIZE) * stride_c_blk + (slot % BLOCK_SIZE) * stride_c_tok
           + offs_h[:, None] * stride_c_head + offs_d[None, :])
    tl.store(dst, _to_cache(k1, cache_ptr, FP8), mask=cmask)
    tl.store(dst + HALF, _to_cache(k2, cache_ptr, FP8), mask=cmask)
    pv = v_ptr + tok64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    v1 = tl.load(pv, mask=cmask, other=0.0)
    v2 = tl.load(pv + HALF, mask=cmask, other=0.0)
    tl.store(dst + stride_c_kv, _to_cache(v1, cache_ptr, FP8), mask=cmask)
    tl.store(dst + stride_c_kv + HALF, _to_cache(v2, cache_ptr, FP8), mask=cmask)


def _check_rope(who: str, t: int, d: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The checks ``apply_rotary`` and ``apply_rotary_and_write_kv`` share: an even head_dim,
    ``positions`` [t] of int32/int64, cos/sin [max_pos, d] tables with a contiguous last axis."""
    if d % 2:
        raise ValueError(f"{who}: head_dim must be even, got {d}")
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{who}: positions must be int32/int64 of shape [{t}], got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.dim() != 2 or tab.shape[1] != d or tab.stride(1) != 1:
            raise ValueError(f"{who}: {name} must be a [max_pos, {d}] table with a contiguous "
                             f"last axis, got {tuple(tab.shape)}")


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [T, H, D] and ``k`` [T, KVH, D] IN PLACE by their token's position.

    ``positions`` is ``[T]`` (int32/int64, each < ``cos.shape[0]``: not checked on the device,
    that would need a sync); ``cos``/``sin`` are ``[max_pos, D]`` tables with duplicated
    halves. ``q``/``k`` may be strided views (slices of a fused qkv output) whose last axis
    is contiguous. Returns ``(q, k)`` (the same tensors) for chaining.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"apply_rotary: q must be [T, H, D] and k [T, KVH, D], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    t, hq, d = q.shape
    hk = k.shape[1]
    _check_rope("apply_rotary", t, d, positions, cos, sin)
    if q.dtype != k.dtype:
        raise ValueError(f"apply_rotary: q is {q.dtype} but k is {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rotary: the head_dim axis of q and k must be contiguous (stride 1)")
    if t == 0:
        return q, k
    half = d // 2
    qh_pad, kh_pad = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    half_pad = triton.next_power_of_2(half)
    warps = min(triton.next_power_of_2(max((qh_pad + kh_pad) * half_pad // 512, 1)), 8)
    _rotary_kernel[(t,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        NUM_Q_HEADS=hq, NUM_K_HEADS=hk, HALF=half,
        QH_PAD=qh_pad, KH_PAD=kh_pad, HALF_PAD=half_pad, num_warps=warps, **pdl_args(q.device),
    )
    return q, k


def apply_rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> None:
    """``apply_rotary(q, k, positions, cos, sin)`` then ``write_kv_cache(k, v, kv_cache,
    slot_mapping)`` (``hearth_kernels/kv_cache.py``) in one kernel, with the same results:
    q and k rotated in place, the rotated k and v in their cache slots (none for a negative
    slot), cast or rounded to the cache's dtype as there. The arguments as those two take
    them."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"apply_rotary_and_write_kv: q must be [T, H, D] and k, v [T, KVH, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    t, hq, d = q.shape
    hk = k.shape[1]
    _check_rope("apply_rotary_and_write_kv", t, d, positions, cos, sin)
    if slot_mapping.shape != (t,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"apply_rotary_and_write_kv: slot_mapping must be int32/int64 of shape [{t}], got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"apply_rotary_and_write_kv: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != (hk, d):
        raise ValueError(f"apply_rotary_and_write_kv: kv_cache must be [2, blocks, block_size, {hk}, {d}], "
                         f"got {tuple(kv_cache.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("apply_rotary_and_write_kv: the head_dim axis of q, k, v and kv_cache must be "
                         "contiguous (stride 1)")
    if t == 0:
        return
    half = d // 2
    qh_pad, kh_pad = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    half_pad = triton.next_power_of_2(half)
    warps = min(triton.next_power_of_2(max((qh_pad + 2 * kh_pad) * half_pad // 512, 1)), 8)
    _rotary_write_kv_kernel[(t,)](
        q, k, v, positions, cos, sin, kv_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_Q_HEADS=hq, NUM_K_HEADS=hk, HALF=half, BLOCK_SIZE=kv_cache.shape[2],
        QH_PAD=qh_pad, KH_PAD=kh_pad, HALF_PAD=half_pad, FP8=kv_cache.dtype in FP8_DTYPES,
        num_warps=warps, **pdl_args(q.device),
    )
