"""Paged attention for prefill and chunked prefill over a variable-length batch.

Sequence s owns query rows ``query_start[s]:query_start[s+1]`` (qlen_s of them) and has
``seq_lens[s]`` tokens in the cache, this step's included (they were written before the
call). Its query i sits at absolute position ``p = seq_len_s - qlen_s + i`` and attends
causally to every cached key k <= p (the cached prefix plus this chunk), or only to
p - window < k <= p under a sliding window:

    out[t, h] = sum_k softmax_k(scale * q[t, h] . K[s, k, h // group]) V[s, k, h // group]

Keys are read through the block table (PagedAttention, Kwon et al. 2023). The loop is
FlashAttention-2 (Dao 2023): a program owns a tile of queries, streams tiles of
``block_n`` keys, keeps an online softmax in fp32 (running max m, sum l, rescaled
accumulator) and normalises once at the end.

GQA packing: a program owns ``block_q`` queries of one sequence for ALL ``group`` query
heads of one kv head, as ``block_m = block_q * group`` rows (row r = query r // group, head
r % group). Each K/V tile is loaded once for the whole group, which divides K/V traffic by
the group size (4x for Llama-3-8B) and lets single-token decode rows share a tile with
their heads when decodes ride along with prefill chunks.

Key tiles are visited in three ranges so that only the edges pay for masking: tiles below
the window of some row (masked), tiles every row sees whole (no mask), and the causal
diagonal (masked). Tiles that no row sees are never visited.

Work list without host data: programs are numbered over "q blocks"; sequence s's blocks
start at ``query_start[s] // block_q + s`` (an upper bound of the blocks before it), so a
program finds its sequence by binary search over ``query_start`` and the grid,
``(kv_heads, T // block_q + B)``, depends only on the step's shape, not on its contents.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hearth_kernels._checks import check_paged_cache, fp8_as_fp16

_LOG2E = 1.4426950408889634
# Steps whose chunks all have at most this many queries get short query tiles.
SHORT_Q = 8
# Scores start here rather than at -inf so that a row whose keys are all masked in a tile
# (edges of the diagonal or of the window) stays NaN-free: 2^(-inf - NEG_BIG) is 0.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """Largest s with query_start[s] // BLOCK_Q + s <= q_block (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(acc, m_i, l_i, q, cache_ptr, table, head_off, n0, hi, qpos, window,
                 stride_c_kv, stride_c_blk, stride_c_tok, offs_n, offs_d, d_mask, qk_scale,
                 BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys n0 .. n0 + BLOCK_N of the paged cache."""
    pos = n0 + offs_n
    if MASKED:
        k_ok = pos < hi
        blk = tl.load(table + pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        kv_mask = k_ok[:, None] & d_mask[None, :]
    else:
        blk = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
        kv_mask = d_mask[None, :]
    row = blk * stride_c_blk + (pos % BLOCK_SIZE) * stride_c_tok + head_off
    # .to(q.dtype): an fp8 cache is widened here; otherwise a no-op.
    k = tl.load(cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = (pos[None, :] <= qpos[:, None]) & k_ok[None, :]
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > qpos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(cache_ptr + stride_c_kv + row[:, None] + offs_d[None, :], mask=kv_mask,
                other=0.0).to(q.dtype)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs", "window"])
def _prefill_kernel(
    q_ptr, cache_ptr, tables_ptr, query_start_ptr, seq_lens_ptr, out_ptr,
    qk_scale, num_seqs, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head, stride_tb,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, AS_FP16: tl.constexpr,
):
    # kv heads vary fastest in launch order and q blocks run last-to-first: the tiles with
    # the most keys (late queries of long prompts) start first instead of forming a tail.
    kvh = tl.program_id(0)
    q_block = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = _find_sequence(query_start_ptr, num_seqs, q_block, BLOCK_Q)
    q_begin = tl.load(query_start_ptr + seq)
    qlen = tl.load(query_start_ptr + seq + 1) - q_begin
    q0 = (q_block - (q_begin // BLOCK_Q + seq)) * BLOCK_Q  # first query of this tile
    if q0 >= qlen:
        return  # slack in the work list (the grid is an upper bound)
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - qlen  # tokens cached before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    qi = q0 + offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (qi < qlen)
    qpos = ctx + qi
    tok = (q_begin + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    if AS_FP16:  # bf16 queries over an fp8 cache: the dots run in fp16 (see fp8_as_fp16)
        q = q.to(tl.float16)

    # Key ranges: [lo, hi) is what any row of the tile may see; [full_lo, full_hi) what
    # every row sees. Tiles wholly inside the latter skip the mask.
    first_pos = ctx + q0
    last_pos = ctx + tl.minimum(q0 + BLOCK_Q, qlen) - 1
    hi = last_pos + 1
    full_hi = first_pos + 1
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
        full_lo = tl.maximum(last_pos - window + 1, 0)
    else:
        lo = 0
        full_lo = 0
    start = (lo // BLOCK_N) * BLOCK_N
    end_lower = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, start), hi)
    end_full = tl.maximum(end_lower, (full_hi // BLOCK_N) * BLOCK_N)

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    head_off = kvh.to(tl.int64) * stride_c_head
    if HAS_WINDOW:
        for n0 in range(start, end_lower, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, cache_ptr, table, head_off, n0, hi, qpos,
                                         window, stride_c_kv, stride_c_blk, stride_c_tok, offs_n,
                                         offs_d, d_mask, qk_scale, BLOCK_SIZE, True, HAS_WINDOW,
                                         DOT_PRECISION)
    for n0 in range(end_lower, end_full, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, cache_ptr, table, head_off, n0, hi, qpos,
                                     window, stride_c_kv, stride_c_blk, stride_c_tok, offs_n,
                                     offs_d, d_mask, qk_scale, BLOCK_SIZE, False, HAS_WINDOW,
                                     DOT_PRECISION)
    for n0 in range(end_full, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, cache_ptr, table, head_off, n0, hi, qpos,
                                     window, stride_c_kv, stride_c_blk, stride_c_tok, offs_n,
                                     offs_d, d_mask, qk_scale, BLOCK_SIZE, True, HAS_WINDOW,
                                     DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0 only on padding rows
    tl.store(out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


@functools.lru_cache(maxsize=64)
def _config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for a head size and dtype, for Hopper.

    128 x 64 tiles (wgmma, 8 warps; 4 warps spill at d=64) are the usual FlashAttention-2
    sweet spot in 16-bit. Three stages are needed for K/V double-buffering because each key tile's
    address comes from a block-table load one stage earlier. d=256 takes 64 x 32 tiles with
    8 warps to stay clear of register spills. Checked by compiling for sm_90 (ptxas: no
    spills; ~96 KiB shared memory at d=128). fp32 (CPU tests, debugging) uses small tiles.
    """
    d_pad = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if d_pad <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                            max_query_len: int, sliding_window: int | None = None,
                            out: torch.Tensor | None = None, block_m: int | None = None,
                            block_n: int | None = None) -> torch.Tensor:
    """Causal attention of the step's queries ``q`` [T, H, D] over the paged cache.

    ``kv_cache`` [2, num_blocks, block_size, KVH, D] already holds this step's K/V;
    ``block_tables`` [B, max_blocks] int32; ``query_start`` [B+1] int32 (row offsets, last
    = T); ``seq_lens`` [B] int32 (context length including this step's tokens).
    ``max_query_len`` (host int, an upper bound of the per-sequence query counts) only picks
    the tile height: decode-heavy batches get short tiles. ``block_m`` (power of two >= 16)
    and ``block_n`` (power of two >= 16) override the tuned tiles (tests use small ones).
    Returns ``out`` [T, H, D] in q's dtype.
    """
    block_size, kv_heads = check_paged_cache("paged_prefill_attention", q, kv_cache, "[T, H, D]")
    tokens, heads, dim = q.shape
    bsz = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise ValueError(f"paged_prefill_attention: seq_lens must be int32 [B], got "
                         f"{seq_lens.dtype} {tuple(seq_lens.shape)}")
    if query_start.shape != (bsz + 1,) or query_start.dtype != torch.int32:
        raise ValueError(f"paged_prefill_attention: query_start must be int32 [{bsz + 1}], got "
                         f"{query_start.dtype} {tuple(query_start.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != bsz or block_tables.dtype != torch.int32:
        raise ValueError(f"paged_prefill_attention: block_tables must be int32 [{bsz}, max_blocks], "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or block_tables.stride(1) != 1:
        raise ValueError("paged_prefill_attention: the last axis of q, kv_cache and block_tables "
                         "must be contiguous (stride 1)")
    if max_query_len < 1:
        raise ValueError(f"paged_prefill_attention: max_query_len must be >= 1, got {max_query_len}")
    if out is None:
        out = torch.empty((tokens, heads, dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"paged_prefill_attention: out must be a contiguous-last-axis {q.dtype} "
                         f"{tuple(q.shape)} tensor, got {out.dtype} {tuple(out.shape)}")
    if tokens == 0 or bsz == 0:
        return out
    cfg_m, cfg_n, warps, stages = _config(dim, q.dtype)
    block_m = cfg_m if block_m is None else block_m
    block_n = cfg_n if block_n is None else block_n
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"paged_prefill_attention: {name} must be a power of two >= 16, got {val}")
    group = heads // kv_heads
    # Queries per tile: fill block_m rows with whole groups, unless every sequence has at
    # most SHORT_Q queries (short chunks, decode rows): then tiles of SHORT_Q queries. Two
    # tile shapes, not one per power of two, so that load-time warm-up compiles them all.
    block_q = max(block_m // group, 1)
    if max_query_len <= SHORT_Q:
        block_q = min(block_q, SHORT_Q)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    if block_m < 64:
        warps = 4  # short tiles (decode rows riding with chunks) can't feed 8 warps
    q_blocks = tokens // block_q + bsz
    if q_blocks > 65535:  # CUDA's limit on the grid's second axis
        raise ValueError(f"paged_prefill_attention: {tokens} query tokens in one call is too many "
                         f"for tiles of {block_q} queries; split the step (max_num_batched_tokens)")
    grid = (kv_heads, q_blocks)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, query_start, seq_lens, out,
        scale * _LOG2E, bsz, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=dim,
        D_PAD=triton.next_power_of_2(dim), BLOCK_SIZE=block_size,
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        AS_FP16=fp8_as_fp16(q.dtype, kv_cache.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out
