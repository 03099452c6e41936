"""Weight-stationary tensor-core int4/int8 matmul for few rows (batch-1 and batched decode,
short prompts): ``y = x W^T (+ b)`` computed as ``y^T = W x^T``, with ``W`` a
``PreparedQuant`` (``hearth_kernels/quant_gemv.py``; int4 codes in pair order).

Why the operands are swapped. With few rows of x (M = 1..64) the weight is what streams
from memory and what has to be decoded; a tile of it is ``[BLOCK_N, BLOCK_K]``. As the dot's
*first* operand, the weight rows fill the tensor core's tall side (wgmma needs 64 rows per
warpgroup) and the M rows of x (padded to 16) its narrow side, so a single row of x costs
no more than 16 and the decode work per weight is the same whatever M is. The other way
round (``hearth_kernels/quant_gemm.py``'s fused kernel), the x tile is the tall side: 16 rows waste
3/4 of a wgmma and the decode sits on the B side.

Decoding int4 without conversion instructions. A pair-order int32 word holds inputs
8w..8w+7 with input 8w + i at bits 4i. ``(word >> 4s) & 0x000F000F`` keeps input s in the
low half-word and input 4 + s in the high one, and OR-ing ``0x43004300`` makes each half the
bf16 ``128 + q`` exactly (bf16 128.0 has a mantissa step of 1; fp16 uses ``0x6400``, 1024.0).
So four words of eight codes cost three shifts and four LOP3s (``magic`` is passed at run
time: with two immediates ptxas would emit two LOP3s). The half-words are rearranged into
natural K order by ``tl.join``/``tl.reshape``, which the compiler turns into register
renaming (the sm_90 build stores the decoded tile with 16-byte ``STS.128``). The offset is
taken out after the dot, per group: ``acc += s * dot(c, x^T) + (m - 128 s) * sum(x)``, fp32
throughout, so the weights are never rounded (the products of small integers and bf16 x
are exact in the fp32 accumulator; the offset costs ~4 of its 24 bits).

The in-register dequantization (``scale_w``, below) wants the codes in float32: there each code
goes to the mantissa bit where float32 ``OFFSET + q`` counts ones (bit 16 of 128.0) and is
OR-ed into that pattern (``_decode_int4_f32``: a shift and a LOP3 a code), where widening the
bf16 pairs took a PRMT and two IMADs a pair more (sm_90 build: 452 -> 420 instructions a K step
of the 128x128 tile at 64 rows; on an H100, batch-64 int4 decode of the 8B shape 10,378 against
10,198 tok/s, benchmarks/results/2026-12-05-i14-decode32-8b-bs64-*-h100-2927d5f.json). bf16 x
only: fp16's pairs widen by HADD2, and its float32 decode (bit 13 of 1024.0) came out 8
instructions a step longer.

int8 codes are converted plainly (-128..127 are exact in bf16/fp16).

Split-K (``SPLIT_K > 1``): K is divided among that many programs per output tile, so that
layers with few rows (N = 4096) still put a program on every SM. Each writes its fp32
partial tile to a workspace, fences (every thread, GPU scope: ``hearth_kernels/split_fence.py``)
and bumps the tile's counter; the last to arrive sums the
partials in split order (the same bits on every run), writes y and resets the counter for
the next launch (no extra kernel, capturable in a CUDA graph).

Scales ahead (``MmaConfig.ahead``, grouped weights). The codes and x stream through
Triton's cp.async ring ``stages`` steps ahead, but a step's scales and mins (one 2-byte
value a row, too narrow for cp.async) are plain loads, issued in the step that uses them:
every step then waits a memory round trip before its decode. With ``ahead`` the loop
carries the next step's scales and mins in registers, loaded one step early (the last
step's load clamped to the row's last group), so that wait overlaps a whole step's work.

Configs are ``MmaConfig(block_n, block_k, warps, stages, split_k, scale_w, ahead)``;
``mma_configs`` lists those worth timing, ``default_mma_config`` picks one from the shape
without timing.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hearth_kernels._compat import interpreting
from hearth_kernels import quant_mma_gluon
from hearth_kernels.counters import counters
from hearth_kernels.split_fence import fence_gpu, launch_fence
from hearth_kernels.quant_gemv import PreparedQuant, _check_bias_out, _check_x

# Triton 3.6's interpreter multiplies bf16 tl.dot operands wrongly; under TRITON_INTERPRET=1
# bf16/fp16 dots run in fp32 (the GPU build never takes this branch).
_DOT_IN_FP32 = interpreting()

#: the most rows of x this kernel takes (its x tile is at most 64 wide: from 65 rows, two x tiles
#: per weight tile, in neighbouring programs)
MAX_ROWS = 128

_MAGIC = {torch.bfloat16: (0x43004300, 128), torch.float16: (0x64006400, 1024)}
#: the same offsets as float32 bit patterns (128.0, 1024.0), for ``_decode_int4_f32``
_MAGIC32 = {128: 0x43000000, 1024: 0x44800000}


class MmaConfig(NamedTuple):
    """``block_n`` weight rows per program (64/128 run wgmma, fewer mma.sync), ``block_k``
    inputs per K step (a divisor of the group), ``warps``, ``stages`` (K steps in flight),
    ``split_k`` programs per output tile along K; ``scale_w``: dequantize the weight tile in
    registers and accumulate in place (grouped weights; see the kernel); ``ahead``: load
    each K step's scales and mins one step ahead (grouped weights; "Scales ahead" in the
    kernel)."""

    block_n: int
    block_k: int
    warps: int
    stages: int
    split_k: int = 1
    scale_w: bool = False
    ahead: bool = False


@triton.jit
def _decode_int4(w, magic, dt: tl.constexpr, OFFSET: tl.constexpr):
    """int32 pair-order words [BN, W] -> the [BN, 8W] code tile in natural K order, each
    value ``OFFSET + q`` in ``dt`` (bf16/fp16 by bit pattern; fp32, for tests on CPU, plainly
    with OFFSET = 0)."""
    BN: tl.constexpr = w.shape[0]
    W: tl.constexpr = w.shape[1]
    if dt == tl.float32:
        sh = tl.arange(0, 8) * 4
        return tl.reshape(((w[:, :, None] >> sh[None, None, :]) & 15).to(tl.float32), [BN, 8 * W])
    else:
        v0 = (w & 0x000F000F) | magic  # inputs 0 (low half) and 4 (high half)
        v1 = ((w >> 4) & 0x000F000F) | magic  # 1 and 5
        v2 = ((w >> 8) & 0x000F000F) | magic  # 2 and 6
        v3 = ((w >> 12) & 0x000F000F) | magic  # 3 and 7
        # the low halves hold inputs 0-3, the high ones 4-7
        c = _natural_order(v0.to(tl.int16), v1.to(tl.int16), v2.to(tl.int16), v3.to(tl.int16),
                           (v0 >> 16).to(tl.int16), (v1 >> 16).to(tl.int16), (v2 >> 16).to(tl.int16),
                           (v3 >> 16).to(tl.int16))
        return c.to(dt, bitcast=True)


@triton.jit
def _natural_order(t00, t01, t02, t03, t10, t11, t12, t13):
    """Tiles [BN, W] where ``t{h}{s}`` holds input 4h + s of each word -> [BN, 8W] in natural K
    order (input 8w + 4h + s)."""
    BN: tl.constexpr = t00.shape[0]
    W: tl.constexpr = t00.shape[1]
    # join over h first (the outer new axis), then over s (join(join(a0, a2), join(a1, a3))[i, j]
    # is a_{2i + j})
    a0 = tl.join(t00, t10)
    a1 = tl.join(t01, t11)
    a2 = tl.join(t02, t12)
    a3 = tl.join(t03, t13)
    return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [BN, 8 * W])  # [BN, W, h, s] -> 8w + 4h + s


@triton.jit
def _decode_int4_f32(w, magic32, POS: tl.constexpr):
    """int32 pair-order words [BN, W] -> the [BN, 8W] code tile in natural K order as float32
    ``OFFSET + q`` (``magic32``: the float32 bit pattern of OFFSET, a power of 2 whose
    mantissa step is 1 at bit ``POS``; run time, as ``_decode_int4``'s magic). Each code is
    moved to bit POS and OR-ed into the pattern (a shift and a LOP3; input 4 needs no shift
    at POS 16), where the 16-bit decode then widened to float32 costs a PRMT and two IMADs
    per pair more: the in-register dequantization (``scale_w``) takes float32 codes."""
    MASK: tl.constexpr = 0xF << POS
    # input s (bits 4s..4s+3) and input 4 + s (bits 16+4s..) of each word, at bit POS
    t00 = ((w << POS) & MASK) | magic32
    t01 = ((w << (POS - 4)) & MASK) | magic32
    t02 = ((w << (POS - 8)) & MASK) | magic32
    t03 = ((w << (POS - 12)) & MASK) | magic32
    t10 = ((w >> (16 - POS)) & MASK) | magic32
    t11 = ((w >> (20 - POS)) & MASK) | magic32
    t12 = ((w >> (24 - POS)) & MASK) | magic32
    t13 = ((w >> (28 - POS)) & MASK) | magic32
    return _natural_order(t00, t01, t02, t03, t10, t11, t12, t13).to(tl.float32, bitcast=True)


#: int8 codes to exact bf16 / fp16 two at a time (the pair of neighbouring K columns a thread
#: holds of the wgmma's register operand): the bytes into the low bytes of the two halves (one
#: PRMT), then bf16 (7 mantissa bits): (128 + the low 7 bits) - (128, or 256 for a negative
#: code: its sign bit lands on the exponent's lowest bit), two LOP3s and an FMA.x2 by 1;
#: fp16 (10): 1024 + (q + 128) by one LOP3 (flip the sign bit, OR the exponent), minus 1152.
#: The offsets come off by ``fma.rn`` with 1 (exact), which sm_80 has for bf16x2 where
#: ``sub`` needs sm_90. Triton's own conversion took 4.5 PRMTs, 2 LOP3s and a HADD2 a pair
#: (sm_90 build).
_INT8_ASM = tl.constexpr((
    "{ .reg .b32 t, u, c, one; cvt.u32.u16 u, $1; prmt.b32 t, u, 0, 0x4140; "
    "lop3.b32 u, t, 0x007F007F, 0x43004300, 0xEA; lop3.b32 c, t, 0x00800080, 0xC300C300, 0xEA; "
    "mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, u, one, c; }",
    "{ .reg .b32 t, u, c, one; cvt.u32.u16 u, $1; prmt.b32 t, u, 0, 0x4140; "
    "lop3.b32 u, t, 0x00800080, 0x64006400, 0xBE; mov.b32 c, 0xE480E480; mov.b32 one, 0x3C003C00; "
    "fma.rn.f16x2 $0, u, one, c; }"))

@triton.jit
def _int8_codes(c, FP16: tl.constexpr):
    """int8 codes [.., 2W] -> the same values in fp16 (FP16) or bf16, exactly (``_INT8_ASM``)."""
    if FP16:
        asm16: tl.constexpr = _INT8_ASM[1]
        v = tl.inline_asm_elementwise(asm=asm16, constraints="=r,h", args=[c], dtype=tl.float16, is_pure=True,
                                      pack=2)
    else:
        asm: tl.constexpr = _INT8_ASM[0]
        v = tl.inline_asm_elementwise(asm=asm, constraints="=r,h", args=[c], dtype=tl.bfloat16, is_pure=True,
                                      pack=2)
    return v


@triton.jit
def _x_values(ptrs, mask, K, SWIGLU: tl.constexpr):
    """x at ``ptrs`` in x's dtype; with SWIGLU, silu(gate) * up for gate at ``ptrs`` and up
    K further, rounded like the eager ops."""
    if SWIGLU:
        dt = ptrs.dtype.element_ty
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        return (act * u).to(dt)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _x_tile_t(x_ptr, rm, m_ok, k, K, stride_xm, SWIGLU: tl.constexpr, ONE_ROW: tl.constexpr):
    """x^T at inputs ``k`` [BK] for rows ``rm`` [BM]: [BK, BM] in x's dtype. ONE_ROW (batch-1
    decode with SWIGLU) activates a [BK] vector and places it in column 0: the 15 padded
    columns would otherwise cost a SiLU each. (Without SWIGLU the plain tile load is better:
    it goes to shared memory by cp.async, in flight with the weights.)"""
    if ONE_ROW:
        xv = _x_values(x_ptr + k, k < K, K, SWIGLU)
        return tl.where((rm == 0)[None, :], xv[:, None], tl.zeros_like(xv)[:, None])
    else:
        return _x_values(x_ptr + rm[None, :] * stride_xm + k[:, None], m_ok[None, :], K, SWIGLU)


@triton.jit
def _column_sums(xt, DOT_FP32: tl.constexpr):
    """sum(xt, axis=0) in fp32, on the tensor cores: a [16, BK] tile of ones times xt has
    every row equal to the column sums (exact in the fp32 accumulator, like the main dot).
    A plain tl.sum over the K axis reduces across threads with shuffles every K step."""
    BK: tl.constexpr = xt.shape[0]
    if DOT_FP32:
        sums = tl.dot(tl.full([16, BK], 1.0, tl.float32), xt.to(tl.float32), input_precision="ieee")
    else:
        sums = tl.dot(tl.full([16, BK], 1.0, xt.dtype), xt)
    return tl.max(sums, axis=0)  # the 16 rows are equal


@triton.jit
def _tile_rows(M, N, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's output tile (axis 0) -> (tile, weight rows, x rows, their masks); the
    rows clamped into range, so the weight loads need no mask. With more than one x tile (65+
    rows) the programs of one weight tile are neighbours, so that the second reads the weight
    from L2 while the first has just brought it (x is small and stays in L2 anyway)."""
    tile = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    rn = (tile // num_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (tile % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    return tile, tl.where(n_ok, rn, 0).to(tl.int64), tl.where(m_ok, rm, 0).to(tl.int64), n_ok, m_ok


@triton.jit
def _write_tile(acc, tile, rn_safe, rm_safe, n_ok, m_ok, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                FENCE: tl.constexpr):
    """y^T tile ``acc`` [BLOCK_N, BLOCK_M] (fp32) -> y, with the bias; split K: through the
    workspace and the tile's counter (module docstring)."""
    if SPLIT_K > 1:
        # partial tile -> workspace [tiles, SPLIT_K, BLOCK_N, BLOCK_M]; the last program of
        # the tile to arrive sums them in split order
        inner = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        ws_tile = ws_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_N * BLOCK_M)
        tl.store(ws_tile + tl.program_id(1) * (BLOCK_N * BLOCK_M) + inner, acc, cache_modifier=".cg")
        fence_gpu(FENCE & 1)  # every thread's partial performed at GPU scope (hearth_kernels/split_fence.py)
        tl.debug_barrier()  # ... before the tile's count goes up
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            fence_gpu(FENCE & 2)
            acc = tl.load(ws_tile + inner, cache_modifier=".cg")
            for j in tl.static_range(1, SPLIT_K):
                acc += tl.load(ws_tile + j * (BLOCK_N * BLOCK_M) + inner, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn_safe).to(tl.float32)[:, None]
            tl.store(y_ptr + rm_safe[None, :] * stride_ym + rn_safe[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & m_ok[None, :])
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_safe).to(tl.float32)[:, None]
        tl.store(y_ptr + rm_safe[None, :] * stride_ym + rn_safe[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _quant_mma_kernel(x_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, K_STEPS,
                      stride_xm, stride_qn, stride_sn, stride_ym, magic,
                      GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SWIGLU: tl.constexpr, OFFSET: tl.constexpr, DOT_FP32: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      PER_ROW: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
                      ONE_ROW: tl.constexpr, SCALE_W: tl.constexpr, AHEAD: tl.constexpr,
                      DECODE32: tl.constexpr, FENCE: tl.constexpr = 0):
    # q_ptr: int4 codes as int32 words (stride_qn in words), int8 codes as int8. magic: int4's
    # bit pattern (_MAGIC; with SCALE_W and DECODE32, the float32 one, _MAGIC32).
    tile, rn_safe, rm_safe, n_ok, m_ok = _tile_rows(M, N, BLOCK_N, BLOCK_M)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    xsum_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    step0 = tl.program_id(1) * K_STEPS
    s_rows = s_ptr + rn_safe * stride_sn
    m_rows = m_ptr + rn_safe * stride_sn
    if AHEAD:  # the first step's scales and mins, before the loop (see "Scales ahead" below)
        g_last = (K - 1) // GROUP
        s_next = tl.load(s_rows + (step0 * BLOCK_K) // GROUP)
        if HAS_MIN:
            m_next = tl.load(m_rows + (step0 * BLOCK_K) // GROUP)
        else:
            m_next = s_next
    for i in tl.range(0, K_STEPS, num_stages=STAGES):
        k0 = (step0 + i) * BLOCK_K  # a multiple of BLOCK_K: the compiler knows the alignment
        if not PER_ROW:
            if AHEAD:
                s_raw = s_next
                m_raw = m_next
                g_next = tl.minimum((k0 + BLOCK_K) // GROUP, g_last)
                s_next = tl.load(s_rows + g_next)
                if HAS_MIN:
                    m_next = tl.load(m_rows + g_next)
                else:
                    m_next = s_next
            else:
                s_raw = tl.load(s_rows + k0 // GROUP)
                if HAS_MIN:
                    m_raw = tl.load(m_rows + k0 // GROUP)
                else:
                    m_raw = s_raw
        if BITS == 4:
            WORDS: tl.constexpr = BLOCK_K // 8
            w = tl.load(q_ptr + rn_safe[:, None] * stride_qn + (k0 // 8 + tl.arange(0, WORDS))[None, :])
            if DECODE32:  # float32 codes for the in-register dequantization (bf16 x)
                tl.static_assert(SCALE_W and OFFSET == 128)
                c = _decode_int4_f32(w, magic, 16)
            else:
                c = _decode_int4(w, magic, tl.float32 if DOT_FP32 else dt, OFFSET)
        else:
            c = tl.load(q_ptr + rn_safe[:, None] * stride_qn + (k0 + kk)[None, :])
            c = c.to(tl.float32) if DOT_FP32 else _int8_codes(c, dt == tl.float16)
        xt = _x_tile_t(x_ptr, rm_safe, m_ok, k0 + kk, K, stride_xm, SWIGLU, ONE_ROW)  # [BLOCK_K, BLOCK_M]
        if SCALE_W:
            # the weight tile dequantized in registers (exact q*s + m in fp32, one rounding to
            # x's dtype, like the dequantize + cuBLAS path) and accumulated in place: no
            # per-step epilogue, so the tensor cores run asynchronously across steps
            s = s_raw.to(tl.float32)
            if HAS_MIN:
                off = m_raw.to(tl.float32) - OFFSET * s
            else:
                off = -OFFSET * s
            wt = c.to(tl.float32) * s[:, None] + off[:, None]
            if DOT_FP32:
                if dt != tl.float32:  # the interpreter: round the weights as the GPU build does
                    wt = wt.to(dt).to(tl.float32)
                acc = tl.dot(wt, xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(wt.to(dt), xt, acc)
        else:
            if DOT_FP32:
                part = tl.dot(c, xt.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(c, xt)  # [BLOCK_N, BLOCK_M], fp32
            if HAS_MIN or OFFSET != 0:
                xsum = _column_sums(xt, DOT_FP32)
            if PER_ROW:
                acc += part
                if HAS_MIN or OFFSET != 0:
                    xsum_all += xsum
            else:
                s = s_raw.to(tl.float32)  # BLOCK_K divides GROUP: one group per step
                if HAS_MIN or OFFSET != 0:
                    if HAS_MIN:
                        off = m_raw.to(tl.float32) - OFFSET * s
                    else:
                        off = -OFFSET * s
                    acc += part * s[:, None] + off[:, None] * xsum[None, :]
                else:
                    acc += part * s[:, None]
    if PER_ROW:
        s = tl.load(s_ptr + rn_safe * stride_sn).to(tl.float32)
        acc = acc * s[:, None]
        if HAS_MIN or OFFSET != 0:
            if HAS_MIN:
                off = tl.load(m_ptr + rn_safe * stride_sn).to(tl.float32) - OFFSET * s
            else:
                off = -OFFSET * s
            acc += off[:, None] * xsum_all[None, :]
    _write_tile(acc, tile, rn_safe, rm_safe, n_ok, m_ok, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, FENCE)


def _step(group: int, want: int) -> int:
    step = want
    while step > 16 and group % step:
        step //= 2
    return step


def block_m_for(rows: int) -> int:
    """The x tile width for ``rows`` rows: 16, 32 or 64 (the dot's narrow side)."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


#: how many of ``mma_configs``' first configs it lists again with the other ``ahead``
AHEAD_CONFIGS = 8

#: programs below which a launch splits K (about one per SM of an H100/H200)
_MIN_PROGRAMS = 128


def default_mma_config(rows: int, n: int, k: int, bits: int, group: int) -> MmaConfig:
    """A config from the shape alone, from the H200 profile of the 8B projections
    (benchmarks/results/2026-12-01-i14-profile-quant-mma-8b-h200-v{2,3}.json): 64-row weight tiles
    on 4 warps (128 on 8 warps for wide layers at 33+ rows, but see below), K steps of 128 inside a group,
    3 in flight, grouped weights dequantized in registers (``scale_w``), and K split until
    there are about 512 programs (384 and at most 4 ways from 33 rows on): qkv, o and down
    (N = 4096-6144) ran 1.5-2.5x faster split 4 ways than not at all. Grouped scales a
    step ahead (``ahead``; ``ahead_default``), except on 128-row weight tiles from 65 rows.

    From 33 rows, a down-shaped layer (64-row tiles, K at least 3N) of weights in groups of a
    multiple of 128 takes K steps of 64, 4 in flight: on an H100 the 8B down (with its SwiGLU)
    at 64 rows ran 40.1 and 40.4 us against 44.5 and 45.2 with steps of 128 (two profiles,
    benchmarks/results/2026-12-05-i14-profile-quant-mma-int4-decode32-*-bk64-8b-h100-2927d5f.json),
    where q/k/v, o and gate_up ran 3-13% slower with 64 and stay at 128.

    A wide layer (gate_up, a head) of weights in groups of a multiple of 128 keeps 64-row tiles
    on 4 warps from 33 rows too, 4 steps in flight, scales ahead: the 8B gate_up at 64 rows on
    the H200 64.7 us against 75.9 on the 128-row tile with scales ahead (66.1 without; it ran
    66.0 there before the float32 decode of 2026-12-05), on an H100 66.6 against 62.5; at 96 /
    128 rows (H100) 122.1 / 122.5 against 122.7 / 122.3 on the 128-row tile without scales ahead
    (benchmarks/results/2026-12-05-i14-profile-quant-mma-int4-8b-h200-07fdb63.json,
    ...-int4-8b-h100-e376f8b.json, ...-int4-rows128-8b-h100-175d951.json). Per-channel weights
    (the int8 head) keep the 128-row tile on 8 warps (as grouped ones do with
    ``HEARTH_QUANT_MMA_WIDE128=1``, ``wide128``: not yet timed end to end on the H200)."""
    block_n, warps = (128, 8) if rows > 32 and n >= 16384 else (64, 4)
    block_k, stages = _step(group, 128), 3
    if rows > 32 and group < k and block_k == 128:
        if block_n == 128 and not wide128():
            block_n, warps, stages = 64, 4, 4
        elif block_n == 64 and k >= 3 * n:
            block_k, stages = 64, 4
    split = _default_split(rows, n, k, block_n, block_k)
    # two x tiles (65+ rows) on 128-row weight tiles (grouped weights whose steps aren't 128, or
    # with HEARTH_QUANT_MMA_WIDE128=1): scales loaded in their step, as gate_up ran faster so on
    # an H100 (122.7 / 122.3 us at 96 / 128 rows against 144.7 / 149.0)
    ahead = group < k and ahead_default() and not (rows > 64 and block_n == 128)
    return MmaConfig(block_n, block_k, warps, stages, split, group < k, ahead)


def _default_split(rows: int, n: int, k: int, block_n: int, block_k: int) -> int:
    """``default_mma_config``'s K split: doubled while the programs stay under about 512
    (384, and at most 4 ways, from 33 rows) and it divides the K steps."""
    tiles = -(-n // block_n) * -(-rows // block_m_for(rows))
    want, most = (384, 4) if rows > 32 else (512, 8)
    steps = -(-k // block_k)
    split = 1
    while tiles * split * 2 <= want and split < most and steps % (2 * split) == 0:
        split *= 2
    return split


def wide128() -> bool:
    """``HEARTH_QUANT_MMA_WIDE128=1``: wide grouped layers keep the 128-row weight tile on 8 warps
    from 33 rows (``default_mma_config`` before 2026-12-05's change), for the end-to-end A/B on
    the H200 that the change still lacks; remove once it has run."""
    return os.environ.get("HEARTH_QUANT_MMA_WIDE128", "0") == "1"


def ahead_default() -> bool:
    """Whether ``default_mma_config`` loads grouped scales a step ahead: yes, unless
    ``HEARTH_QUANT_MMA_AHEAD=0``. On the H200 at 64 rows every 8B projection ran 4-8%
    faster with it at the default tiles (gate_up 66.0 against 69.1 us, down 45.4 against
    49.3), at 16 rows from 2% slower (qkv) to 5% faster (down), and batch-64 int4 decode
    10,551 and 10,568 tok/s against 9,998 (benchmarks/results/2026-12-05-i14-*-h200-ad38898.json).
    Batched steps only: batch 1's weight-stationary GEMV configs (``quant_gemv_configs``) run
    without it."""
    return os.environ.get("HEARTH_QUANT_MMA_AHEAD", "1") != "0"


def mma_configs(rows: int, n: int, k: int, bits: int, group: int) -> list[MmaConfig]:
    """Configs worth timing for this shape, ``default_mma_config`` first; the in-register
    dequantizing ones (``scale_w``) first among the rest (grouped weights only); last, for
    grouped weights, the first few again with the other ``ahead`` (scales a step ahead or not)."""
    out = [default_mma_config(rows, n, k, bits, group)]
    bk = _step(group, 128)
    scaled = group < k
    if out[0].block_k != bk:  # the default's steps of 64 (a down-shaped layer): also the one with 128
        out.append(out[0]._replace(block_k=bk, stages=3,
                                   split_k=_default_split(rows, n, k, out[0].block_n, bk)))
    for cand in (MmaConfig(64, bk, 4, 4, 4, scaled), MmaConfig(64, bk, 4, 4, 8, scaled),
                 MmaConfig(64, bk, 4, 6, 4, scaled), MmaConfig(64, _step(group, 256), 4, 3, 4, scaled),
                 MmaConfig(128, bk, 8, 4, 1, scaled), MmaConfig(64, bk, 4, 4, 2, scaled), MmaConfig(64, bk, 4, 4, 1, scaled),
                 # wide grouped layers' default before 2026-12-05 (wide128), both ways (past AHEAD_CONFIGS)
                 MmaConfig(128, bk, 8, 3, 1, scaled), MmaConfig(128, bk, 8, 3, 1, scaled, scaled),
                 MmaConfig(64, bk, 4, 4, 1), MmaConfig(64, bk, 4, 4, 2), MmaConfig(64, bk, 4, 4, 4),
                 MmaConfig(128, bk, 8, 4, 1), MmaConfig(128, bk, 8, 4, 2), MmaConfig(128, bk, 4, 3, 1),
                 MmaConfig(32, bk, 2, 4, 1), MmaConfig(64, _step(group, 256), 4, 3, 1),
                 MmaConfig(64, _step(group, 64), 4, 6, 2)):
        if block_m_for(rows) == 64 and (cand.block_n, cand.warps) not in ((64, 4), (128, 8)):
            continue  # 64 columns: other tiles spill in the sm_90 build (128 rows on 4 warps, 32 on 2)
        if -(-k // cand.block_k) % cand.split_k == 0 and cand not in out:
            out.append(cand)
    if group < k:  # last: what the batch-1 tuner takes from the front stays as it was
        out += [t for c in out[:AHEAD_CONFIGS] if (t := c._replace(ahead=not c.ahead)) not in out]
    return out


def quant_mma(x: torch.Tensor, prepared: PreparedQuant, *, config: tuple | None = None, swiglu: bool = False,
              bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [M, K] (M <= ``MAX_ROWS``; [M, 2K] ``[gate | up]`` with ``swiglu``)
    in bf16/fp16 (fp32 for tests), W the ``prepared`` weight; [M, N] in x's dtype, into
    ``out`` when given. A call without a ``config`` or SwiGLU that
    ``hearth_kernels/quant_mma_gluon.fits`` (an sm_90 GPU, bf16 x of up to 64 rows, int4 in groups
    of a multiple of 128, a layer that needs no K split or a down-shaped one, split) runs the Gluon
    kernel there (the same values without a split; with one, its own split's sum order;
    ``HEARTH_QUANT_MMA_GLUON=0`` keeps this one). No host sync; capturable in a CUDA graph once a split-K config has
    run for this size outside capture (its counters are made then)."""
    n, k = prepared.out_features, prepared.in_features
    _check_x("quant_mma", x, k, swiglu)
    rows = x.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"quant_mma: x must have 1 to {MAX_ROWS} rows, got {rows}; use quant_gemm for more")
    out = _check_bias_out("quant_mma", x, rows, n, bias, out)
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None and not swiglu and quant_mma_gluon.fits(x, prepared, bias):
        return quant_mma_gluon.quant_gluon(x, prepared, out, bias)  # Hopper, bf16 x, int4 in 128s
    bits, group = prepared.bits, prepared.group_size
    cfg = MmaConfig(*config) if config is not None else default_mma_config(rows, n, k, bits, group)
    block_m = block_m_for(rows)
    block_k = _step(group, cfg.block_k) if group < k or bits == 4 else cfg.block_k
    if k % block_k:
        if bits == 4 or group < k:
            raise ValueError(f"quant_mma: K step {block_k} does not divide the {k} inputs")
        block_k = 32 if k % 32 == 0 else 16
        if k % block_k:
            raise ValueError(f"quant_mma: the tensor-core kernel needs K a multiple of 16, got {k}")
    steps = k // block_k
    magic, offset = _MAGIC.get(x.dtype, (0, 0)) if bits == 4 else (0, 0)
    dot_fp32 = _DOT_IN_FP32 and x.dtype != torch.float32 or x.dtype == torch.float32
    scale_w = bool(cfg.scale_w) and group < k
    # bf16 x only (fp16's pairs widen by HADD2: the float32 decode was 8 instructions a step more);
    # the interpreter takes it too, so that the CPU tests run it
    decode32 = bits == 4 and scale_w and x.dtype == torch.bfloat16
    if decode32:
        magic = _MAGIC32[offset]
    elif _DOT_IN_FP32 and x.dtype != torch.float32:
        offset = 0  # the interpreter's int4 decode is plain (_decode_int4's fp32 branch)
    q, s, m = prepared.qweight, prepared.scales, prepared.mins
    if bits == 4:
        q = q.view(torch.int32)
    tiles, split, ws, cnt = _split(cfg.block_n, cfg.split_k, steps, n, rows, block_m, s)
    _quant_mma_kernel[(tiles, split)](
        x, q, s, m if m is not None else s, bias if bias is not None else s, out, ws, cnt, rows, n, k,
        steps // split, x.stride(0), q.stride(0), s.stride(0), out.stride(0), magic,
        GROUP=group, BITS=bits, HAS_MIN=m is not None, HAS_BIAS=bias is not None, SWIGLU=swiglu, OFFSET=offset,
        DOT_FP32=dot_fp32,
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, BLOCK_M=block_m, PER_ROW=group == k, SPLIT_K=split,
        STAGES=cfg.stages, ONE_ROW=rows == 1 and swiglu, SCALE_W=scale_w,
        AHEAD=bool(cfg.ahead) and group < k, DECODE32=decode32, FENCE=launch_fence(split),
        num_warps=cfg.warps)
    return out


def _split(block_n: int, split_k: int, steps: int, n: int, rows: int, block_m: int, dummy: torch.Tensor):
    """(output tiles, K split (``split_k``, or the largest divisor of ``steps`` below it),
    the split-K workspace, the tile counters); without a split both are ``dummy``."""
    split = max(1, min(split_k, steps))
    while steps % split:
        split -= 1
    tiles = triton.cdiv(n, block_n) * triton.cdiv(rows, block_m)
    if split == 1:
        return tiles, 1, dummy, dummy
    ws = torch.empty(tiles * split * block_n * block_m, dtype=torch.float32, device=dummy.device)
    return tiles, split, ws, counters(dummy.device, tiles)
