"""Batch-1 int4/int8 GEMV with integer dot products (``GemvConfig.kind == DP4A``).

Why another GEMV: streaming int4 weights at an H200's 4.8 TB/s means about 37 weights per
SM per clock, and an SM issues at most 128 thread-instructions per clock. The float kernels
of ``hearth_kernels/quant_gemv.py`` spend 4.4-7 instructions per weight (decode each code to an
exact float, one FFMA with x), so they are bound by instruction issue at about 1-1.2 TB/s
(the H200 profiles: int4 no faster than int8 for the same number of weights). Here the
activations are quantized to int8 the way llama.cpp's CUDA matrix-vector kernels do
(per block of 32 inputs, ``xq = round(x * 127 / max|x|)``), and the codes are multiplied
by them four at a time with ``dp4a`` (a 4-way int8 dot product with an int32 accumulator,
one instruction):

- int4, pair order (``hearth_kernels/quant_gemv.py``: word j of a block holds inputs 8j..8j+7,
  input 8j + i at bits 4i): ``w & 0x0F0F0F0F`` holds the even inputs' codes as four
  unsigned bytes and ``w & 0xF0F0F0F0`` the odd ones' times 16, so one word of 8 weights
  costs two LOP3s and two dp4a against x packed the same way (even and odd inputs in two
  words); the odd sum is divided by 16 once per block (exact: every term is a multiple of 16);
- int8: one dp4a per word of 4 signed codes; in groups of 16 (GGUF's Q6_K) the block's
  two halves (words 0-3 and 4-7) are summed and scaled apart (``GPB`` = 2 groups per
  block), as are x's sums for the mins.

Per block of 32 inputs and row the integer sum is scaled once (each half apart for int8 in
groups of 16). int4 codes are centred
first, ``w = (q - 8) s + (m + 8 s)``: ``y += s[g] * sx[b] * sum((q - 8) * xq) + (m[g] + 8
s[g]) * sum(x)`` (``sum((q - 8) xq) = sum(q xq) - 8 sum(xq)``, one integer multiply-add per
block; the mins' term uses the exact float sum of the block's x). With mins near -8 s (any
group whose values straddle 0), ``m + 8 s`` is small and the rounding of x is weighted by
about |w|; uncentred, by |q s|, about 3 times more (measured: 2% vs 0.6% RMS error). About 0.8-1.1 instructions per int4 weight instead of 4.4-5, so
the kernel can stream at memory speed.

What it costs: the activations are rounded to 8 bits (relative error at most 1/254 of the
block's largest value per input), so the result differs from dequantize-then-matmul by
about that much more than the float kernels do; llama.cpp's CUDA decode and Hearth's own
CPU kernels (``hearth_kernels/cpu_quant.py``) make the same trade. Longer batches (prompts) keep
the float kernels.

Structure: x-stationary like ``_quant_gemv_rows_kernel``: each thread quantizes its own
block(s) of x once per program (a block's 32 inputs live in one thread, so its scale needs
no reduction), then the program streams ``ROWS`` rows, ``R`` per step; each row's partial
sums are reduced across the program. ``warps`` sets how many blocks each thread holds
(K / (1024 * warps), a power of 2): fewer warps, fewer reductions per weight but more
registers of x. Under ``TRITON_INTERPRET=1`` dp4a is emulated with the same integer
arithmetic (exact), so the interpreter tests check the algorithm bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hearth_kernels._compat import interpreting
from hearth_kernels.counters import counters
from hearth_kernels.split_fence import fence_gpu, launch_fence
from hearth_kernels.gemv import tma_available
from hearth_kernels.pdl import pdl_args, pdl_start, pdl_wait
from hearth_kernels.quant_gemv import _DP4A_MAX_K as DP4A_MAX_K
from hearth_kernels.quant_gemv import (_block_groups, _group_sums, _load_x_blocks, _split4, _split_x_blocks,
                                       _steps_next, _steps_start)

#: 0xF0F0F0F0 as an int32 (a Python int above 2**31 would make Triton widen to int64)
_HI_NIBBLES = tl.constexpr(0xF0F0F0F0 - (1 << 32))


@triton.jit
def _dp4a(a, b, c, SIGNED_A: tl.constexpr, ASM: tl.constexpr):
    """c + the dot product of the four bytes of int32 ``a`` (unsigned, or signed with
    ``SIGNED_A``) with the four signed bytes of ``b``, elementwise: PTX ``dp4a`` (one
    instruction), or the same integer arithmetic where inline PTX can't run (interpreter)."""
    if ASM:
        c = tl.zeros_like(a) + c  # a tensor (the first link of a chain passes 0)
        if SIGNED_A:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        acc = c
        for i in tl.static_range(4):
            if SIGNED_A:
                ab = (a << (24 - 8 * i)) >> 24
            else:
                ab = (a >> (8 * i)) & 0xFF
            acc += ab * ((b << (24 - 8 * i)) >> 24)
        return acc


