"""The permuted-x int4 kernel that ``hearth_kernels/quant_mma.py`` had from 2026-12-04 until ad38898 took it
out (timed 2.8-4x slower than the natural-order kernel on the H200), restored verbatim from ad38898^ for
Nsight Compute only (``benchmarks/ncu_quant_mma.py --xp``): its build has no trip through shared memory and
fewer instructions a step, so why it ran slower says what a conversion-free kernel must avoid. Not used by
the engine. The module docstring of that day follows.

Weight-stationary tensor-core int4/int8 matmul for few rows (batch-1 and batched decode,
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

int8 codes are converted plainly (-128..127 are exact in bf16/fp16).

Split-K (``SPLIT_K > 1``): K is divided among that many programs per output tile, so that
layers with few rows (N = 4096) still put a program on every SM. Each writes its fp32
partial tile to a workspace and bumps the tile's counter; the last to arrive sums the
partials in split order (the same bits on every run), writes y and resets the counter for
the next launch (no extra kernel, capturable in a CUDA graph).

Configs are ``MmaConfig(block_n, block_k, warps, stages, split_k)``; ``mma_configs`` lists
those worth timing, ``default_mma_config`` picks one from the shape without timing.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hearth_kernels.quant_gemv import PreparedQuant, _check_bias_out, _check_x

# Triton 3.6's interpreter multiplies bf16 tl.dot operands wrongly; under TRITON_INTERPRET=1
# bf16/fp16 dots run in fp32 (the GPU build never takes this branch).
_DOT_IN_FP32 = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")

#: the most rows of x this kernel takes (its x tile is at most 64 wide)
MAX_ROWS = 64

_MAGIC = {torch.bfloat16: (0x43004300, 128), torch.float16: (0x64006400, 1024)}


class MmaConfig(NamedTuple):
    """``block_n`` weight rows per program (64/128 run wgmma, fewer mma.sync), ``block_k``
    inputs per K step (a divisor of the group), ``warps``, ``stages`` (K steps in flight),
    ``split_k`` programs per output tile along K; ``scale_w``: dequantize the weight tile in
    registers and accumulate in place (grouped weights; see the kernel); ``xp``: the
    permuted-x kernel (int4 in groups of a multiple of 128; ``block_k`` is then 128; see
    "The permuted-x kernel" below)."""

    block_n: int
    block_k: int
    warps: int
    stages: int
    split_k: int = 1
    scale_w: bool = False
    xp: bool = False


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
        # t[h][s] is input 4h + s: join over h first (the outer new axis), then over s
        # (join(join(a0, a2), join(a1, a3))[i, j] is a_{2i + j})
        a0 = tl.join(v0.to(tl.int16), (v0 >> 16).to(tl.int16))
        a1 = tl.join(v1.to(tl.int16), (v1 >> 16).to(tl.int16))
        a2 = tl.join(v2.to(tl.int16), (v2 >> 16).to(tl.int16))
        a3 = tl.join(v3.to(tl.int16), (v3 >> 16).to(tl.int16))
        c = tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [BN, 8 * W])  # [BN, W, h, s] -> 8w + 4h + s
        return c.to(dt, bitcast=True)


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
    """This program's output tile (axis 0; neighbouring programs share the x tile) ->
    (tile, weight rows, x rows, their masks); the rows clamped into range, so the weight
    loads need no mask."""
    tile = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    rn = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    return tile, tl.where(n_ok, rn, 0).to(tl.int64), tl.where(m_ok, rm, 0).to(tl.int64), n_ok, m_ok


@triton.jit
def _write_tile(acc, tile, rn_safe, rm_safe, n_ok, m_ok, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """y^T tile ``acc`` [BLOCK_N, BLOCK_M] (fp32) -> y, with the bias; split K: through the
    workspace and the tile's counter (module docstring)."""
    if SPLIT_K > 1:
        # partial tile -> workspace [tiles, SPLIT_K, BLOCK_N, BLOCK_M]; the last program of
        # the tile to arrive sums them in split order
        inner = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        ws_tile = ws_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_N * BLOCK_M)
        tl.store(ws_tile + tl.program_id(1) * (BLOCK_N * BLOCK_M) + inner, acc, cache_modifier=".cg")
        tl.debug_barrier()  # every thread's partial is written before the tile's count goes up
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
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
                      ONE_ROW: tl.constexpr, SCALE_W: tl.constexpr):
    # q_ptr: int4 codes as int32 words (stride_qn in words), int8 codes as int8.
    tile, rn_safe, rm_safe, n_ok, m_ok = _tile_rows(M, N, BLOCK_N, BLOCK_M)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    xsum_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    step0 = tl.program_id(1) * K_STEPS
    for i in tl.range(0, K_STEPS, num_stages=STAGES):
        k0 = (step0 + i) * BLOCK_K  # a multiple of BLOCK_K: the compiler knows the alignment
        if BITS == 4:
            WORDS: tl.constexpr = BLOCK_K // 8
            w = tl.load(q_ptr + rn_safe[:, None] * stride_qn + (k0 // 8 + tl.arange(0, WORDS))[None, :])
            c = _decode_int4(w, magic, tl.float32 if DOT_FP32 else dt, OFFSET)
        else:
            c = tl.load(q_ptr + rn_safe[:, None] * stride_qn + (k0 + kk)[None, :])
            c = c.to(tl.float32) if DOT_FP32 else _int8_codes(c, dt == tl.float16)
        xt = _x_tile_t(x_ptr, rm_safe, m_ok, k0 + kk, K, stride_xm, SWIGLU, ONE_ROW)  # [BLOCK_K, BLOCK_M]
        if SCALE_W:
            # the weight tile dequantized in registers (exact q*s + m in fp32, one rounding to
            # x's dtype, like the dequantize + cuBLAS path) and accumulated in place: no
            # per-step epilogue, so the tensor cores run asynchronously across steps
            g = k0 // GROUP
            s = tl.load(s_ptr + rn_safe * stride_sn + g).to(tl.float32)
            if HAS_MIN:
                off = tl.load(m_ptr + rn_safe * stride_sn + g).to(tl.float32) - OFFSET * s
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
                g = k0 // GROUP  # BLOCK_K divides GROUP: one group per step
                s = tl.load(s_ptr + rn_safe * stride_sn + g).to(tl.float32)
                if HAS_MIN or OFFSET != 0:
                    if HAS_MIN:
                        off = tl.load(m_ptr + rn_safe * stride_sn + g).to(tl.float32) - OFFSET * s
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
                HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M)


# The permuted-x kernel (``MmaConfig.xp``; int4, groups a multiple of 128).
#
# The kernel above decodes the weight tile in natural K order: the half-words of its magic
# decode are rearranged by ``tl.join``/``tl.reshape``, which the sm_90 build can only turn
# into the wgmma's register layout through shared memory (a store, barriers and ldmatrix
# every K step, with the wgmma waited on in between). Here the K order is the decode's own
# instead: ``((w >> 4s) & 0x000F000F) | magic`` holds inputs 8j + s and 8j + s + 4 of word j
# as one bf16/fp16 pair, and a pair of neighbouring K columns is exactly what a thread holds
# of the wgmma's register operand. So chunk s (s = 0..3) of a 128-input step is the [BN, 32]
# tile whose column 2j + e is input 8j + s + 4e, decoded, offset and scaled pairwise
# (``_pairs``: one inline-asm LOP3 and two FMA.x2 per pair, no conversions) straight into
# registers. The four chunks are set side by side (``_cat``, register renaming in the sm_90
# build) into one [BN, 128] operand, so each step is one dot whose wgmmas stay in flight
# while the next step decodes (four dots a step were each waited on). x is permuted to
# match once per call (``permute_x``, with the SwiGLU when there is one): row m of ``xp``
# holds, at k0 + 32s + 2j + e, x[m, k0 + 8j + s + 4e], so each step's x tile is contiguous
# and streams through the cp.async ring like the codes.
#
# Numerics: the weight is ``q * s + m`` rounded once to x's dtype, as in ``scale_w``, but
# computed in the pair arithmetic of x's dtype, so for bf16 x the fp16 scale and min are
# rounded to bf16 first (an error of at most 2**-9 (q s + |m|) per weight, a few percent
# of a quantization step; fp16 x keeps them exact).

def _pair_asm_text(shift: int, magic: str, minus: str, one: str, ty: str) -> str:
    """Decode the pair of nibbles (shift, shift + 4) of each word into the 16-bit float pair
    ``magic + q`` (one LOP3), take the magic offset out exactly (``fma.rn`` by 1 plus
    ``minus``: sm_80 has it for bf16x2, ``sub`` needs sm_90), then ``fma.rn`` with the scale
    and min pairs: ``q * s + m`` rounded once."""
    decode = (f"shr.u32 t, $1, {4 * shift}; lop3.b32 t, t, 0x000F000F, {magic}, 0xEA; " if shift else
              f"lop3.b32 t, $1, 0x000F000F, {magic}, 0xEA; ")
    return ("{ .reg .b32 t, c, one; " + decode + f"mov.b32 c, {minus}; mov.b32 one, {one}; "
            f"fma.rn.{ty} t, t, one, c; fma.rn.{ty} $0, t, $3, $4; }}")


#: ``_pairs``' inline assembly: bf16 for shifts 0-3, then fp16 (magic 128 and 1024: the
#: exponents whose mantissa step is 1)
_PAIR_ASM = tl.constexpr(tuple(_pair_asm_text(sh, magic, minus, one, ty)
                               for magic, minus, one, ty in (("0x43004300", "0xC300C300", "0x3F803F80", "bf16x2"),
                                                             ("0x64006400", "0xE400E400", "0x3C003C00", "f16x2"))
                               for sh in range(4)))


@triton.jit
def _pair_asm(wd, s2, m2, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm=asm, constraints="=r,r,r,r,r", args=[wd, s2, m2], dtype=s2.dtype,
                                     is_pure=True, pack=2)


@triton.jit
def _pairs(wd, s2, m2, SHIFT: tl.constexpr, DOT_FP32: tl.constexpr):
    """Chunk SHIFT of a step: ``wd`` int32 [BN, 2W] pair-order words, each twice (column
    2j + e holds word j), ``s2``/``m2`` the rows' scale and min [BN, 2W] in x's dtype ->
    column 2j + e is ``q * s + m`` of input 8j + SHIFT + 4e, rounded once to x's dtype (fp32
    under the interpreter, which runs no assembly: the same values, computed plainly)."""
    if DOT_FP32:
        e = tl.arange(0, wd.shape[1]) % 2
        q = ((wd >> (4 * SHIFT + 16 * e)[None, :]) & 15).to(tl.float32)
        a = (q * s2.to(tl.float32) + m2.to(tl.float32)).to(s2.dtype).to(tl.float32)
    elif s2.dtype == tl.float16:
        asm16: tl.constexpr = _PAIR_ASM[SHIFT + 4]
        a = _pair_asm(wd, s2, m2, asm16)
    else:
        asm: tl.constexpr = _PAIR_ASM[SHIFT]
        a = _pair_asm(wd, s2, m2, asm)
    return a


@triton.jit
def _cat(a, b):
    """[R, C] and [R, C] -> [R, 2C] side by side (in registers: the sm_90 build keeps each
    thread's values where they are, so the four chunks feed one dot without a layout trip
    through shared memory)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [a.shape[0], 2 * a.shape[1]])


#: inputs per step of the permuted-x kernel (16 words, four chunks of 32)
XP_STEP = 128


@triton.jit
def _permute_x_kernel(x_ptr, xp_ptr, K, stride_xm, stride_pm, SWIGLU: tl.constexpr):
    """xp[m, k0 + 32s + 2j + e] = x[m, k0 + 8j + s + 4e] for one row and one step (with
    SWIGLU, x is ``[gate | up]`` and this writes silu(gate) * up, rounded as eagerly)."""
    row = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * 128
    p = tl.arange(0, 128)
    src = k0 + 8 * ((p % 32) // 2) + p // 32 + 4 * (p % 2)
    v = _x_values(x_ptr + row * stride_xm + src, src < K, K, SWIGLU)
    tl.store(xp_ptr + row * stride_pm + k0 + p, v)


def permute_x(x: torch.Tensor, k: int, swiglu: bool = False) -> torch.Tensor:
    """x [M, K] (``[M, 2K]`` ``[gate | up]`` with ``swiglu``) in the permuted-x kernel's K
    order, [M, K] (K a multiple of 128)."""
    rows = x.shape[0]
    xp = torch.empty(rows, k, dtype=x.dtype, device=x.device)
    _permute_x_kernel[(rows, k // XP_STEP)](x, xp, k, x.stride(0), xp.stride(0), SWIGLU=swiglu)
    return xp


@triton.jit
def _quant_mma_xp_kernel(xp_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K_STEPS,
                         stride_xm, stride_qn, stride_sn, stride_ym,
                         GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
                         STAGES: tl.constexpr):
    # q_ptr: int4 pair-order codes as int32 words (stride_qn in words); xp from permute_x
    tile, rn_safe, rm_safe, n_ok, m_ok = _tile_rows(M, N, BLOCK_N, BLOCK_M)
    dt = xp_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    c32 = tl.arange(0, 32)
    kk = tl.arange(0, 128)
    step0 = tl.program_id(1) * K_STEPS
    for i in tl.range(0, K_STEPS, num_stages=STAGES):
        k0 = (step0 + i) * 128
        wd = tl.load(q_ptr + rn_safe[:, None] * stride_qn + (k0 // 8 + c32 // 2)[None, :])  # each word twice
        g = k0 // GROUP
        s2 = tl.broadcast_to(tl.load(s_ptr + rn_safe * stride_sn + g).to(dt)[:, None], [BLOCK_N, 32])
        m2 = tl.broadcast_to(tl.load(m_ptr + rn_safe * stride_sn + g).to(dt)[:, None], [BLOCK_N, 32])
        a = _cat(_cat(_pairs(wd, s2, m2, 0, DOT_FP32), _pairs(wd, s2, m2, 1, DOT_FP32)),
                 _cat(_pairs(wd, s2, m2, 2, DOT_FP32), _pairs(wd, s2, m2, 3, DOT_FP32)))  # column 32s + 2j + e
        xt = tl.load(xp_ptr + rm_safe[None, :] * stride_xm + (k0 + kk)[:, None], mask=m_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, xt, acc)  # one dot a step: its wgmmas stay in flight across steps
    _write_tile(acc, tile, rn_safe, rm_safe, n_ok, m_ok, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M)


def xp_fits(k: int, bits: int, group: int) -> bool:
    """Whether the permuted-x kernel takes this weight: int4, whole steps of 128 inputs in
    one group each."""
    return bits == 4 and k % XP_STEP == 0 and group % XP_STEP == 0


#: device -> zeroed int32 tile counters of the split-K fixup (each launch leaves them zero
#: again). One fixed-size tensor per device, never replaced: CUDA graphs keep its address.
#: Shared by every launch on the device, which is safe because launches on one device are
#: serialized (the engine runs on one stream); two streams running split-K launches at
#: once would need counters of their own.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_COUNTER_SLOTS = 1 << 16  # output tiles of one launch; 256 KiB per device


def make_counters(device: torch.device) -> None:
    """Allocate ``device``'s split-K counters now (at load: never inside graph capture)."""
    _counters(torch.device(device), 0)


def _counters(device: torch.device, n: int) -> torch.Tensor:
    if n > _COUNTER_SLOTS:
        raise ValueError(f"quant_mma: {n} output tiles in one split-K launch (at most {_COUNTER_SLOTS}); "
                         "use wider tiles or no split")
    have = _COUNTERS.get(device)
    if have is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("quant_mma: the split-K counters must be made before CUDA graph capture "
                               "(run a split-K launch once first)")
        have = _COUNTERS[device] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return have


def _step(group: int, want: int) -> int:
    step = want
    while step > 16 and group % step:
        step //= 2
    return step


def block_m_for(rows: int) -> int:
    """The x tile width for ``rows`` rows: 16, 32 or 64 (the dot's narrow side)."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


#: programs below which a launch splits K (about one per SM of an H100/H200)
_MIN_PROGRAMS = 128


def default_mma_config(rows: int, n: int, k: int, bits: int, group: int) -> MmaConfig:
    """A config from the shape alone, from the H200 profile of the 8B projections
    (benchmarks/results/2026-12-01-i14-profile-quant-mma-8b-h200-v{2,3}.json): 64-row weight tiles
    on 4 warps (128 on 8 warps for wide layers at 33+ rows), K steps of 128 inside a group,
    3 in flight, grouped weights dequantized in registers (``scale_w``), and K split until
    there are about 512 programs (384 and at most 4 ways from 33 rows on): qkv, o and down
    (N = 4096-6144) ran 1.5-2.5x faster split 4 ways than not at all. The same tiles through
    the permuted-x kernel where it fits, with ``HEARTH_QUANT_MMA_XP=1`` (``xp_default``)."""
    block_n, warps = (128, 8) if rows > 32 and n >= 16384 else (64, 4)
    block_k = _step(group, 128)
    tiles = -(-n // block_n) * -(-rows // block_m_for(rows))
    want, most = (384, 4) if rows > 32 else (512, 8)
    steps = -(-k // block_k)
    split = 1
    while tiles * split * 2 <= want and split < most and steps % (2 * split) == 0:
        split *= 2
    return MmaConfig(block_n, block_k, warps, 3, split, group < k, xp_default() and xp_fits(k, bits, group))


def xp_default() -> bool:
    """Whether ``default_mma_config`` takes the permuted-x kernel where it fits: only with
    ``HEARTH_QUANT_MMA_XP=1`` for now. It compiles to about 285 instead of 452 instructions
    a thread a K step with no layout trip through shared memory (sm_90 build of the 8B
    gate_up tile), but it has not been timed on a GPU yet; the default follows the
    measurement. Batched steps only: batch 1 keeps its own tuner's choice (where the
    weight-stationary kernel is a candidate, it runs in natural order)."""
    return os.environ.get("HEARTH_QUANT_MMA_XP", "0") == "1"


def mma_configs(rows: int, n: int, k: int, bits: int, group: int) -> list[MmaConfig]:
    """Configs worth timing for this shape, ``default_mma_config`` first; the in-register
    dequantizing ones (``scale_w``) first among the rest (grouped weights only); the
    permuted-x ones (``xp``) last, where they fit."""
    out = [default_mma_config(rows, n, k, bits, group)]
    bk = _step(group, 128)
    scaled = group < k
    for cand in (MmaConfig(64, bk, 4, 4, 4, scaled), MmaConfig(64, bk, 4, 4, 8, scaled),
                 MmaConfig(64, bk, 4, 6, 4, scaled), MmaConfig(64, _step(group, 256), 4, 3, 4, scaled),
                 MmaConfig(128, bk, 8, 4, 1, scaled), MmaConfig(64, bk, 4, 4, 2, scaled), MmaConfig(64, bk, 4, 4, 1, scaled),
                 MmaConfig(64, bk, 4, 4, 1), MmaConfig(64, bk, 4, 4, 2), MmaConfig(64, bk, 4, 4, 4),
                 MmaConfig(128, bk, 8, 4, 1), MmaConfig(128, bk, 8, 4, 2), MmaConfig(128, bk, 4, 3, 1),
                 MmaConfig(32, bk, 2, 4, 1), MmaConfig(64, _step(group, 256), 4, 3, 1),
                 MmaConfig(64, _step(group, 64), 4, 6, 2)):
        if block_m_for(rows) == 64 and (cand.block_n, cand.warps) not in ((64, 4), (128, 8)):
            continue  # 64 columns: other tiles spill in the sm_90 build (128 rows on 4 warps, 32 on 2)
        if -(-k // cand.block_k) % cand.split_k == 0 and cand not in out:
            out.append(cand)
    if xp_fits(k, bits, group):  # last: what the batch-1 tuner takes from the front stays as it was
        for bn, warps, stages, split in ((64, 4, 3, 4), (64, 4, 4, 4), (64, 4, 3, 2), (64, 4, 3, 8), (64, 4, 3, 1),
                                         (128, 8, 3, 1), (128, 8, 4, 1), (128, 8, 3, 2), (128, 4, 3, 1)):
            if block_m_for(rows) == 64 and (bn, warps) == (128, 4):
                continue
            if (k // XP_STEP) % split == 0:
                out.append(MmaConfig(bn, XP_STEP, warps, stages, split, True, True))
    return out


def quant_mma(x: torch.Tensor, prepared: PreparedQuant, *, config: tuple | None = None, swiglu: bool = False,
              bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [M, K] (M <= 64; [M, 2K] ``[gate | up]`` with ``swiglu``)
    in bf16/fp16 (fp32 for tests), W the ``prepared`` weight; [M, N] in x's dtype, into
    ``out`` when given. No host sync; capturable in a CUDA graph once a split-K config has
    run for this size outside capture (its counters are made then)."""
    n, k = prepared.out_features, prepared.in_features
    _check_x("quant_mma", x, k, swiglu)
    rows = x.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"quant_mma: x must have 1 to {MAX_ROWS} rows, got {rows}; use quant_gemm for more")
    out = _check_bias_out("quant_mma", x, rows, n, bias, out)
    if x.stride(1) != 1:
        x = x.contiguous()
    bits, group = prepared.bits, prepared.group_size
    cfg = MmaConfig(*config) if config is not None else default_mma_config(rows, n, k, bits, group)
    block_m = block_m_for(rows)
    if cfg.xp and xp_fits(k, bits, group):
        return _quant_mma_xp(x, prepared, cfg, block_m, swiglu, bias, out)
    block_k = _step(group, cfg.block_k) if group < k or bits == 4 else cfg.block_k
    if k % block_k:
        if bits == 4 or group < k:
            raise ValueError(f"quant_mma: K step {block_k} does not divide the {k} inputs")
        block_k = 32 if k % 32 == 0 else 16
        if k % block_k:
            raise ValueError(f"quant_mma: the tensor-core kernel needs K a multiple of 16, got {k}")
    steps = k // block_k
    magic, offset = _MAGIC.get(x.dtype, (0, 0)) if bits == 4 else (0, 0)
    if _DOT_IN_FP32 and x.dtype != torch.float32:
        offset = 0  # the interpreter's int4 decode is plain (_decode_int4's fp32 branch)
    q, s, m = prepared.qweight, prepared.scales, prepared.mins
    if bits == 4:
        q = q.view(torch.int32)
    tiles, split, ws, cnt = _split(cfg.block_n, cfg.split_k, steps, n, rows, block_m, s)
    _quant_mma_kernel[(tiles, split)](
        x, q, s, m if m is not None else s, bias if bias is not None else s, out, ws, cnt, rows, n, k,
        steps // split, x.stride(0), q.stride(0), s.stride(0), out.stride(0), magic,
        GROUP=group, BITS=bits, HAS_MIN=m is not None, HAS_BIAS=bias is not None, SWIGLU=swiglu, OFFSET=offset,
        DOT_FP32=_DOT_IN_FP32 and x.dtype != torch.float32 or x.dtype == torch.float32,
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, BLOCK_M=block_m, PER_ROW=group == k, SPLIT_K=split,
        STAGES=cfg.stages, ONE_ROW=rows == 1 and swiglu, SCALE_W=bool(cfg.scale_w) and group < k,
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
    return tiles, split, ws, _counters(dummy.device, tiles)


def _quant_mma_xp(x: torch.Tensor, prepared: PreparedQuant, cfg: MmaConfig, block_m: int, swiglu: bool,
                  bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``quant_mma`` through the permuted-x kernel (``xp_fits`` holds)."""
    n, k, rows = prepared.out_features, prepared.in_features, x.shape[0]
    xp = permute_x(x, k, swiglu)
    steps = k // XP_STEP
    q, s = prepared.qweight.view(torch.int32), prepared.scales
    tiles, split, ws, cnt = _split(cfg.block_n, cfg.split_k, steps, n, rows, block_m, s)
    _quant_mma_xp_kernel[(tiles, split)](
        xp, q, s, prepared.mins, bias if bias is not None else s, out, ws, cnt,
        rows, n, steps // split, xp.stride(0), q.stride(0), s.stride(0),
        out.stride(0), GROUP=prepared.group_size, HAS_BIAS=bias is not None,
        DOT_FP32=_DOT_IN_FP32 or x.dtype == torch.float32, BLOCK_N=cfg.block_n, BLOCK_M=block_m,
        SPLIT_K=split, STAGES=cfg.stages, num_warps=cfg.warps)
    return out
