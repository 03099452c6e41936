"""Weight-only int8/int4 matrix-vector product for batch-1 decode: ``y = W x (+ b)``, where
``W`` is stored as integer codes with a float scale (and min) per group of inputs:

    w[n, k] = q[n, k] * s[n, k // G] + m[n, k // G]        (m = 0 without mins)

and, with ``swiglu``, ``x = round(round(silu(g)) * u)`` for an input ``[g | u]`` of 2K
columns (rounded like ``hearth_kernels/gemv.py`` and ``hearth_kernels/activation.py``).

Layout (``prepare_int4`` / ``prepare_int8``). Preparing checks Hearth's canonical layout
(``engine/quant/qweight.py``) and makes it contiguous; int4 codes are also repacked once,
at load, from GGUF order into pair order (same size; ``pair_nibbles``). The kernels view
the codes as int32 words:
- int4: uint8 ``[N, K/2]``, pair order: byte j of a row holds input 2j in its low nibble
  and 2j + 1 in its high one, so word w holds inputs 8w..8w+7 with input 8w + i at bits
  4i. One 16-byte vector load is one block of 32 inputs. Pair order lets the tensor-core
  kernels build a code tile in natural K order with one ``tl.join(lo, hi)`` (GGUF order
  needed two half-width dots over gathered x) and the dequantize kernel write whole rows
  contiguously; the GEMVs pair even inputs with the low nibbles of each byte and odd
  inputs with the high ones, as cheap as GGUF order.
- int8: int8 ``[N, K]`` signed codes, 32 bytes (two 16-byte vectors) per block of 32 inputs.
- scales and mins: float16 ``[N, K/G]`` (row-major: a program reads its own rows' groups;
  they are 1/16 of the int4 bytes at G=128, so their layout hardly matters). G is a
  multiple of 32 or the whole row, or (int8 only) 16: GGUF Q6_K's sub-blocks. A block of 32
  inputs then holds two groups; the CUDA-core kernels sum each half block's products apart
  (words 0-3 and 4-7) and scale them with their own group's scale (``GPB`` groups per
  block), the GEMM scales each weight of its tile (``SCALE_B``).

The CUDA-core kernel (``_quant_gemv_kernel``). At batch 1 every weight byte is read once,
so the figure of merit is memory bandwidth; at 4.8 TB/s an H200 streams ~30 int4 weights
per SM per clock, which leaves only ~4 instructions per weight. So:
- each thread loads whole 16-byte blocks (wide, contiguous, coalesced loads; ``stages``
  steps in flight through a cp.async ring); each program takes ``BLOCK_N`` whole rows and
  streams them in ``BLOCK_K`` steps. No split-K: at 4 bits a row of 4096 inputs is only
  2 KiB, so small ``BLOCK_N`` already gives hundreds of programs for N=4096 without an
  extra reduction kernel or atomics, and the result is the same on every launch;
- codes become floats without int->float conversions (16/clock/SM on Hopper, too slow) and
  without shifts: a code at bits SH..SH+3 of a word, masked in place and OR-ed into the bit
  pattern of 2**(23-SH), is the float 2**(23-SH) + q exactly (one LOP3), and one exact
  subtraction leaves q; int8 first flips the sign bits (q + 128, unsigned);
- the codes are multiplied by ``x`` in fp32 and summed per block of 32 (inside one thread,
  one FFMA chain per word), and only then scaled: ``acc += s * sum(q x) + m * sum(x)``, so
  scales and mins cost one load and two FMAs per 32 weights and the weights are never
  rounded (more exact than a dequantize-to-bf16 matmul).
Accumulation is fp32; the result is rounded once to the activation dtype. The
x-stationary kernel (``_quant_gemv_rows_kernel``) decodes the same way but converts x once
per program and loops over rows instead of K; ``kind=MMA`` runs the product through
``hearth_kernels/quant_gemm.py``'s tensor-core kernel (see ``GemvConfig``).

Configs are ``GemvConfig(block_n, block_k, warps, kind, stages)`` (a 3-tuple like
``hearth_kernels/gemv.py``'s also works); ``quant_gemv_configs`` lists those worth timing and the
engine's load-time tuner picks one per shape. The CUDA-core kernel needs K % 32 == 0 (int8
weights of other widths run the tensor-core kernel whatever the config says).
"""

from __future__ import annotations

import os
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hearth_kernels.gemv import tma_listed
from hearth_kernels.pdl import pdl_args, pdl_start, pdl_wait

#: inputs per packing block (GGUF's QK4_0); every group size is a multiple of it or K, or
#: (int8) ``SUB_GROUP``
BLOCK = 32
_MAGIC = 0x4B000000  # float32 bit pattern of 2**23: OR-ing q < 2**23 into it gives 2**23 + q


class PreparedQuant(NamedTuple):
    """A quantized weight in the kernels' layout (see the module docstring)."""

    bits: int
    group_size: int
    qweight: torch.Tensor  # int4: uint8 [N, K/2] GGUF-order; int8: int8 [N, K]
    scales: torch.Tensor  # float16 [N, K/G]
    mins: torch.Tensor | None  # float16 [N, K/G] or None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits == 4 else 1)


#: the one group size below a block the kernels take (int8 only): GGUF Q6_K's sub-blocks
SUB_GROUP = 16