@triton.jit
def _int4_dots(w0, w1, w2, w3, e0, e1, e2, e3, o0, o1, o2, o3, xqsum, ASM: tl.constexpr):
    """[rows, blocks]: ``sum((q - 8) * xq)`` per row and block of 32 inputs, from the block's
    four code words ``w0..w3`` (pair order) and x's even (``e``) and odd (``o``) codes per
    word ([blocks] each) and code sum ``xqsum``: the low nibbles against the even inputs, the
    high ones (times 16, exact) against the odd. Centred codes: w = (q - 8) s + (m + 8 s),
    and m + 8 s is about the group's midpoint, so x's rounding errors are weighted by about
    |w|, not by |q s| (about 3x more)."""
    lo = _dp4a(w3 & 0x0F0F0F0F, e3[None, :], _dp4a(w2 & 0x0F0F0F0F, e2[None, :], _dp4a(
        w1 & 0x0F0F0F0F, e1[None, :], _dp4a(w0 & 0x0F0F0F0F, e0[None, :], 0, False, ASM), False, ASM),
        False, ASM), False, ASM)
    hi = _dp4a(w3 & _HI_NIBBLES, o3[None, :], _dp4a(w2 & _HI_NIBBLES, o2[None, :], _dp4a(
        w1 & _HI_NIBBLES, o1[None, :], _dp4a(w0 & _HI_NIBBLES, o0[None, :], 0, False, ASM), False, ASM),
        False, ASM), False, ASM)
    return lo + (hi >> 4) - 8 * xqsum[None, :]


@triton.jit
def _pack4(q0, q1, q2, q3):
    """Four int32 tensors of values in [-128, 127] as the bytes 0..3 of int32 words."""
    return (q0 & 0xFF) | ((q1 & 0xFF) << 8) | ((q2 & 0xFF) << 16) | (q3 << 24)


@triton.jit
def _split4_last(x):
    """[A, 4] -> its four [A] columns (register moves only)."""
    A: tl.constexpr = x.shape[0]
    even, odd = tl.split(tl.reshape(x, [A, 2, 2]))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _quantize(v, inv):
    return tl.floor(v * inv[:, None] + 0.5).to(tl.int32)


@triton.jit
def _normed_x_blocks(x_ptr, r_ptr, nw_ptr, ro_ptr, kb, K, ADD: tl.constexpr):
    """For the blocks of x starting at ``kb``: ``(w * s, sum(s^2) per block)`` in float32,
    [NB, 32] and [NB], where ``s`` is x (x + r rounded to x's dtype with ``ADD``; program
    (0, 0) then stores it at ro_ptr: the new residual stream) and ``w`` the norm's weight.
    RMSNorm's ``w * s * rsqrt(mean(s^2) + eps)`` is this times one scalar, which the kernel
    applies to each block's scale after quantizing (quantizing per block is scale-free), so
    no register holds x across the program-wide sum."""
    dt = x_ptr.dtype.element_ty
    xk = kb[:, None] + tl.arange(0, 32)[None, :]
    ok = xk < K
    h = tl.load(x_ptr + xk, mask=ok, other=0.0)
    if ADD:
        h = (h.to(tl.float32) + tl.load(r_ptr + xk, mask=ok, other=0.0).to(tl.float32)).to(dt)
        tl.store(ro_ptr + xk, h, mask=ok & (tl.program_id(0) == 0) & (tl.program_id(1) == 0))
    hf = h.to(tl.float32)
    w = tl.load(nw_ptr + xk, mask=ok, other=0.0).to(tl.float32)
    return w * hf, tl.sum(hf * hf, axis=1)


@triton.jit
def _quantize_blocks(x0, x1, x2, x3, h0, h1, h2, h3, BITS: tl.constexpr, GPB: tl.constexpr):
    """Blocks of x (as ``_load_x_blocks`` splits them) quantized to int8 per block of 32:
    ``(xe, xo, sx, xsum, xqsum, xhalf)``: the codes packed like the weights' words ([NB, WPB]
    int32; int4: xe the even inputs', xo the odd ones'), each block's scale, float sum ([NB *
    GPB]: per group, int8 in groups of 16), (int4) sum of codes, and (int8) the float sums of
    each block's halves ([NB * 2], what GPB = 2 takes as xsum; for ``_quantize_x_kernel``)."""
    NB: tl.constexpr = x0.shape[0]
    amax = tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3)))
    xsum = x0 + x1 + x2 + x3
    if BITS == 4:
        amax = tl.maximum(amax, tl.maximum(tl.maximum(tl.abs(h0), tl.abs(h1)), tl.maximum(tl.abs(h2), tl.abs(h3))))
        xsum += h0 + h1 + h2 + h3
    amax = tl.max(amax, axis=1)  # [NB]
    # int8 word j holds inputs 4j..4j+3: the halves are words 0-3 and 4-7
    xhalf = tl.reshape(_group_sums(xsum[None], 2), [NB * 2])
    if GPB == 1:
        xsum = tl.sum(xsum, axis=1)
    else:
        xsum = xhalf
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    sx = amax / 127.0
    q0, q1, q2, q3 = _quantize(x0, inv), _quantize(x1, inv), _quantize(x2, inv), _quantize(x3, inv)
    xe = _pack4(q0, q1, q2, q3)  # [NB, WPB]
    if BITS == 4:
        p0, p1, p2, p3 = _quantize(h0, inv), _quantize(h1, inv), _quantize(h2, inv), _quantize(h3, inv)
        xo = _pack4(p0, p1, p2, p3)
        # the block's sum of xq, for the codes' centre 8 (see the GEMV kernel)
        xqsum = tl.sum(q0 + q1 + q2 + q3 + p0 + p1 + p2 + p3, axis=1)
    else:
        xo = xe
        xqsum = sx.to(tl.int32)  # unused
    return xe, xo, sx, xsum, xqsum, xhalf


