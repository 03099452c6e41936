"""Paged attention for decode: one new query token per sequence, split along the context.

For sequence b, query head h (kv head g = h // group) and context length L = seq_lens[b],

    out[b, h] = sum_k softmax_k(scale * q[b, h] . K[b, k, g]) V[b, k, g],   k in [lo, L)

with lo = 0, or lo = max(0, L - window) under a sliding window (a query at position p sees
keys p - window < k <= p; the query is the last token, p = L - 1). Key k of sequence b lives
in cache block ``block_tables[b, k // block_size]`` at offset ``k % block_size``
(PagedAttention, Kwon et al. 2023); the kernel reads the block table directly.

Work split (Flash-Decoding, Dao et al. 2023): the grid is (B, kv_heads, num_splits). A
program owns one kv head of one sequence and one of ``num_splits`` equal slices of that
sequence's visible keys (the slice length is computed on the device from seq_len, rounded
up to whole tiles), and handles ALL the query heads of that kv head at once (GQA: each
K/V tile is loaded once and used by the whole group, which is padded to 16 rows for the
tensor-core dot). Within its slice it runs the online softmax of FlashAttention
(Milakov & Gimelshein 2018; Dao 2023) over tiles of ``block_n`` keys, accumulating in
fp32. With several splits it writes a normalised partial output plus its row max m_p and
sum l_p, and a second kernel merges them with the log-sum-exp rule

    M = max_p m_p,   w_p = l_p * 2^(m_p - M),   out = sum_p w_p o_p / sum_p w_p

so a single long sequence at batch 1 still spreads over the whole GPU. With one split
the first kernel writes the output itself. Under a sliding window only the window's keys
are sliced, so no program is spent on keys nobody sees.

CUDA-graph safe: the grid depends only on B, the head counts and ``num_splits`` (chosen
from B, the heads and the static bound ``max_seq_len``, never from device data), and the
slicing is computed on the device, so a graph captured at a large bound (the model's
context length) does not waste programs on short contexts. Slices past a short
sequence's end exit at once and the merge ignores them. No host sync, no ``.item()``.
A sequence with ``seq_len == 0`` (batch padding) gets zeros.

An fp8 (e4m3) cache under fp16 dots (``hearth_kernels._checks.fp8_as_fp16``): K widens as
Triton loads it, but V is the second dot's B operand with the keys (the strided axis) as its
reduction axis, and Triton, hoisting the widening past the shared-memory load, gathers that
operand a byte at a time (128 single-byte shared loads a thread a 128-key tile; figures here
from sm_90 builds of Triton 3.6 without a window, (128, 4, 3): 1,308 instructions a loop
iteration against bf16's 781). ``V_PAIRS`` reads V as 16-bit pairs of neighbouring values
instead, widens each pair in registers (one ``cvt.rn.f16x2.e4m3x2`` on the GPU, Triton's
casts in the interpreter: the same exact values), and hands the dot an fp16 tile, which
Triton stages through shared memory and reads with ``ldmatrix`` like a bf16 one: no byte
loads, 944 instructions an iteration, 144 registers a thread instead of 212 and 72.5 KiB of
shared memory instead of 40.5 (three programs an SM instead of two, by registers).

``TABLE_AHEAD``: each tile's block numbers are loaded one tile ahead, into registers carried
by the loop. Loaded in the tile's own iteration, they are an indirection Triton's pipeliner
gives a stage of its own, and it then keeps one K and one V buffer whatever ``num_stages``
says: each tile's copies start only after the previous tile is consumed, and the bytes in
flight come from other programs on the SM alone. Ahead, K and V get ``num_stages - 1``
buffers, so it changes nothing at 2 stages (bf16's config) and costs shared memory beyond:
both switches at (128, 4, 3) take 104 KiB (two programs an SM), a bf16 cache at 3 stages
136 KiB (one).

Both are on for an e4m3 cache (``V_PAIRS_DEFAULT``; the block numbers ahead wherever V is
read as pairs), at their own config (``_config``): on an H100 the 8B shape's decode attention
at batch 512 took 0.348 ms against 0.425, and offline throughput with fp8 weights and the fp8
cache went from 12,462 to 13,474 tok/s (bf16 9,395). A bf16 cache, at memory speed already,
keeps the plain kernel. ``HEARTH_DECODE_V_PAIRS`` / ``HEARTH_DECODE_TABLE_AHEAD`` = ``1`` or ``0``
force either (A/B runs).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from hearth_kernels.pdl import pdl_args, pdl_start, pdl_wait

from hearth_kernels._checks import check_paged_cache, fp8_as_fp16
from hearth_kernels._compat import interpreting

_LOG2E = 1.4426950408889634
# Scores start here rather than at -inf so that a row whose keys are all masked so far
# stays NaN-free (2^(-inf - -inf) is NaN; 2^(-inf - NEG_BIG) is 0).
_NEG_BIG = tl.constexpr(-1.0e30)


#: e4m3 pairs to fp16 pairs in one instruction (sm_89 and newer; exact: every e4m3 value is an fp16 one)
_E4M3X2_TO_F16X2 = tl.constexpr("cvt.rn.f16x2.e4m3x2 $0, $1;")


@triton.jit
def _fp8_pairs_as_fp16(pairs, ROWS: tl.constexpr, D_PAD: tl.constexpr, ASM: tl.constexpr):
    """int16 [ROWS, D_PAD // 2], each two neighbouring e4m3 values (the lower byte the even
    one) -> fp16 [ROWS, D_PAD] in their order; by one conversion a pair (ASM) or by Triton's casts."""
    if ASM:
        both = tl.inline_asm_elementwise(asm=_E4M3X2_TO_F16X2, constraints="=r,h", args=[pairs], dtype=tl.int32,
                                         is_pure=True, pack=1)
        even = (both & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        odd = (both >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        even = (pairs & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        odd = ((pairs >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return tl.reshape(tl.join(even, odd), [ROWS, D_PAD])


@triton.jit
def _visible_span(seq_len, window, num_splits, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, base, slice_len): the first visible key, where slicing starts (lo rounded down
    to a tile, so the first tile holds a visible key) and each split's length in keys."""
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    base = (lo // BLOCK_N) * BLOCK_N
    per_split = tl.cdiv(seq_len - base, num_splits)
    slice_len = tl.maximum(tl.cdiv(per_split, BLOCK_N), 1) * BLOCK_N
    return lo, base, slice_len


# window and num_splits change with eager batches: not specialised (no recompiles for them).
@triton.jit(do_not_specialize=["window", "num_splits"])
def _decode_split_kernel(
    q_ptr, cache_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_ml_ptr,
    qk_scale, window, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_c_kv, stride_c_blk, stride_c_tok, stride_c_head, stride_tb,
    stride_pb, stride_ph, stride_pp, stride_mlb, stride_mlh,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    AS_FP16: tl.constexpr, PDL: tl.constexpr, V_PAIRS: tl.constexpr = 0, TABLE_AHEAD: tl.constexpr = 0,
):
    # V_PAIRS (an e4m3 cache under fp16 dots, see the module docstring): 0 V widened as Triton
    # loads it; 1 read as pairs, widened by Triton's casts; 2 as pairs by one conversion a pair
    pdl_start(PDL)
    pdl_wait(PDL)  # before any load or early return (hearth_kernels/pdl.py)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    lo, base, slice_len = _visible_span(seq_len, window, num_splits, HAS_WINDOW, BLOCK_N)
    start = base + split * slice_len
    if SPLIT:
        if start >= seq_len:
            return  # past this sequence's end: the merge ignores this split
    # (Unsplit, the lone program always runs: a padding row, seq_len 0, must write zeros.)
    end = tl.minimum(start + slice_len, seq_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if AS_FP16:  # bf16 queries over an fp8 cache: the dots run in fp16 (see fp8_as_fp16)
        q = q.to(tl.float16)

    m_i = tl.full([G_PAD], _NEG_BIG, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    table = tables_ptr + b64 * stride_tb
    head_off = kvh.to(tl.int64) * stride_c_head
    if TABLE_AHEAD:  # the first tile's block numbers (see the module docstring)
        nxt = tl.load(table + (start + offs_n) // BLOCK_SIZE, mask=start + offs_n < end, other=0)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        k_mask = pos < end
        if TABLE_AHEAD:
            blk = nxt.to(tl.int64)
            nxt = tl.load(table + (pos + BLOCK_N) // BLOCK_SIZE, mask=pos + BLOCK_N < end, other=0)
        else:
            blk = tl.load(table + pos // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
        row = blk * stride_c_blk + (pos % BLOCK_SIZE) * stride_c_tok + head_off
        kv_mask = k_mask[:, None] & d_mask[None, :]
        # .to(q.dtype): an fp8 cache is widened here; otherwise a no-op.
        k = tl.load(cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G_PAD, BLOCK_N]
        visible = k_mask
        if HAS_WINDOW:
            visible = visible & (pos >= lo)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_PAIRS:
            # (every offset even: paged_decode_attention checks the cache's strides)
            offs_p = tl.arange(0, D_PAD // 2)
            pair_ptr = (cache_ptr + stride_c_kv).to(tl.pointer_type(tl.int16))
            pairs = tl.load(pair_ptr + (row // 2)[:, None] + offs_p[None, :],
                            mask=k_mask[:, None] & (offs_p < HEAD_DIM // 2)[None, :], other=0)
            v = _fp8_pairs_as_fp16(pairs, BLOCK_N, D_PAD, V_PAIRS == 2)
        else:
            v = tl.load(cache_ptr + stride_c_kv + row[:, None] + offs_d[None, :], mask=kv_mask,
                        other=0.0).to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0 only for an empty context
    st_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        p_base = b64 * stride_pb + split * stride_pp
        tl.store(part_out_ptr + p_base + heads[:, None] * stride_ph + offs_d[None, :], o, mask=st_mask)
        ml = part_ml_ptr + b64 * stride_mlb + heads * stride_mlh + split * 2
        tl.store(ml, m_i, mask=g_mask)
        tl.store(ml + 1, l_i, mask=g_mask)
    else:
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=st_mask)


@triton.jit(do_not_specialize=["window", "num_splits"])
def _decode_merge_kernel(
    part_out_ptr, part_ml_ptr, seq_lens_ptr, out_ptr, window, num_splits,
    stride_pb, stride_ph, stride_pp, stride_mlb, stride_mlh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NP_PAD: tl.constexpr,
    CHUNK: tl.constexpr, HAS_WINDOW: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    pdl_wait(PDL)  # (hearth_kernels/pdl.py)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    lo, base, slice_len = _visible_span(seq_len, window, num_splits, HAS_WINDOW, BLOCK_N)
    n_parts = tl.cdiv(seq_len - base, slice_len)  # splits that ran (0 for seq_len 0)
    ml = part_ml_ptr + b * stride_mlb + h * stride_mlh
    offs_p = tl.arange(0, NP_PAD)
    p_mask = offs_p < n_parts
    m = tl.load(ml + offs_p * 2, mask=p_mask, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # seq_len 0: nothing to merge
    l = tl.load(ml + offs_p * 2 + 1, mask=p_mask, other=0.0)
    total = tl.sum(l * tl.exp2(m - m_max), axis=0)

    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    offs_c = tl.arange(0, CHUNK)
    acc = tl.zeros([D_PAD], tl.float32)
    o_base = part_out_ptr + b * stride_pb + h * stride_ph
    # Chunks of splits keep registers bounded however many splits there are.
    for c0 in range(0, n_parts, CHUNK):
        pc = c0 + offs_c
        c_mask = pc < n_parts
        mc = tl.load(ml + pc * 2, mask=c_mask, other=float("-inf"))
        lc = tl.load(ml + pc * 2 + 1, mask=c_mask, other=0.0)
        w = lc * tl.exp2(mc - m_max)
        o = tl.load(o_base + pc[:, None] * stride_pp + offs_d[None, :],
                    mask=c_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, axis=0)
    res = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty),
             mask=d_mask)


@functools.lru_cache(maxsize=64)
def _config(head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype | None = None,
            pairs_ahead: bool = False) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) for a head size and dtype, chosen for Hopper.

    Decode is bound by reading K/V: 128-key tiles (32 KiB of K and of V per tile at d=128,
    bf16) with two stages keep enough loads in flight. Swept on an H100 over block_n
    {32, 64, 128} x warps {2, 4, 8} x stages {2, 3, 4} (the 8B shape's one layer, contexts
    128-1600 scattered over the pool; benchmarks/profile_decode_attention.py): at batch 512
    2.90 TB/s against 2.83 for (64, 4, 3), at batch 128 2.48 against 2.37; a torch sum
    over as many bytes reads at 3.02 and 2.50.

    An fp8 cache (half the bytes, plus a conversion per value) swept the same way
    (block_n {64, 128, 256} x warps {2, 4, 8} x stages {2, 3}): (128, 4, 3) reads at 2.00
    TB/s at batch 512 and 1.61 at 128, within 2% of the best at each. With V as pairs and
    the block numbers a tile ahead (``pairs_ahead``, the default since 2026-12-06), swept
    over block_n {64, 128} x warps {4, 8} x stages {2, 3, 4} at batch 512 on an H100:
    (64, 4, 3) reads at 2.49 TB/s (0.348 ms) against 2.04 for the plain kernel at its
    (128, 4, 3); batch 128 not swept. (The bf16 cache's configs with the block numbers
    ahead: 3.00 TB/s at best, the same as without.)
    """
    d_pad = triton.next_power_of_2(head_dim)
    if dtype == torch.float32 or d_pad > 128:
        return 32, 4, 2
    if cache_dtype == torch.float8_e4m3fn:
        return (64, 4, 3) if pairs_ahead else (128, 4, 3)
    return 128, 4, 2


#: V read as pairs over an e4m3 cache unless HEARTH_DECODE_V_PAIRS says otherwise
V_PAIRS_DEFAULT = True


def _switch(name: str, default: bool) -> bool:
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (unset: the default, {int(default)}), got {value!r}")
    return default if value == "" else value == "1"


def _table_ahead(v_pairs: int) -> bool:
    """The kernel's ``TABLE_AHEAD`` beside its ``V_PAIRS``: by default where V is read as pairs
    (a bf16 cache gained nothing from it at any config swept), unless HEARTH_DECODE_TABLE_AHEAD
    says otherwise."""
    return _switch("HEARTH_DECODE_TABLE_AHEAD", bool(v_pairs))


def _v_pairs(q_dtype: torch.dtype, kv_cache: torch.Tensor) -> int:
    """The kernel's ``V_PAIRS`` for this cache where it is switched on: 2 (1 in the
    interpreter) where V is e4m3 and the dots run in fp16 and every offset into the cache is
    even (an even head size in a cache the engine allocated), else 0."""
    if kv_cache.dtype != torch.float8_e4m3fn or not _switch("HEARTH_DECODE_V_PAIRS", V_PAIRS_DEFAULT):
        return 0
    if not (q_dtype == torch.float16 or fp8_as_fp16(q_dtype, kv_cache.dtype)):
        return 0
    if kv_cache.data_ptr() % 2 or any(s % 2 for s in kv_cache.stride()[:-1]) or kv_cache.shape[-1] % 2:
        return 0
    if interpreting():
        return 1
    # the conversion needs sm_89 (the engine refuses an fp8 cache below it; a direct call keeps the plain path)
    return 2 if torch.cuda.get_device_capability(kv_cache.device) >= (8, 9) else 0


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 128  # interpreter: any plausible number
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits per sequence: enough (batch x kv_heads x splits) programs to fill the GPU about
    twice over (two 4-warp programs fit per SM), but never slices shorter than ~128 keys
    of the static bound (below that the merge costs more than it saves).

    A function of static sizes only, so a CUDA graph captured at a bound keeps its split.
    It is a runtime kernel argument, not a compile-time one: batch sizes that change every
    eager step don't trigger recompiles.
    """
    want = triton.cdiv(2 * _num_sms(device), batch * kv_heads)
    return max(1, min(want, triton.cdiv(max_seq_len, 128)))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, *,
                           sliding_window: int | None = None, max_seq_len: int,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           block_n: int | None = None) -> torch.Tensor:
    """Decode attention of ``q`` [B, H, D] over the paged ``kv_cache``; returns [B, H, D].

    ``kv_cache`` is ``[2, num_blocks, block_size, KVH, D]`` (K then V) with H % KVH == 0;
    ``block_tables`` [B, max_blocks] int32; ``seq_lens`` [B] int32, the context length
    including this step's token (already written to the cache). ``max_seq_len`` is a
    static upper bound on ``seq_lens`` (it only sizes the split; any value >= the true
    lengths is correct, e.g. the model's context length under CUDA graphs).
    ``num_splits`` (slices per sequence, >= 1) and ``block_n`` (key tile, power of two
    >= 16) override the tuned defaults; tests use them to exercise the split and merge.
    """
    block_size, kv_heads = check_paged_cache("paged_decode_attention", q, kv_cache, "[B, H, D]")
    bsz, heads, dim = q.shape
    if block_tables.dim() != 2 or block_tables.shape[0] != bsz or block_tables.dtype != torch.int32:
        raise ValueError(f"paged_decode_attention: block_tables must be int32 [{bsz}, max_blocks], "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.shape != (bsz,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"paged_decode_attention: seq_lens must be int32 [{bsz}], got "
                         f"{seq_lens.dtype} {tuple(seq_lens.shape)}")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or block_tables.stride(1) != 1:
        raise ValueError("paged_decode_attention: the last axis of q, kv_cache and block_tables "
                         "must be contiguous (stride 1)")
    if out is None:
        out = torch.empty((bsz, heads, dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"paged_decode_attention: out must be a contiguous-last-axis {q.dtype} "
                         f"{tuple(q.shape)} tensor, got {out.dtype} {tuple(out.shape)}")
    if bsz == 0:
        return out
    v_pairs = _v_pairs(q.dtype, kv_cache)
    ahead = _table_ahead(v_pairs)
    cfg_n, warps, stages = _config(dim, q.dtype, kv_cache.dtype, bool(v_pairs) and ahead)
    block_n = cfg_n if block_n is None else block_n
    splits = _auto_splits(bsz, kv_heads, max_seq_len, q.device) if num_splits is None else num_splits
    if block_n < 16 or block_n & (block_n - 1) or splits < 1:
        raise ValueError(f"paged_decode_attention: block_n must be a power of two >= 16 and "
                         f"num_splits >= 1, got {block_n} and {splits}")
    split = splits > 1
    group = heads // kv_heads
    d_pad = triton.next_power_of_2(dim)
    if split:
        part_out = torch.empty((bsz, heads, splits, dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((bsz, heads, splits, 2), dtype=torch.float32, device=q.device)
        pstrides = (part_out.stride(0), part_out.stride(1), part_out.stride(2),
                    part_ml.stride(0), part_ml.stride(1))
    else:
        part_out = part_ml = out  # unused (SPLIT=False)
        pstrides = (0, 0, 0, 0, 0)
    window = sliding_window or 0
    _decode_split_kernel[(bsz, kv_heads, splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_ml,
        scale * _LOG2E, window, splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), *pstrides,
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        AS_FP16=fp8_as_fp16(q.dtype, kv_cache.dtype), V_PAIRS=v_pairs, TABLE_AHEAD=ahead,
        num_warps=warps, num_stages=stages, **pdl_args(q.device),
    )
    if split:
        np_pad = triton.next_power_of_2(splits)
        _decode_merge_kernel[(bsz, heads)](
            part_out, part_ml, seq_lens, out, window, splits, *pstrides, out.stride(0), out.stride(1),
            HEAD_DIM=dim, D_PAD=d_pad, BLOCK_N=block_n, NP_PAD=np_pad,
            CHUNK=min(np_pad, 16),
            HAS_WINDOW=sliding_window is not None, num_warps=4 if d_pad >= 128 else 1, **pdl_args(q.device),
        )
    return out