def _check_groups(op: str, n: int, k: int, group_size: int, scales: torch.Tensor,
                  mins: torch.Tensor | None, sub_ok: bool = False) -> None:
    if group_size <= 0 or k % group_size:
        raise ValueError(f"{op}: group size {group_size} does not divide the {k} input features")
    if group_size % BLOCK and group_size != k and not (sub_ok and group_size == SUB_GROUP):
        raise ValueError(f"{op}: group size {group_size} is not a multiple of {BLOCK} (nor the whole row"
                         + (f", nor {SUB_GROUP}" if sub_ok else "") + "); "
                         "the GPU kernels read whole blocks of 32 inputs: pick 32, 64 or 128")
    want = (n, k // group_size)
    for name, t in (("scales", scales), ("mins", mins)):
        if t is None:
            continue
        if tuple(t.shape) != want or t.dtype != torch.float16:
            raise ValueError(f"{op}: {name} must be float16 {list(want)}, got {t.dtype} {list(t.shape)}")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (the kernels view codes as int32 words and load
    16-byte vectors; a slice of a larger tensor may start anywhere)."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def prepare_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 group_size: int) -> PreparedQuant:
    """An int4 weight (canonical layout: uint8 [N, K/2] GGUF-order codes 0..15, float16
    scales and mins [N, K/G]) for ``quant_gemv`` / ``quant_gemm``: the codes are repacked
    into pair order (``pair_nibbles``, once at load; same bytes), the rest kept."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"prepare_int4: qweight must be uint8 [N, K/2], got {qweight.dtype} {list(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if k % BLOCK:
        raise ValueError(f"prepare_int4: int4 needs K a multiple of {BLOCK}, got {k}")
    if mins is None:
        raise ValueError("prepare_int4: int4 weights always have mins (symmetric ones: -8 * scale)")
    _check_groups("prepare_int4", n, k, group_size, scales, mins)
    return PreparedQuant(4, group_size, _paired(qweight), scales.contiguous(), mins.contiguous())


#: id(canonical codes) -> (weak ref to them, their version, the pair-order copy): the
#: load-time tuner prepares the same layer once per candidate config; they share one copy
_PAIRED: dict[int, tuple] = {}


def forget_paired(qweight: torch.Tensor) -> None:
    """Drop the cached pair-order copy of ``qweight`` (its owner now holds that copy)."""
    _PAIRED.pop(id(qweight), None)


def _paired(qweight: torch.Tensor) -> torch.Tensor:
    """``pair_nibbles(qweight)``, made once per tensor (and again after an in-place change)."""
    key = id(qweight)
    hit = _PAIRED.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == qweight._version:
        return hit[2]
    packed = pair_nibbles(qweight)
    _PAIRED[key] = (weakref.ref(qweight), qweight._version, packed)
    weakref.finalize(qweight, _PAIRED.pop, key, None)
    return packed


def unpair_nibbles(paired: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pair_nibbles``: pair-order codes back in GGUF order (canonical)."""
    n, half = paired.shape
    codes = torch.stack((paired & 15, paired >> 4), dim=-1).reshape(n, half // 16, 32)  # inputs 0..31
    return (codes[..., :16] | (codes[..., 16:] << 4)).reshape(n, half)


def pair_nibbles(qweight: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """GGUF-order int4 codes (byte j of a block of 32 inputs: input j low, j + 16 high)
    repacked into pair order (byte j: input 2j low, 2j + 1 high), so that one int32 word
    holds 8 consecutive inputs, nibble i = input 8w + i. Pair order is what the tensor-core
    kernels want (``tl.join(lo, hi)`` of a byte tile is the natural K order, no gather of
    x) and what the dequantize kernel writes contiguously; the GEMVs decode it as cheaply
    as GGUF order. Chunked over rows: the temporary is ``rows_per_chunk * K`` bytes."""
    n, half = qweight.shape
    out = torch.empty((n, half), dtype=torch.uint8, device=qweight.device)
    for r0 in range(0, n, rows_per_chunk):
        q = qweight[r0:r0 + rows_per_chunk].reshape(-1, half // 16, 16)
        codes = torch.cat((q & 15, q >> 4), dim=2)  # [rows, blocks, 32]: inputs 0..31 of each block
        pairs = codes.reshape(codes.shape[0], half // 16, 16, 2)
        out[r0:r0 + rows_per_chunk] = (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(-1, half)
    return out


def prepare_int8(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 group_size: int) -> PreparedQuant:
    """An int8 weight (int8 [N, K] codes, float16 scales [N, K/G], optional float16 mins;
    G may be ``SUB_GROUP``) for ``quant_gemv`` / ``quant_gemm``. Nothing is repacked."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"prepare_int8: qweight must be int8 [N, K], got {qweight.dtype} {list(qweight.shape)}")
    n, k = qweight.shape
    _check_groups("prepare_int8", n, k, group_size, scales, mins, sub_ok=True)
    return PreparedQuant(8, group_size, _aligned(qweight), scales.contiguous(),
                         None if mins is None else mins.contiguous())


@triton.jit
def _code_at(w, magic, SH: tl.constexpr, WIDTH: tl.constexpr, OFFSET: tl.constexpr):
    """The ``WIDTH``-bit code at bits SH.. of int32 words ``w``, minus ``OFFSET``, as exact
    float32 with one LOP3 and one FADD: masked in place, the bits become the low mantissa
    bits of 2**(23 - SH), whose mantissa step is 1, so the float is 2**(23 - SH) + code
    (needs SH + WIDTH <= 23). ``magic`` is the bit pattern of 2**23 (0x4B000000) passed at
    run time: a constant would be folded into a second LOP3 (a LOP3 takes one immediate),
    a register operand lets ptxas do mask-and-or in one."""
    MASK: tl.constexpr = ((1 << WIDTH) - 1) << SH
    return ((w & MASK) | (magic - (SH << 23))).to(tl.float32, bitcast=True) - (2.0 ** (23 - SH) + OFFSET)


@triton.jit
def _block_groups(kb, blk_ok, GROUP: tl.constexpr, GPB: tl.constexpr):
    """The group of each of the ``GPB`` groups of each block of 32 inputs starting at ``kb``
    [NB]: [NB * GPB] (0 for blocks beyond K)."""
    if GPB == 1:
        return tl.where(blk_ok, kb // GROUP, 0)
    else:
        NB: tl.constexpr = kb.shape[0]
        g = kb[:, None] // GROUP + tl.arange(0, GPB)[None, :]
        return tl.reshape(tl.where(blk_ok[:, None], g, 0), [NB * GPB])


@triton.jit
def _group_sums(p, GPB: tl.constexpr):
    """Per-word values [A, NB, WPB] summed per group: [A, NB * GPB] (a block's words split
    into ``GPB`` runs of consecutive words, one group each)."""
    A: tl.constexpr = p.shape[0]
    NB: tl.constexpr = p.shape[1]
    WPB: tl.constexpr = p.shape[2]
    if GPB == 1:
        return tl.sum(p, axis=2)
    else:
        return tl.reshape(tl.sum(tl.reshape(p, [A, NB, GPB, WPB // GPB]), axis=3), [A, NB * GPB])


@triton.jit
def _split4(x):
    """[A, B, 4] -> its four [A, B] slices along the last axis (register moves only)."""
    A: tl.constexpr = x.shape[0]
    B: tl.constexpr = x.shape[1]
    even, odd = tl.split(tl.reshape(x, [A, B, 2, 2]))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _load_x_blocks(x_ptr, kb, K, BITS: tl.constexpr, SWIGLU: tl.constexpr):
    """x (float32, SwiGLU applied) for the blocks of 32 inputs starting at ``kb`` [NB], in
    the codes' word order: int4 (word j: inputs 8j..8j+7) the even inputs' [NB, 4] x0..x3
    (x0[:, j] = x[kb + 8j], x1 = x[kb + 8j + 2], ...) and the odd ones' h0..h3; int8 (word
    j: inputs 4j..4j+3) x0..x3 with x_b[:, j] = x[kb + 4j + b] (h0..h3 = x0..x3). Each
    block is loaded whole (contiguous, so the loads are 16-byte vectors) and split in
    registers: strided per-input loads made the prologue a long chain of 2-byte loads (half
    of a long-row layer's time in the H200 profile)."""
    xk = kb[:, None] + tl.arange(0, 32)[None, :]
    return _split_x_blocks(_load_x(x_ptr, xk, K, xk < K, SWIGLU, False), BITS)


@triton.jit
def _split_x_blocks(xv, BITS: tl.constexpr):
    """Blocks of x [NB, 32] split as ``_load_x_blocks`` returns them."""
    NB: tl.constexpr = xv.shape[0]
    if BITS == 4:
        even, odd = tl.split(tl.reshape(xv, [NB, 4, 4, 2]))  # [NB, word, pair]
        x0, x1, x2, x3 = _split4(even)
        h0, h1, h2, h3 = _split4(odd)
        return x0, x1, x2, x3, h0, h1, h2, h3
    else:
        x0, x1, x2, x3 = _split4(tl.reshape(xv, [NB, 8, 4]))
        return x0, x1, x2, x3, x0, x1, x2, x3


@triton.jit
def _load_x(x_ptr, k, K, mask, SWIGLU: tl.constexpr, EVEN_K: tl.constexpr):
    """x[k] as float32 (with SWIGLU: silu(x[k]) * x[K + k], rounded like the eager ops)."""
    dt = x_ptr.dtype.element_ty
    if SWIGLU:
        if EVEN_K:
            g = tl.load(x_ptr + k).to(tl.float32)
            u = tl.load(x_ptr + K + k).to(tl.float32)
        else:
            g = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + k, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        return (act * u).to(dt).to(tl.float32)
    else:
        if EVEN_K:
            return tl.load(x_ptr + k).to(tl.float32)
        else:
            return tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _step_load(q_ptr, s_ptr, m_ptr, rows, ok, N, stride_qn, stride_sn, word, grp, blk_ok, HAS_MIN: tl.constexpr):
    """One step's codes [R, blocks, words], scales and mins [R, blocks] (the scales again
    without mins) for ``rows``; rows beyond N or not ``ok`` load nothing (zeros)."""
    ok = ok & (rows < N)
    rows = tl.where(ok, rows, 0).to(tl.int64)
    w = tl.load(q_ptr + rows[:, None, None] * stride_qn + word, mask=ok[:, None, None] & blk_ok[None, :, None],
                other=0, eviction_policy="evict_first")
    sg = rows[:, None] * stride_sn + grp[None, :]
    scale = tl.load(s_ptr + sg, mask=ok[:, None], other=0.0)
    return w, scale, (tl.load(m_ptr + sg, mask=ok[:, None], other=0.0) if HAS_MIN else scale)


@triton.jit
def _steps_start(q_ptr, s_ptr, m_ptr, first, r, N, stride_qn, stride_sn, word, grp, blk_ok, HAS_MIN: tl.constexpr,
                 ROWS: tl.constexpr, R: tl.constexpr, LEAD: tl.constexpr):
    """The x-stationary kernels' software pipeline, written out in registers: each step's
    codes, scales and mins are loaded ``LEAD`` (0-2) steps ahead of their use. Triton's own
    pipeliner copies the codes asynchronously but leaves the fp16 scale gathers (2 bytes,
    too narrow for its copies) synchronous, so every step waited a whole memory round trip
    for its scales: most of a narrow layer's time in the H200 profile. This loads the
    first ``LEAD`` steps: (a, b) state for ``_steps_next``."""
    w_a, s_a, m_a = _step_load(q_ptr, s_ptr, m_ptr, first + r, (r < ROWS) & (LEAD > 0), N, stride_qn, stride_sn,
                               word, grp, blk_ok, HAS_MIN)
    if LEAD > 1:
        w_b, s_b, m_b = _step_load(q_ptr, s_ptr, m_ptr, first + R + r, R + r < ROWS, N, stride_qn, stride_sn, word,
                                   grp, blk_ok, HAS_MIN)
    else:
        w_b, s_b, m_b = w_a, s_a, m_a
    return w_a, s_a, m_a, w_b, s_b, m_b


@triton.jit
def _steps_next(q_ptr, s_ptr, m_ptr, rows, r0, r, N, stride_qn, stride_sn, word, grp, blk_ok, w_a, s_a, m_a,
                w_b, s_b, m_b, HAS_MIN: tl.constexpr, ROWS: tl.constexpr, R: tl.constexpr, LEAD: tl.constexpr):
    """The step at ``rows`` (its codes, float32 scales and mins) and the state after it,
    loading the step ``LEAD`` ahead (see ``_steps_start``)."""
    if LEAD == 0:
        w, s, m = _step_load(q_ptr, s_ptr, m_ptr, rows, r0 + r < ROWS, N, stride_qn, stride_sn, word, grp, blk_ok,
                             HAS_MIN)
    elif LEAD == 1:
        w, s, m = w_a, s_a, m_a
        w_a, s_a, m_a = _step_load(q_ptr, s_ptr, m_ptr, rows + R, r0 + R + r < ROWS, N, stride_qn, stride_sn, word,
                                   grp, blk_ok, HAS_MIN)
    else:
        w, s, m = w_a, s_a, m_a
        w_a, s_a, m_a = w_b, s_b, m_b
        w_b, s_b, m_b = _step_load(q_ptr, s_ptr, m_ptr, rows + 2 * R, r0 + 2 * R + r < ROWS, N, stride_qn,
                                   stride_sn, word, grp, blk_ok, HAS_MIN)
    return w, s.to(tl.float32), m.to(tl.float32), w_a, s_a, m_a, w_b, s_b, m_b


@triton.jit
def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, N, K, stride_qn, stride_sn, magic,
                       GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       STAGES: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    pdl_wait(PDL)  # (hearth_kernels/pdl.py)
    # q_ptr: the codes as int32 words (stride_qn in words). A block of 32 inputs is WPB
    # words; word j of a block holds (int4) inputs 4j..4j+3 in the low nibbles of its bytes
    # and 16+4j..16+4j+3 in the high ones, (int8) inputs 4j..4j+3.
    NB: tl.constexpr = BLOCK_K // 32  # blocks per step
    WPB: tl.constexpr = 4 if BITS == 4 else 8
    GPB: tl.constexpr = 32 // GROUP if GROUP < 32 else 1  # groups per block (2: int8 in groups of 16)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_safe = tl.where(row_ok, rows, 0).to(tl.int64)  # clamp: loads stay in bounds unmasked
    blk = tl.arange(0, NB)
    j = tl.arange(0, WPB)
    b4 = tl.arange(0, 4)
    q_rows = q_ptr + rows_safe[:, None, None] * stride_qn
    s_rows = s_ptr + rows_safe[:, None] * stride_sn
    m_rows = m_ptr + rows_safe[:, None] * stride_sn
    acc = tl.zeros([BLOCK_N, NB * GPB], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):  # STAGES > 1: cp.async ring of steps in flight
        kb = k0 + blk * 32  # first input of each block [NB]
        blk_ok = kb < K  # K is a multiple of 32: a block is all in or all out
        grp = _block_groups(kb, blk_ok, GROUP, GPB)  # [NB * GPB]
        w_ptrs = q_rows + (kb // (32 // WPB))[None, :, None] + j[None, None, :]
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=blk_ok[None, :, None], other=0, eviction_policy="evict_first")
        if BITS == 4:  # pair order: word j holds inputs 8j..8j+7, nibble i at bits 4i
            xk = kb[:, None, None] + 8 * j[None, :, None] + 2 * b4[None, None, :]  # [NB, WPB, 4] even inputs
        else:
            xk = kb[:, None, None] + 4 * j[None, :, None] + b4[None, None, :]  # [NB, WPB, 4]
        ok = xk < K
        x0, x1, x2, x3 = _split4(_load_x(x_ptr, xk, K, ok, SWIGLU, EVEN_K))
        if BITS == 4:
            h0, h1, h2, h3 = _split4(_load_x(x_ptr, xk + 1, K, ok, SWIGLU, EVEN_K))  # the odd inputs
            w2 = w >> 12  # nibbles at bits 20, 24, 28 move to 8, 12, 16
            # one multiply-add chain per word (left to right: FMUL then FFMAs)
            p3 = (_code_at(w, magic, 0, 4, 0) * x0[None] + _code_at(w, magic, 4, 4, 0) * h0[None]
                  + _code_at(w, magic, 8, 4, 0) * x1[None] + _code_at(w, magic, 12, 4, 0) * h1[None]
                  + _code_at(w, magic, 16, 4, 0) * x2[None] + _code_at(w2, magic, 8, 4, 0) * h2[None]
                  + _code_at(w2, magic, 12, 4, 0) * x3[None] + _code_at(w2, magic, 16, 4, 0) * h3[None])
            if HAS_MIN:
                xsum = tl.sum(x0 + x1 + x2 + x3 + h0 + h1 + h2 + h3, axis=1)
        else:
            u = w ^ -0x7F7F7F80  # 0x80808080 as int32: each byte becomes q + 128 (0..255)
            u2 = u >> 16  # bytes 2, 3 move to bits 0, 8
            p3 = (_code_at(u, magic, 0, 8, 128) * x0[None] + _code_at(u, magic, 8, 8, 128) * x1[None]
                  + _code_at(u2, magic, 0, 8, 128) * x2[None] + _code_at(u2, magic, 8, 8, 128) * x3[None])
            if HAS_MIN:
                xsum = tl.reshape(_group_sums((x0 + x1 + x2 + x3)[None], GPB), [NB * GPB])
        part = _group_sums(p3, GPB)  # [BLOCK_N, NB * GPB]: sum(q x) per group of each block
        # a group never straddles two blocks (G is a multiple of 32, the whole row, or 16)
        s = tl.load(s_rows + grp[None, :]).to(tl.float32)
        acc += part * s
        if HAS_MIN:
            m = tl.load(m_rows + grp[None, :]).to(tl.float32)
            acc += m * xsum[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _quant_gemv_rows_kernel(x_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, N, K, stride_qn, stride_sn, magic,
                            GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr,
                            HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, ROWS: tl.constexpr,
                            R: tl.constexpr, KP: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    # x-stationary: the program loads (and converts, and sums per block) the whole x once,
    # keeps it in registers (K / threads values each), then streams its ROWS rows R at a
    # time, each thread one 16-byte vector per row, and reduces each row across the program.
    # Codes are decoded as in _quant_gemv_kernel. KP: K rounded up to a power of 2.
    NB: tl.constexpr = KP // 32
    WPB: tl.constexpr = 4 if BITS == 4 else 8
    GPB: tl.constexpr = 32 // GROUP if GROUP < 32 else 1  # groups per block (2: int8 in groups of 16)
    blk = tl.arange(0, NB)
    j = tl.arange(0, WPB)
    kb = blk * 32
    blk_ok = kb < K
    grp = _block_groups(kb, blk_ok, GROUP, GPB)  # [NB * GPB]
    r = tl.arange(0, R)
    word = (kb // (32 // WPB))[None, :, None] + j[None, None, :]
    first = tl.program_id(0) * ROWS
    # steps loaded ahead (``_steps_start``): one from 16 warps on (128 registers a thread);
    # requested before x, whose kernel PDL waits for only now (hearth_kernels/pdl.py)
    LEAD: tl.constexpr = max(0, min(STAGES - 1, 1 if KP >= 16384 else 2))
    w_a, s_a, m_a, w_b, s_b, m_b = _steps_start(q_ptr, s_ptr, m_ptr, first, r, N, stride_qn, stride_sn, word, grp,
                                                blk_ok, HAS_MIN, ROWS, R, LEAD)
    pdl_wait(PDL)
    # pair order: word j holds inputs 8j..8j+7, nibble i at bits 4i (even inputs x, odd h)
    x0, x1, x2, x3, h0, h1, h2, h3 = _load_x_blocks(x_ptr, kb, K, BITS, SWIGLU)
    if BITS == 4:
        xsum = tl.sum(x0 + x1 + x2 + x3 + h0 + h1 + h2 + h3, axis=1)
    else:
        xsum = tl.reshape(_group_sums((x0 + x1 + x2 + x3)[None], GPB), [NB * GPB])
    for r0 in range(0, ROWS, R):
        rows = first + r0 + r
        row_ok = (rows < N) & (r0 + r < ROWS)  # R need not divide ROWS
        rows_safe = tl.where(row_ok, rows, 0).to(tl.int64)
        w, scale, mins, w_a, s_a, m_a, w_b, s_b, m_b = _steps_next(
            q_ptr, s_ptr, m_ptr, rows, r0, r, N, stride_qn, stride_sn, word, grp, blk_ok, w_a, s_a, m_a, w_b, s_b,
            m_b, HAS_MIN, ROWS, R, LEAD)
        if BITS == 4:
            w2 = w >> 12
            p3 = (_code_at(w, magic, 0, 4, 0) * x0[None] + _code_at(w, magic, 4, 4, 0) * h0[None]
                  + _code_at(w, magic, 8, 4, 0) * x1[None] + _code_at(w, magic, 12, 4, 0) * h1[None]
                  + _code_at(w, magic, 16, 4, 0) * x2[None] + _code_at(w2, magic, 8, 4, 0) * h2[None]
                  + _code_at(w2, magic, 12, 4, 0) * x3[None] + _code_at(w2, magic, 16, 4, 0) * h3[None])
        else:
            u = w ^ -0x7F7F7F80
            u2 = u >> 16
            p3 = (_code_at(u, magic, 0, 8, 128) * x0[None] + _code_at(u, magic, 8, 8, 128) * x1[None]
                  + _code_at(u2, magic, 0, 8, 128) * x2[None] + _code_at(u2, magic, 8, 8, 128) * x3[None])
        t = _group_sums(p3, GPB) * scale  # [R, NB * GPB]
        if HAS_MIN:
            t += mins * xsum[None, :]
        y = tl.sum(t, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows_safe).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


KLOOP, MMA, ROWS, SWAP, SWAP_SCALED, DP4A, DP4A_TMA = 0, 1, 2, 3, 4, 5, 6  # GemvConfig.kind


class GemvConfig(NamedTuple):
    """How ``quant_gemv`` runs (instruction counts are from the sm_90 build; streaming int4
    at 4.8 TB/s leaves about 4 instructions per weight, int8 about 8).

    ``kind=ROWS`` (2): ``_quant_gemv_rows_kernel``, x-stationary: a program converts the
    whole x once into registers, then streams ``block_n`` rows, ``block_k`` rows per step,
    ``stages`` steps in flight; warps are raised to K/1024 so that each thread holds one
    block of x. About 4.4 (4 rows per step) to 5 (2 rows) instructions per int4 weight;
    needs K <= 32768.
    ``kind=KLOOP`` (0): ``_quant_gemv_kernel``, ``block_n`` rows per program streamed in
    ``block_k``-input steps (x re-read per step). About 5.4 (4 rows per thread), 6.4 (2) or
    7.3 (1) per int4 weight, 6-7 per int8 weight.
    ``kind=MMA`` (1): the fused kernel of ``hearth_kernels/quant_gemm.py`` with one 16-row tile (x
    padded with masked rows) and a ``block_n``-column weight tile on the tensor cores, K
    steps of ``block_k``: about 5.1 per int4 weight (3.6 per int8) with 128 columns but 4-6x
    that with 16 (its per-step x work is fixed), so only for large N (gate_up, lm_head).
    ``kind=SWAP`` (3, int4): ``hearth_kernels/quant_mma.py``'s weight-stationary tensor-core kernel
    (the weight tile is the dot's tall side, x padded to 16 columns the narrow one; codes
    decoded two per LOP3), ``block_n`` weight rows per program, ``block_k``-input steps,
    ``stages`` in flight, K split over ``split`` programs per tile (a last-arriving fixup,
    no extra kernel). About 4.4 instructions per int4 weight in the sm_90 build, but each
    step waits for its dot (the group's scale is applied to the product). ``kind=SWAP_SCALED``
    (4): the same kernel dequantizing the weight tile in registers (about 6.8 instructions
    per weight, rounded to bf16 like the dequantize path), its dots left in flight.
    ``kind=DP4A`` (5): ``hearth_kernels/quant_dp4a.py``, x-stationary like ROWS but with x
    quantized to int8 per block of 32 and the codes multiplied by it with ``dp4a`` (about 1
    instruction per int4 weight instead of 4.4-5; the activations' rounding to 8 bits is the
    price, as in llama.cpp's CUDA decode): ``block_n`` rows per program, ``block_k`` rows per
    step, ``warps`` (fewer: more blocks of x per thread, fewer reductions), ``split``
    programs per row block along K (the last to arrive adds the partial sums).
    ``kind=DP4A_TMA`` (6, int4 and int8, Hopper and newer): the same integer dots in a K loop
    (``quant_dp4a.quant_gemv_dp4a_tma``): x quantized once first, ``block_n`` rows per
    program, K steps of ``block_k`` inputs whose weight tiles come by TMA, ``stages`` - 1
    ahead (bytes in flight that cost no registers).
    Which wins is for the GPU to say: ``quant_gemv_configs`` lists all the kinds.
    """

    block_n: int
    block_k: int
    warps: int
    kind: int = KLOOP
    stages: int = 3  # software-pipelining depth (steps in flight per program)
    split: int = 1  # SWAP: programs per output tile along K
    qx: int = 0  # DP4A: 1 quantizes x (and the norm, SwiGLU) in one kernel first, not in every program


def default_quant_config(n: int, k: int, bits: int) -> GemvConfig:
    """The first config to time: x-stationary, 16 rows per program in steps of 2 (N=4096
    gives 256 programs, ~2 per SM of an H100/H200), 3 steps in flight; the K-loop kernel
    (16 rows x 512 inputs per step) for rows longer than 32768."""
    if k <= _ROWS_MAX_K:
        return GemvConfig(16, 2, 4, ROWS, 3)
    return GemvConfig(16, 512, 4, KLOOP, 3)


_ROWS_MAX_K = 32768  # x-stationary: 1024 threads x one block of 32 inputs each

#: Configs worth timing at real shapes, after the default (few: the load-time tuner
#: compiles each). The first H200 profile (benchmarks/results/2026-12-01-i14-profile-quant-
#: gemv-8b-h200.json) had the x-stationary kernel best everywhere but the large-N int8
#: layers (tensor-core kernel) and looked latency-bound, so: x-stationary with few rows per
#: program all loaded in one step (the most bytes in flight per program, the most
#: programs), its earlier winners, one K-loop, and the tensor-core kernel (pair-order codes
#: now give it full-width dots) with wide column tiles and deep pipelines for large N.
#: The second H200 profile (...-v2.json) never picked 4- or 8-row x-stationary programs
#: nor the widest tensor-core tiles: those are gone; the weight-stationary int4 kernel
#: (SWAP) comes in with its split-K variants for the narrow layers.
_QUANT_CONFIGS = (GemvConfig(8, 2, 4, ROWS, 3), GemvConfig(32, 2, 4, ROWS, 4), GemvConfig(32, 4, 4, ROWS, 3),
                  GemvConfig(8, 512, 4, KLOOP, 3),
                  GemvConfig(128, 128, 4, MMA, 4), GemvConfig(64, 128, 4, MMA, 5))


#: the dp4a kernel's configs worth timing (hearth_kernels/quant_dp4a.py) and the longest row it
#: takes (quant_dp4a.DP4A_MAX_K). The H200 profiles (benchmarks/results/2026-12-02-i14-
#: profile-quant-dp4a-8b-h200.json; ...-dp4a-wide-...json after the steps were loaded ahead in
#: registers) had dp4a fastest at every Llama-8B layer, int4 and int8; these are the winners
#: and runners-up of the wide sweep: 8-16 rows per program for the narrow layers (qkv, o),
#: 16-32 for gate_up and the head, 8 warps for the long rows of down; one step ahead
#: (stages 2) mostly, two for int4's narrow layers.
_DP4A_CONFIGS = (GemvConfig(16, 4, 4, DP4A, 3), GemvConfig(16, 4, 4, DP4A, 2), GemvConfig(8, 4, 4, DP4A, 2),
                 GemvConfig(16, 2, 4, DP4A, 2), GemvConfig(32, 2, 4, DP4A, 2), GemvConfig(32, 4, 8, DP4A, 2),
                 GemvConfig(32, 2, 8, DP4A, 2),
                 # K split among 2-4 programs per row block: a long row's (down) fixed cost was
                 # most of its time with one program per 32 rows (~1 per SM)
                 GemvConfig(16, 4, 4, DP4A, 2, 2), GemvConfig(32, 4, 4, DP4A, 2, 4), GemvConfig(16, 2, 4, DP4A, 2, 4),
                 # x quantized once by a kernel of its own: the best in the H200 profile of gate_up and
                 # down (2-3 us less than quantizing in each program, the quantizing kernel outside;
                 # benchmarks/results/2026-12-04-i14-profile-dp4a-qx-8b-h200-4e5d0f8.json)
                 GemvConfig(8, 2, 4, DP4A, 2, 1, 1), GemvConfig(16, 2, 4, DP4A, 2, 4, 1),
                 GemvConfig(16, 2, 4, DP4A, 2, 1, 1), GemvConfig(8, 2, 4, DP4A, 3, 1, 1),
                 # rows per program that aren't a power of 2: an H100 sweep had q/k/v at 12 rows
                 # (5.81 us against 6.27) and gate_up at 28 (23.2 against 23.7) ahead of the
                 # configs above (benchmarks/results/2026-12-05-i14-dp4a-wavefit-*-8b-h100-955f6d2.json)
                 GemvConfig(12, 4, 4, DP4A, 2), GemvConfig(28, 2, 4, DP4A, 2))
_DP4A_MAX_K = 32768  # 32 warps x 32 lanes x one block of 32 inputs each
#: the TMA kind's configs worth timing (int4 K steps; int8 takes half as many inputs, the
#: same bytes): the best of H100 sweeps with the weights in L2 (where memory outruns the
#: kernels, as on an H200; int4 down 8.2 us against the x-stationary kernel's 13.4, int8 half
#: of down 7.2 against 12.1) and from HBM (gate_up's best at 2 steps in flight)
#: (benchmarks/results/2026-12-06-i14-profile-dp4a-tma-l2-int{4,8}-h100-e6da456.json,
#: ...-profile-dp4a-tma-int4-h100-f5d41f3.json)
_DP4A_TMA_CONFIGS = (GemvConfig(16, 2048, 4, DP4A_TMA, 6), GemvConfig(32, 2048, 4, DP4A_TMA, 6),
                     GemvConfig(32, 1024, 4, DP4A_TMA, 8), GemvConfig(16, 2048, 4, DP4A_TMA, 4),
                     GemvConfig(16, 1024, 4, DP4A_TMA, 2))


def dp4a_enabled() -> bool:
    """Whether the load-time tuner times the dp4a kernel: yes unless ``HEARTH_QUANT_DP4A=0``
    (it rounds x to 8 bits per block of 32; the tuner still checks its product against the
    reference on the card before timing it)."""
    return os.environ.get("HEARTH_QUANT_DP4A", "1") != "0"


def quant_gemv_configs(n: int, k: int, bits: int, group: int | None = None) -> list[GemvConfig]:
    """The configs worth timing for an [n, k] weight of ``bits`` bits (``group`` inputs per
    scale; int4's default 128), in timing order: ``default_quant_config`` first, then the
    others (no repeats, K steps no wider than the row), int4's weight-stationary ones last.
    Groups of 16 (int8) get the two CUDA-core kernels and the dp4a ones (which scale each
    half block apart), not the tensor-core ones (never timed for them: their tile would be
    scaled weight by weight in registers)."""
    widest = triton.next_power_of_2(max(k, BLOCK))
    sub = group is not None and group < BLOCK and k % BLOCK == 0  # int8 in groups of 16: no tensor-core kernels
    out = []
    for cfg in (default_quant_config(n, k, bits), *_QUANT_CONFIGS):
        if cfg.kind == ROWS and (k > _ROWS_MAX_K or k % BLOCK):
            continue
        if sub and cfg.kind not in (KLOOP, ROWS):
            continue
        if cfg.kind != ROWS:
            cfg = cfg._replace(block_k=min(cfg.block_k, widest))
        if cfg not in out:
            out.append(cfg)
    if k % BLOCK == 0 and k <= _DP4A_MAX_K and dp4a_enabled():
        from hearth_kernels.quant_dp4a import dp4a_launch

        launches = set()
        for cfg in _DP4A_CONFIGS:  # configs that launch the same kernel the same way are timed once
            launch = (cfg.block_n, cfg.stages, cfg.qx, *dp4a_launch(cfg.block_n, cfg.block_k, cfg.warps, k, cfg.split))
            if launch not in launches:
                launches.add(launch)
                out.append(cfg)
    if k % BLOCK == 0 and dp4a_enabled() and tma_listed():
        from hearth_kernels.quant_dp4a import dp4a_tma_problem

        g = group or (min(k, 128) if bits == 4 else k)
        for cfg in _DP4A_TMA_CONFIGS:  # int8: steps of half the inputs (the same bytes)
            cfg = cfg._replace(block_k=min(cfg.block_k * 4 // bits, triton.next_power_of_2(k)))
            if cfg not in out and dp4a_tma_problem(k, bits, g, cfg.block_n, cfg.block_k, cfg.stages) is None:
                out.append(cfg)
    if sub:
        return out
    if bits == 4 and k % 16 == 0:
        from hearth_kernels.quant_mma import mma_configs

        group = group or min(k, 128)
        # two: the default for the shape and the next best in the H200 profiles; they came
        # within 5-15% of the x-stationary kernel there but never won, and each candidate
        # costs a compile at every load
        for c in mma_configs(1, n, k, bits, group)[:2]:
            out.append(GemvConfig(c.block_n, c.block_k, c.warps, SWAP_SCALED if c.scale_w else SWAP, c.stages,
                                  c.split_k))
    return out


def norm_fusable(prepared: PreparedQuant, config: tuple | None) -> bool:
    """Whether ``quant_gemv_normed`` runs the RMSNorm inside ``config``'s kernels: in the GEMV's
    prologue (a dp4a config with the row in one program) or in the kernel that quantizes x
    for it (``qx``); otherwise it runs the norm kernel first."""
    if config is None:
        return False
    cfg = GemvConfig(*config)
    k = prepared.in_features
    if cfg.kind == DP4A_TMA:  # x is quantized (the norm with it, one program holding the row) by a kernel of its own
        return k % BLOCK == 0 and k <= _DP4A_MAX_K
    return ((norm_in_prologue(cfg) or (cfg.kind == DP4A and cfg.qx)) and k % BLOCK == 0 and k <= _DP4A_MAX_K
            and (prepared.group_size >= BLOCK or prepared.group_size == SUB_GROUP))


def norm_in_prologue(config: tuple) -> bool:
    """Whether ``config``'s GEMV would repeat the norm in each program's prologue (a dp4a
    config with the row in one program, x not quantized beforehand), shapes permitting."""
    cfg = GemvConfig(*config)
    return cfg.kind == DP4A and cfg.split <= 1 and not cfg.qx


def quant_gemv_normed(x: torch.Tensor, prepared: PreparedQuant, weight: torch.Tensor, eps: float, *,
                      residual: torch.Tensor | None = None, config: tuple | None = None,
                      out: torch.Tensor | None = None, bias: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quant_gemv(rms_norm(s)), s)`` for one row, where ``s = x + residual`` rounded to x's
    dtype (``s = x`` without a residual): the norm before a projection
    (``hearth_kernels/rmsnorm.fused_add_rms_norm``, then ``quant_gemv``) inside the GEMV's
    kernels when ``norm_fusable``. A dp4a config with the row in one program: each program
    holds the whole row of x, so each computes the mean of squares itself and program 0
    writes ``s`` (a new tensor, never ``residual``: other programs still read it); that
    saves the norm's launch and its round trip through memory. A ``qx`` config (K split or
    not): the kernel that quantizes x once for all the programs does the same, in one
    program. Either way ``weight * s`` is quantized per block and the norm's scalar put on
    each block's scale, so the normalised input is never rounded to the activation dtype:
    closer to the float norm than the two kernels, which differ from it by those roundings
    (at most one of the 8-bit levels per input, and 2^-8 of a block's scale)."""
    k = prepared.in_features
    _check_x("quant_gemv_normed", x, k, False)
    if x.shape[0] != 1:
        raise ValueError(f"quant_gemv_normed: x must be one row [1, K], got {list(x.shape)}")
    if tuple(weight.shape) != (k,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"quant_gemv_normed: the norm's weight must be a contiguous {x.dtype} [{k}] tensor, "
                         f"got {weight.dtype} {list(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"quant_gemv_normed: residual must be {x.dtype} {list(x.shape)}, "
                         f"got {residual.dtype} {list(residual.shape)}")
    if not norm_fusable(prepared, config):
        from hearth_kernels.rmsnorm import fused_add_rms_norm, rms_norm

        if residual is None:
            h, s = rms_norm(x, weight, eps), x
        else:
            h, s = fused_add_rms_norm(x, residual, weight, eps)
        return quant_gemv(h, prepared, config=config, out=out, bias=bias), s
    from hearth_kernels.quant_dp4a import quant_gemv_dp4a

    n = prepared.out_features
    out = _check_bias_out("quant_gemv_normed", x, 1, n, bias, out)
    x = x.contiguous()
    s = x if residual is None else torch.empty_like(x)
    residual = None if residual is None else residual.contiguous()
    cfg = GemvConfig(*config)
    if cfg.kind == DP4A_TMA:
        from hearth_kernels.quant_dp4a import quant_gemv_dp4a_tma

        quant_gemv_dp4a_tma(x, prepared, out, bias, False, cfg.block_n, cfg.block_k, cfg.warps, max(1, cfg.stages),
                            norm=(residual, weight, float(eps), s))
        return out, s
    quant_gemv_dp4a(x, prepared, out, bias, False, cfg.block_n, cfg.block_k, cfg.warps, max(1, cfg.stages),
                    cfg.split if cfg.qx else 1, norm=(residual, weight, float(eps), s), qx=bool(cfg.qx))
    return out, s


def _check_x(op: str, x: torch.Tensor, k: int, swiglu: bool) -> None:
    want = 2 * k if swiglu else k
    if x.dim() != 2 or x.shape[1] != want:
        raise ValueError(f"{op}: x must be [rows, {want}]" + (" ([gate | up] of the MLP)" if swiglu else "")
                         + f" for this weight, got {list(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{op}: x must be bfloat16, float16 or float32, got {x.dtype}")


def _check_bias_out(op: str, x: torch.Tensor, rows: int, n: int, bias: torch.Tensor | None,
                    out: torch.Tensor | None) -> torch.Tensor:
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"{op}: bias must be a contiguous [{n}] tensor, got {list(bias.shape)}")
    if out is None:
        return torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (rows, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous {x.dtype} [{rows}, {n}] tensor, "
                         f"got {out.dtype} {list(out.shape)}")
    return out


def rows_launch(cfg: GemvConfig, k: int) -> tuple[int, int, int]:
    """(KP, R, num_warps) of the x-stationary kernel for a ``kind=ROWS`` config and K: K
    rounded up to a power of 2; warps raised to KP/1024 so that each thread holds one block
    of x; at most 2 rows per step from 16 warps on (128 registers per thread there: 4 rows
    spill in the sm_90 build)."""
    kp = triton.next_power_of_2(k)
    warps = min(32, max(cfg.warps, kp // 1024))
    rows_per_step = min(cfg.block_k, cfg.block_n, 2 if warps >= 16 else 64)
    return kp, rows_per_step, warps


def quant_gemv(x: torch.Tensor, prepared: PreparedQuant, *, config: tuple | None = None,
               swiglu: bool = False, out: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for one row: x [1, K] (or [1, 2K] ``[gate | up]`` with
    ``swiglu``) in bf16/fp16 (fp32 for tests), W the ``prepared`` int4/int8 weight;
    returns [1, N] in x's dtype (into ``out`` when given). ``config`` is a ``GemvConfig``
    (or a plain (BLOCK_N, BLOCK_K, num_warps[, kind[, stages]]) tuple), ``default_quant_config`` when
    omitted. No host sync, and no allocation with ``out`` (but a split-K SWAP config takes a
    small fp32 workspace from torch's allocator): safe to capture in a CUDA graph."""
    n, k = prepared.out_features, prepared.in_features
    _check_x("quant_gemv", x, k, swiglu)
    if x.shape[0] != 1:
        raise ValueError(f"quant_gemv: x must be one row [1, K], got {list(x.shape)}; use quant_gemm for more rows")
    out = _check_bias_out("quant_gemv", x, 1, n, bias, out)
    cfg = GemvConfig(*config) if config is not None else default_quant_config(n, k, prepared.bits)
    if prepared.group_size < BLOCK and k % BLOCK == 0 and cfg.kind not in (KLOOP, ROWS, DP4A, DP4A_TMA):
        cfg = default_quant_config(n, k, prepared.bits)  # groups of 16: no tensor-core kernels
    x = x.contiguous()
    q, s, m = prepared.qweight, prepared.scales, prepared.mins
    if cfg.kind == DP4A_TMA:
        from hearth_kernels.quant_dp4a import quant_gemv_dp4a_tma

        return quant_gemv_dp4a_tma(x, prepared, out, bias, swiglu, cfg.block_n, cfg.block_k, cfg.warps,
                                   max(1, cfg.stages))
    if cfg.kind == DP4A and k % BLOCK == 0:
        from hearth_kernels.quant_dp4a import DP4A_MAX_K, quant_gemv_dp4a

        if k <= DP4A_MAX_K:
            return quant_gemv_dp4a(x, prepared, out, bias, swiglu, cfg.block_n, cfg.block_k, cfg.warps,
                                   max(1, cfg.stages), cfg.split, qx=bool(cfg.qx))
    if cfg.kind in (SWAP, SWAP_SCALED) and k % 16 == 0:
        from hearth_kernels.quant_mma import MmaConfig, quant_mma

        return quant_mma(x, prepared, config=MmaConfig(cfg.block_n, cfg.block_k, cfg.warps, cfg.stages, cfg.split,
                                                       cfg.kind == SWAP_SCALED), swiglu=swiglu, bias=bias, out=out)
    if cfg.kind in (MMA, SWAP, SWAP_SCALED) or k % BLOCK:  # the CUDA-core kernels read whole blocks of 32 inputs
        from hearth_kernels.quant_gemm import _launch_fused

        # tl.dot tiles are at least 16 wide; a CUDA-core config sent here gets usual mma steps
        block_n, block_k = (cfg.block_n, cfg.block_k) if cfg.kind == MMA else (cfg.block_n, 128)
        _launch_fused(x, prepared, bias, out, swiglu, 16, max(16, block_n), block_k, cfg.warps, max(1, cfg.stages))
        return out
    q = q.view(torch.int32)  # 8 int4 or 4 int8 codes per word
    m_arg, b_arg = (m if m is not None else s), (bias if bias is not None else s)
    common = dict(GROUP=prepared.group_size, BITS=prepared.bits, HAS_MIN=m is not None, HAS_BIAS=bias is not None,
                  SWIGLU=swiglu, STAGES=cfg.stages, **pdl_args(x.device))
    if cfg.kind == ROWS and k <= _ROWS_MAX_K:
        kp, rows_per_step, warps = rows_launch(cfg, k)
        _quant_gemv_rows_kernel[(triton.cdiv(n, cfg.block_n),)](
            x, q, s, m_arg, b_arg, out, n, k, q.stride(0), s.stride(0), _MAGIC, ROWS=cfg.block_n,
            R=rows_per_step, KP=kp, num_warps=warps, **common)
        return out
    block_k = max(BLOCK, min(cfg.block_k if cfg.kind == KLOOP else 512, triton.next_power_of_2(k)))
    _quant_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, q, s, m_arg, b_arg, out, n, k, q.stride(0), s.stride(0), _MAGIC, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=cfg.warps, **common)
    return out