@triton.jit
def _x_quantized(x_ptr, r_ptr, nw_ptr, ro_ptr, eps, kb, K, BITS: tl.constexpr, SWIGLU: tl.constexpr,
                 NORM: tl.constexpr, GPB: tl.constexpr):
    """The blocks of x at ``kb`` [NB] loaded (SwiGLU applied, or RMS-normalised: NORM 1 of x,
    NORM 2 of x + r, written to ro_ptr by program (0, 0); every block of the row in this
    program) and quantized: ``_quantize_blocks``' six, the norm's scalar on each block's
    scale and sums (``_normed_x_blocks``)."""
    if NORM:
        xv, sq = _normed_x_blocks(x_ptr, r_ptr, nw_ptr, ro_ptr, kb, K, NORM == 2)
        x0, x1, x2, x3, h0, h1, h2, h3 = _split_x_blocks(xv, BITS)
    else:
        x0, x1, x2, x3, h0, h1, h2, h3 = _load_x_blocks(x_ptr, kb, K, BITS, SWIGLU)  # [NB, WPB] each
    xe, xo, sx, xsum, xqsum, xhalf = _quantize_blocks(x0, x1, x2, x3, h0, h1, h2, h3, BITS, GPB)
    if NORM:
        inv_rms = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
        sx = sx * inv_rms
        xsum = xsum * inv_rms
        xhalf = xhalf * inv_rms
    return xe, xo, sx, xsum, xqsum, xhalf


@triton.jit
def _quantize_x_kernel(x_ptr, xq_ptr, xf_ptr, r_ptr, nw_ptr, ro_ptr, eps, K, NBP: tl.constexpr, BITS: tl.constexpr,
                       SWIGLU: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
    # NBP blocks of 32 inputs per program: block b's 8 words at xq_ptr[8b..] (int4: the
    # even inputs' 4 then the odd ones'), its scale, float sum and (int4) code sum at
    # xf_ptr[4b..] (int8: its halves' float sums at 4b + 2 and 4b + 3, for weights in groups
    # of 16; so one quantized x serves any int8 group). NORM (one program, the whole row): x
    # is RMS-normalised first, as the GEMV's own prologue does it (NORM 2: of x + r, written
    # to ro_ptr)
    pdl_start(PDL)
    pdl_wait(PDL)
    WPB: tl.constexpr = 4 if BITS == 4 else 8
    blk = tl.program_id(0) * NBP + tl.arange(0, NBP)
    kb = blk * 32
    ok = kb < K
    j = tl.arange(0, WPB)
    xe, xo, sx, xsum, xqsum, xhalf = _x_quantized(x_ptr, r_ptr, nw_ptr, ro_ptr, eps, kb, K, BITS, SWIGLU, NORM, 1)
    tl.store(xq_ptr + blk[:, None] * 8 + j[None, :], xe, mask=ok[:, None])
    if BITS == 4:
        tl.store(xq_ptr + blk[:, None] * 8 + 4 + j[None, :], xo, mask=ok[:, None])
        tl.store(xf_ptr + blk * 4 + 2, xqsum.to(tl.float32), mask=ok)
    else:
        lo, hi = tl.split(tl.reshape(xhalf, [NBP, 2]))
        tl.store(xf_ptr + blk * 4 + 2, lo, mask=ok)
        tl.store(xf_ptr + blk * 4 + 3, hi, mask=ok)
    tl.store(xf_ptr + blk * 4, sx, mask=ok)
    tl.store(xf_ptr + blk * 4 + 1, xsum, mask=ok)


def _norm_args(x: torch.Tensor, norm: tuple | None) -> tuple:
    """The kernels' NORM mode and (r, norm weight, residual out, eps) arguments for ``norm``
    (``(residual or None, weight, eps, residual_out)``; x stands in for what is unused)."""
    if norm is None:
        return 0, x, x, x, 0.0
    residual, weight, eps, residual_out = norm
    if residual is None:
        return 1, x, weight, x, eps
    return 2, residual, weight, residual_out, eps


def quantize_x_blocks(x: torch.Tensor, bits: int, swiglu: bool = False,
                      norm: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, K] (or [1, 2K] ``[gate | up]`` with ``swiglu``: SwiGLU first) quantized once for
    the dp4a kernel's ``qx`` mode, exactly as each of its programs would: ``(words [K/32, 8]
    int32, terms [K/32, 4] float32)``. ``norm``: ``(residual or None, weight, eps,
    residual_out)`` as ``quant_gemv_dp4a`` takes it: x is RMS-normalised first (one program
    holds the row; ``residual_out`` gets x + residual). The terms: per block its scale, float
    sum, and (int4) sum of codes or (int8) the float sums of its two halves, for weights in
    groups of 16."""
    if swiglu and norm is not None:
        raise ValueError("quantize_x_blocks: SwiGLU or the norm, not both")
    k = x.shape[1] // 2 if swiglu else x.shape[1]
    nb = k // 32
    xq = torch.empty(nb, 8, dtype=torch.int32, device=x.device)
    xf = torch.empty(nb, 4, dtype=torch.float32, device=x.device)
    norm_mode, r_arg, weight, ro_arg, eps = _norm_args(x, norm)
    nbp = 32 if norm is None else triton.next_power_of_2(nb)  # the norm: the whole row in one program
    _quantize_x_kernel[(triton.cdiv(nb, nbp),)](x, xq, xf, r_arg, weight, ro_arg, eps, k, NBP=nbp, BITS=bits,
                                                  SWIGLU=swiglu, NORM=norm_mode, num_warps=max(1, min(16, nbp // 32)),
                                                  **pdl_args(x.device))
    return xq, xf


@triton.jit
def _quant_gemv_dp4a_kernel(x_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_qn, stride_sn,
                            r_ptr, nw_ptr, ro_ptr, eps, xf_ptr,
                            GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr,
                            HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, ROWS: tl.constexpr,
                            R: tl.constexpr, KP: tl.constexpr, STAGES: tl.constexpr, SPLIT: tl.constexpr,
                            NORM: tl.constexpr, QX: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
                            FENCE: tl.constexpr = 0):
    # q_ptr: the codes as int32 words (stride_qn in words); KP: the inputs of one program (K
    # rounded up to a power of 2, divided by SPLIT); program (i, s) takes rows i*ROWS.. and
    # the s-th KP inputs. SPLIT > 1: each program writes its rows' partial sums to ws_ptr
    # [programs, SPLIT, ROWS] and the last of a row block to arrive (cnt_ptr, zeroed, left
    # zeroed) adds them in split order (the same bits every run) and writes y. NORM (one
    # program along K): x is the RMSNorm of x (NORM 1) or of x + r (NORM 2; program 0
    # writes that sum, the new residual stream, to ro_ptr) with weight nw_ptr (see
    # ``quant_gemv_normed``).
    pdl_start(PDL)
    NB: tl.constexpr = KP // 32  # blocks of 32 inputs
    WPB: tl.constexpr = 4 if BITS == 4 else 8  # words per block
    blk = tl.arange(0, NB)
    j = tl.arange(0, WPB)
    kb = (tl.program_id(1) * NB + blk) * 32
    blk_ok = kb < K
    GPB: tl.constexpr = 32 // GROUP if GROUP < 32 else 1  # groups per block (2: int8 in groups of 16)
    grp = _block_groups(kb, blk_ok, GROUP, GPB)  # [NB * GPB]
    r = tl.arange(0, R)
    first = tl.program_id(0) * ROWS
    word = (kb // (32 // WPB))[None, :, None] + j[None, None, :]  # [1, NB, WPB]
    # the first steps' weights are requested before x, so that their memory round trip
    # overlaps x's load and quantizing (a narrow layer's fixed cost)
    LEAD: tl.constexpr = max(0, min(STAGES - 1, 2))  # steps loaded ahead (``_steps_start``)
    w_a, s_a, m_a, w_b, s_b, m_b = _steps_start(q_ptr, s_ptr, m_ptr, first, r, N, stride_qn, stride_sn, word, grp,
                                                blk_ok, HAS_MIN, ROWS, R, LEAD)
    # with PDL this kernel started while the one before it (which writes x) was finishing:
    # wait for it here, after requesting the weights (hearth_kernels/pdl.py)
    pdl_wait(PDL)
    # x, quantized per block to int8 and packed like the codes
    # int4 word j: inputs 8j..8j+7, the even ones (x) pair with the low nibbles, the odd (h)
    # with the high; int8 word j: inputs 4j..4j+3, byte b = input 4j + b
    if QX:  # x quantized beforehand (``quantize_x_blocks``): its words and per-block terms
        bidx = tl.where(blk_ok, kb // 32, 0)
        xe = tl.load(x_ptr + bidx[:, None] * 8 + j[None, :], mask=blk_ok[:, None], other=0)
        meta = xf_ptr + bidx * 4
        sx = tl.load(meta, mask=blk_ok, other=0.0)
        if GPB == 2:  # the halves' sums (``_quantize_x_kernel``)
            xsum = tl.reshape(tl.join(tl.load(meta + 2, mask=blk_ok, other=0.0),
                                      tl.load(meta + 3, mask=blk_ok, other=0.0)), [NB * 2])
        else:
            xsum = tl.load(meta + 1, mask=blk_ok, other=0.0)
        if BITS == 4:
            xo = tl.load(x_ptr + bidx[:, None] * 8 + 4 + j[None, :], mask=blk_ok[:, None], other=0)
            xqsum = tl.load(meta + 2, mask=blk_ok, other=0.0).to(tl.int32)
    else:
        xe, xo, sx, xsum, xqsum, _ = _x_quantized(x_ptr, r_ptr, nw_ptr, ro_ptr, eps, kb, K, BITS, SWIGLU, NORM, GPB)
    if GPB > 1:  # each group of a block takes the block's x scale
        sx = tl.reshape(tl.broadcast_to(sx[:, None], [NB, GPB]), [NB * GPB])
    if BITS == 4:
        e0, e1, e2, e3 = _split4_last(xe)
        o0, o1, o2, o3 = _split4_last(xo)
    for r0 in range(0, ROWS, R):
        rows = first + r0 + r
        row_ok = (rows < N) & (r0 + r < ROWS)  # R need not divide ROWS
        rows_safe = tl.where(row_ok, rows, 0).to(tl.int64)
        w, scale, mins, w_a, s_a, m_a, w_b, s_b, m_b = _steps_next(
            q_ptr, s_ptr, m_ptr, rows, r0, r, N, stride_qn, stride_sn, word, grp, blk_ok, w_a, s_a, m_a, w_b, s_b,
            m_b, HAS_MIN, ROWS, R, LEAD)
        if BITS == 4:
            w0, w1, w2, w3 = _split4(w)  # [R, NB] each: words 0..3 of each block
            dot = _int4_dots(w0, w1, w2, w3, e0, e1, e2, e3, o0, o1, o2, o3, xqsum, ASM)  # [R, NB]
        else:
            dot = _group_sums(_dp4a(w, xe[None, :, :], 0, True, ASM), GPB)  # [R, NB * GPB]
        t = dot.to(tl.float32) * (scale * sx[None, :])
        if HAS_MIN:
            if BITS == 4:
                t += (mins + 8.0 * scale) * xsum[None, :]
            else:
                t += mins * xsum[None, :]
        y = tl.sum(t, axis=1)
        if SPLIT > 1:
            tl.store(ws_ptr + (tl.program_id(0) * SPLIT + tl.program_id(1)) * ROWS + r0 + r, y, mask=r0 + r < ROWS,
                     cache_modifier=".cg")
        else:
            if HAS_BIAS:
                y += tl.load(b_ptr + rows_safe).to(tl.float32)
            tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)
    if SPLIT > 1:
        fence_gpu(FENCE & 1)  # every thread's partials performed at GPU scope (hearth_kernels/split_fence.py)
        tl.debug_barrier()  # ... before the block's count goes up
        done = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            fence_gpu(FENCE & 2)
            rr = tl.arange(0, ROWS)
            part = ws_ptr + tl.program_id(0) * SPLIT * ROWS + rr
            y = tl.load(part, cache_modifier=".cg")
            for sp in tl.static_range(1, SPLIT):
                y += tl.load(part + sp * ROWS, cache_modifier=".cg")
            rows = first + rr
            if HAS_BIAS:
                y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)
            tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")  # ready for the next launch


def dp4a_launch(block_n: int, block_k: int, warps: int, k: int, split: int = 1) -> tuple[int, int, int, int]:
    """(KP, R, num_warps, split) for a DP4A config and K: K rounded up to a power of 2 (at
    least one block per thread of one warp) and divided among ``split`` programs (each at
    least 1024 inputs); warps at most KP/1024 (every thread holds at least one block of x)
    and at least KP/4096 (at most 4 blocks, 32-64 registers of x); rows per step at most the
    rows per program."""
    kp = max(1024, triton.next_power_of_2(k))
    split = max(1, min(split, kp // 1024))
    kp //= split
    num_warps = max(kp // 4096, min(warps, kp // 1024, 32), 1)
    return kp, min(block_k, block_n), num_warps, split


def _check_qx(qx: tuple, k: int, norm: tuple | None, swiglu: bool) -> None:
    """x quantized beforehand (``quantize_x_blocks``' output) comes with no norm or SwiGLU of
    its own to apply, as [K/32, 8] words."""
    if norm is not None or swiglu or tuple(qx[0].shape) != (k // 32, 8):
        raise ValueError(f"quant_gemv: x quantized beforehand (quantize_x_blocks) comes with no norm or SwiGLU "
                         f"and as [{k // 32}, 8] words, got {list(qx[0].shape)}")


def quant_gemv_dp4a(x: torch.Tensor, prepared, out: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
                    block_n: int, block_k: int, warps: int, stages: int, split: int = 1,
                    norm: tuple | None = None, qx: bool | tuple = False) -> torch.Tensor:
    """Launch the dp4a kernel for one row (``hearth_kernels.quant_gemv.quant_gemv`` checks the
    arguments and sends ``kind=DP4A`` configs here): ``block_n`` rows per program,
    ``block_k`` rows per step, ``warps`` (see ``dp4a_launch``), ``stages`` - 1 steps loaded
    ahead, K split among ``split`` programs per row block (a small fp32 workspace from
    torch's allocator; the counters are made outside graph capture: ``hearth_kernels.counters``).
    ``norm``: ``(residual or None, weight, eps, residual_out)``, checked by
    ``quant_gemv_normed``: x is RMS-normalised (after adding the residual) in the prologue;
    needs ``split == 1`` (or ``qx``) and no SwiGLU. ``qx``: True quantizes x (after SwiGLU or the norm)
    with one kernel first (``quantize_x_blocks``) and every program reads it, instead of each
    program quantizing the whole row itself (a wide layer's 1,000-2,000 programs repeat
    that); the result is the same up to the order of float sums (the interpreter: bit for
    bit). Or ``quantize_x_blocks``'s output itself."""
    n, k = prepared.out_features, prepared.in_features
    if k > DP4A_MAX_K or k % 32:
        raise ValueError(f"quant_gemv: the dp4a kernel needs K a multiple of 32 and at most {DP4A_MAX_K}, got {k}")
    kp, rows_per_step, num_warps, split = dp4a_launch(block_n, block_k, warps, k, split)
    if norm is not None and (swiglu or (split > 1 and qx is False)):
        raise ValueError("quant_gemv: the RMSNorm prologue needs the whole row in one program (split 1), no SwiGLU")
    if split > 1 and block_n & (block_n - 1):
        raise ValueError(f"quant_gemv: a dp4a config with K split needs a power of 2 of rows per program, got {block_n}")
    q, s, m = prepared.qweight.view(torch.int32), prepared.scales, prepared.mins
    programs = triton.cdiv(n, block_n)
    if split > 1:
        ws = torch.empty(programs * split * block_n, dtype=torch.float32, device=x.device)
        cnt = counters(x.device, programs)
    else:
        ws = cnt = s
    if qx is not False and qx is not True:
        _check_qx(qx, k, norm, swiglu)
    if qx is True:  # x (SwiGLU, the norm) quantized by one kernel first, read by every program
        qx, swiglu = quantize_x_blocks(x, prepared.bits, swiglu, norm), False
        norm = None
    norm_mode, r_arg, weight, ro_arg, eps = _norm_args(x, norm)
    _quant_gemv_dp4a_kernel[(programs, split)](
        x if qx is False else qx[0], q, s, m if m is not None else s, bias if bias is not None else s, out, ws, cnt,
        n, k, q.stride(0), s.stride(0), r_arg, weight, ro_arg, eps, qx[1] if qx is not False else s,
        GROUP=prepared.group_size, BITS=prepared.bits,
        HAS_MIN=m is not None, HAS_BIAS=bias is not None, SWIGLU=swiglu, ROWS=block_n, R=rows_per_step, KP=kp,
        STAGES=stages, SPLIT=split, NORM=norm_mode, QX=qx is not False, ASM=not interpreting(),
        FENCE=launch_fence(split), num_warps=num_warps, **pdl_args(x.device))
    return out


def dp4a_reference(x: torch.Tensor, prepared, bias: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """The dp4a kernel's result computed in float64 on the host's terms (for tests): x
    quantized per block of 32 exactly as the kernel does (in float32), the integer dots
    exact, the scaling in float64. [1, N] float64."""
    if swiglu:  # rounded like the unfused activation kernel (the float GEMVs' tests do the same)
        from hearth_kernels.activation import silu_and_mul

        x = silu_and_mul(x)
    xf = x.float()
    k = xf.shape[1]
    blocks = xf.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.floor(blocks * inv[:, None] + 0.5)
    sx = (amax / 127.0).double()
    centre = 8 if prepared.bits == 4 else 0  # int4 codes are centred (the kernel's docstring)
    codes = _codes(prepared).double() - centre  # [N, K]
    n = codes.shape[0]
    width = min(32, prepared.group_size)  # int8 in groups of 16: each half block scaled apart
    dots = (codes.reshape(n, -1, width) * xq.double().reshape(-1, width)[None]).sum(dim=2)  # [N, groups]
    g = torch.arange(k // width, device=x.device) * width // prepared.group_size
    s = prepared.scales.double()[:, g]
    y = (dots * s * sx.repeat_interleave(32 // width)[None]).sum(dim=1)
    if prepared.mins is not None:
        xsums = xf.reshape(-1, width).double().sum(dim=1)
        y += ((prepared.mins.double()[:, g] + centre * s) * xsums[None]).sum(dim=1)
    if bias is not None:
        y += bias.double()
    return y[None]


def _codes(prepared) -> torch.Tensor:
    """The integer codes [N, K] in natural input order (int4: 0..15; int8: signed)."""
    q = prepared.qweight
    if prepared.bits == 8:
        return q.to(torch.int32)
    # pair order: byte j holds input 2j (low nibble) and 2j + 1 (high)
    return torch.stack(((q & 15).to(torch.int32), (q >> 4).to(torch.int32)), dim=-1).reshape(q.shape[0], -1)


# --- the K-loop kind (``GemvConfig.kind == DP4A_TMA``) ---------------------------------------
#
# The x-stationary kernel above keeps the whole row of x in registers and streams rows; how
# many bytes it keeps in flight is bounded by its registers. With the weights in L2 (memory
# faster than the kernel, the H200's situation), an H100 ran it at the same speed as from
# HBM (down 13.4 us), where this kernel took 8.2
# (benchmarks/results/2026-12-06-i14-profile-dp4a-tma-l2-int4-h100-e6da456.json). Here each program
# takes ``BN`` rows and walks K in steps of ``BK`` inputs; the weight tile of each step comes
# by TMA (one bulk copy into shared memory, ``STAGES`` - 1 steps ahead, issued by Triton's
# pipeliner with mbarriers), so the bytes in flight don't cost registers. x is quantized
# once beforehand (``quantize_x_blocks``, which also runs the norm or SwiGLU). The codes are
# taken in units of 4 words (int4: a block of 32 inputs; int8: half a block, 16), each
# thread keeping a float accumulator per row and unit, reduced once at the end.


@triton.jit
def _unit_scales(s_ptr, m_ptr, rows_s, row_ok, k0, K, stride_sn, GROUP: tl.constexpr, BK: tl.constexpr,
                 NU: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr, EVEN_K: tl.constexpr):
    """The scale and the min term (int4: m + 8 s, for the centred codes; zeros without
    mins) of each of the K step's ``NU`` units, float32 [rows, NU], from its groups' float16
    values ([rows, BK / GROUP] loaded, or [rows] where a group spans the step). Unmasked
    where K is a whole number of steps (EVEN_K): in the sm_90 build Triton's pipeliner copies
    these 2-byte loads ahead only unmasked (with a per-group mask they stayed synchronous,
    and the H100's down in L2 took 11.5 us instead of 8.2); past K the masked lanes read 0."""
    if GROUP <= BK:
        GPS: tl.constexpr = BK // GROUP
        g = k0 // GROUP + tl.arange(0, GPS)
        off = rows_s[:, None] * stride_sn + g[None, :]
        ok = row_ok[:, None] & (g < K // GROUP)[None, :]
    else:
        off = rows_s * stride_sn + k0 // GROUP
        ok = row_ok & (k0 < K)
    if EVEN_K:
        sg = tl.load(s_ptr + off).to(tl.float32)
    else:
        sg = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)
    mg = tl.zeros_like(sg)
    if HAS_MIN:
        if EVEN_K:
            mg = tl.load(m_ptr + off).to(tl.float32)
        else:
            mg = tl.load(m_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if BITS == 4:
            mg += 8.0 * sg
    if GROUP <= BK:  # each group's values over its units
        su = tl.reshape(tl.broadcast_to(sg[:, :, None], [sg.shape[0], GPS, NU // GPS]), [sg.shape[0], NU])
        mu = tl.reshape(tl.broadcast_to(mg[:, :, None], [mg.shape[0], GPS, NU // GPS]), [mg.shape[0], NU])
    else:
        su = tl.broadcast_to(sg[:, None], [sg.shape[0], NU])
        mu = tl.broadcast_to(mg[:, None], [mg.shape[0], NU])
    return su, mu


@triton.jit
def _quant_gemv_dp4a_tma_kernel(w_desc, s_ptr, m_ptr, b_ptr, xq_ptr, xf_ptr, y_ptr, N, K, stride_sn,
                                GROUP: tl.constexpr, BITS: tl.constexpr, PER_ROW: tl.constexpr,
                                HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                STAGES: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    # w_desc: the codes as int32 words [N, K*BITS/32], a [BN, BK*BITS/32] box; xq/xf: x
    # quantized per block of 32 (``_quantize_x_kernel``: 8 words, then scale, float sum and
    # (int4) code sum or (int8) its halves' float sums). PER_ROW: one scale (and min) a row,
    # applied at the end; else groups of GROUP inputs.
    pdl_start(PDL)
    UNIT: tl.constexpr = 32 if BITS == 4 else 16  # inputs in 4 words
    NU: tl.constexpr = BK // UNIT  # units a step
    n0 = tl.program_id(0) * BN
    rows = n0 + tl.arange(0, BN)
    row_ok = rows < N
    rows_s = tl.where(row_ok, rows, 0)
    u = tl.arange(0, NU)
    j = tl.arange(0, 4)
    nunits = K // UNIT
    # the wait comes before the loop (the PDL contract: one wait, at the top level), so the
    # pipeliner's first copies follow it (asking L2 for the first tiles before it bought
    # nothing measurable on an H100: benchmarks/QUANT_LOG.md)
    pdl_wait(PDL)
    acc = tl.zeros([BN, NU], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        w = w_desc.load([n0, k0 * BITS // 32])  # [BN, WORDS] int32 (zeros past N and K)
        if not PER_ROW:  # the step's group scales and mins (copied ahead with the tiles)
            su, mu = _unit_scales(s_ptr, m_ptr, rows_s, row_ok, k0, K, stride_sn, GROUP, BK, NU, BITS, HAS_MIN, EVEN_K)
        un = k0 // UNIT + u  # this step's units
        u_ok = un < nunits
        blk = un * UNIT // 32  # their blocks of x
        w0, w1, w2, w3 = _split4(tl.reshape(w, [BN, NU, 4]))
        if BITS == 4:
            e0, e1, e2, e3 = _split4_last(tl.load(xq_ptr + blk[:, None] * 8 + j[None, :], mask=u_ok[:, None],
                                                  other=0))
            o0, o1, o2, o3 = _split4_last(tl.load(xq_ptr + blk[:, None] * 8 + 4 + j[None, :], mask=u_ok[:, None],
                                                  other=0))
            xqsum = tl.load(xf_ptr + blk * 4 + 2, mask=u_ok, other=0.0).to(tl.int32)
            dot = _int4_dots(w0, w1, w2, w3, e0, e1, e2, e3, o0, o1, o2, o3, xqsum, ASM)  # [BN, NU]
            xsum = tl.load(xf_ptr + blk * 4 + 1, mask=u_ok, other=0.0)
        else:  # words 4h..4h+3 of x's block h // 2: unit h's inputs, in the weights' byte order
            e0, e1, e2, e3 = _split4_last(tl.load(xq_ptr + un[:, None] * 4 + j[None, :], mask=u_ok[:, None],
                                                  other=0))
            dot = _dp4a(w3, e3[None, :], _dp4a(w2, e2[None, :], _dp4a(w1, e1[None, :], _dp4a(
                w0, e0[None, :], 0, True, ASM), True, ASM), True, ASM), True, ASM)
            xsum = tl.load(xf_ptr + blk * 4 + 2 + un % 2, mask=u_ok, other=0.0)  # the half's float sum
        sx = tl.load(xf_ptr + blk * 4, mask=u_ok, other=0.0)
        if PER_ROW:
            acc += dot.to(tl.float32) * sx[None, :]
        else:  # each unit's group scale and min term
            acc += dot.to(tl.float32) * (su * sx[None, :])
            if HAS_MIN:
                acc += mu * xsum[None, :]
    y = tl.sum(acc, axis=1)
    if PER_ROW:  # one scale a row; its min (int4: centred, m + 8 s) times the sum of x
        s_row = tl.load(s_ptr + rows_s * stride_sn).to(tl.float32)
        y *= s_row
        if HAS_MIN:
            ub = tl.arange(0, 32)
            tot = tl.zeros([32], tl.float32)
            for b0 in range(0, K // 32, 32):
                tot += tl.load(xf_ptr + (b0 + ub) * 4 + 1, mask=b0 + ub < K // 32, other=0.0)
            m_row = tl.load(m_ptr + rows_s * stride_sn).to(tl.float32)
            if BITS == 4:
                m_row += 8.0 * s_row
            y += m_row * tl.sum(tot, axis=0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_s).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


#: K steps of at most 256 words a row (int4 2,048 inputs, int8 1,024): the widest swept
DP4A_TMA_MAX_WORDS = 256
#: shared memory the copies in flight may take (228 KB a Hopper SM, some left for the rest)
DP4A_TMA_MAX_SMEM = 200_000


def dp4a_tma_problem(k: int, bits: int, group: int, block_n: int, block_k: int, stages: int) -> str | None:
    """Why a ``DP4A_TMA`` config can't run a [*, k] weight of ``bits`` in groups of ``group``
    inputs (``k``: one scale a row) (None: it can)."""
    unit = 32 if bits == 4 else 16
    if k % 32 or k % group:
        return f"the TMA dp4a kernel needs K a multiple of 32 and of the group, got K {k}, groups of {group}"
    if (block_k & (block_k - 1) or not 4 <= block_k * bits // 32 <= DP4A_TMA_MAX_WORDS
            or block_n & (block_n - 1) or block_n < 8):
        return (f"a TMA dp4a config needs K steps a power of 2 of 4 to {DP4A_TMA_MAX_WORDS} words and rows a power "
                f"of 2 from 8, got {block_n} rows, steps of {block_k} int{bits} inputs")
    if (stages - 1) * block_n * block_k * bits // 8 > DP4A_TMA_MAX_SMEM:  # Triton's ring: stages - 1 tiles
        return (f"a TMA dp4a config's {stages - 1} tiles of {block_n} x {block_k} int{bits} codes in flight pass "
                f"{DP4A_TMA_MAX_SMEM // 1000} KB of shared memory")
    if group != k and (group % unit or block_k % group and group % block_k):
        return (f"the TMA dp4a kernel needs int{bits} groups a multiple of {unit} inputs that divide its K step "
                f"({block_k}) or are divided by it, got groups of {group}")
    return None


def quant_gemv_dp4a_tma(x: torch.Tensor, prepared, out: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
                        block_n: int, block_k: int, warps: int, stages: int,
                        norm: tuple | None = None, qx: tuple | None = None) -> torch.Tensor:
    """The K-loop dp4a GEMV (``GemvConfig.kind == DP4A_TMA``, checked by ``quant_gemv``): x
    (SwiGLU or the RMSNorm of ``norm`` applied) quantized by ``quantize_x_blocks``, then
    ``block_n`` rows per program in K steps of ``block_k`` inputs, each step's weight tile
    brought by TMA, ``stages`` - 1 steps ahead. The same integer dots as ``quant_gemv_dp4a``
    (``dp4a_reference``), summed in another order. ``qx``: x already quantized
    (``quantize_x_blocks``' output; for profiles), no norm or SwiGLU then."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    problem = dp4a_tma_problem(prepared.in_features, prepared.bits, prepared.group_size, block_n, block_k, stages)
    if problem is None and not tma_available(x.device):
        problem = "the TMA dp4a kernel needs a Hopper or newer GPU (TMA)"
    if problem is not None:
        raise ValueError(f"quant_gemv: {problem}")
    n, k, bits = prepared.out_features, prepared.in_features, prepared.bits
    if qx is not None:
        _check_qx(qx, k, norm, swiglu)
    q = prepared.qweight.view(torch.int32)
    words = block_k * bits // 32
    desc = TensorDescriptor(q, [n, k * bits // 32], [q.stride(0), 1], [block_n, words])
    xq, xf = qx if qx is not None else quantize_x_blocks(x, bits, swiglu, norm)
    s, m = prepared.scales, prepared.mins
    _quant_gemv_dp4a_tma_kernel[(triton.cdiv(n, block_n),)](
        desc, s, m if m is not None else s, bias if bias is not None else s, xq, xf, out, n, k, s.stride(0),
        GROUP=prepared.group_size, BITS=bits, PER_ROW=prepared.group_size == k, HAS_MIN=m is not None,
        HAS_BIAS=bias is not None, BN=block_n, BK=block_k, STAGES=stages, EVEN_K=k % block_k == 0,
        ASM=not interpreting(), num_warps=warps, **pdl_args(x.device))
    return out
