"""Weight-only int8/int4 matrix product for prefill and batched decode: ``y = x W^T (+ b)``
with ``W`` a ``PreparedQuant`` (``hearth_kernels/quant_gemv.py``: canonical layout, nothing repacked).

Two paths, chosen by the number of rows M (``DEQUANT_ROWS``):

- fused (M < DEQUANT_ROWS; batched decode, short prompts): each program owns a
  ``[BLOCK_M, BLOCK_N]`` output tile and walks K in ``BLOCK_K`` steps that lie inside one
  quantization group. A step loads the packed codes, turns them into exact small integers
  in the activation dtype (int4: the magic-number trick, ``0x4300 | q`` is the bf16
  ``128 + q``; int8: a plain conversion, -128..127 are exact in bf16/fp16), multiplies them
  with the x tile on the tensor cores (``tl.dot``, fp32 accumulation), and only then applies
  the group's scale and min in fp32: ``acc += s * dot(x, c) + (m - off*s) * sum(x)``.
  The weights are therefore never rounded (more exact than dequantize-to-bf16 + matmul),
  and the per-weight decode work (about 6.5-14 instructions per int4 weight per program in
  the sm_90 build, by column tile) is shared by BLOCK_M rows. int4's GGUF
  nibble order needs no shuffle: the low nibbles of a block meet ``x[k..k+15]`` and the high
  nibbles ``x[k+16..k+31]`` in two dots of half the width.
- dequantize (M >= DEQUANT_ROWS; long prompts): the weight is expanded into a scratch
  ``[N, K]`` buffer of the activation dtype by one bandwidth-bound kernel, then multiplied
  by cuBLAS. At M=2048 a weight costs ~4096 FLOP of product (~6 ps at ~700 TFLOP/s) and
  ~2.3 bytes of expansion (write bf16, read the codes: ~0.6 ps at 4 TB/s), so the
  linear layers cost ~10% over bf16's (less end to end) and cuBLAS's tuning is kept; the
  fused path's per-group scaling epilogue on CUDA cores and its 64-row tile cap (spills
  beyond) would cost more there. The scratch buffer comes
  from torch's caching allocator (the largest layer's [N, K], reused layer after layer).

``DEQUANT_ROWS`` is a first guess to be measured on the GPU
(``benchmarks/profile_quant_gemv.py`` times both paths over M).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from quant_old_gemv import PreparedQuant, _check_bias_out, _check_x

from hearth_kernels._compat import interpreting

# Triton 3.6's interpreter multiplies bf16 tl.dot operands as if their bits were another
# type (garbage results); under TRITON_INTERPRET=1 bf16 dots run in fp32 instead. The GPU
# build never takes this branch.
_BF16_DOT_IN_FP32 = interpreting()

#: from this many rows on, dequantize into scratch and use cuBLAS (see the docstring)
DEQUANT_ROWS = 1024


@triton.jit
def _int4_as_dtype(q, dt: tl.constexpr):
    """int32 nibbles 0..15 -> (OFFSET + q) exactly in dt, by bit pattern (no conversion
    instruction): bf16 0x4300 is 128.0 with a mantissa step of 1; fp16 0x6400 is 1024.0
    with a step of 1; fp32 is converted plainly (tests on CPU)."""
    if dt == tl.bfloat16:
        return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif dt == tl.float16:
        return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return q.to(tl.float32)


@triton.jit
def _load_x_tile(x_rows, k, K, mask, SWIGLU: tl.constexpr):
    """The x tile at columns ``k`` in x's dtype; with SWIGLU x holds [gate | up] (2K
    columns) and the tile is silu(gate) * up, rounded like the eager ops."""
    if SWIGLU:
        dt = x_rows.dtype.element_ty
        g = tl.load(x_rows + k, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_rows + K + k, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        return (act * u).to(dt)
    else:
        return tl.load(x_rows + k, mask=mask, other=0.0)


@triton.jit
def _quant_gemm_kernel(x_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, M, N, K,
                       stride_xm, stride_qn, stride_sn, stride_ym,
                       GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, OFFSET: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # the programs of one weight tile run together: it is read from L2 once
    pid_n = pid // num_m
    dt = x_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm_safe = tl.where(m_ok, rm, 0).to(tl.int64)
    rn_safe = tl.where(n_ok, rn, 0).to(tl.int64)
    x_rows = x_ptr + rm_safe[:, None] * stride_xm
    q_rows = q_ptr + rn_safe[:, None] * stride_qn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP  # BLOCK_K divides GROUP (or GROUP == K): one group per step
        if BITS == 4:
            HALF: tl.constexpr = BLOCK_K // 2
            j = tl.arange(0, HALF)  # byte j of the step: block j // 16, inputs i and i + 16
            k_lo = k0 + (j // 16) * 32 + (j % 16)
            b = tl.load(q_rows + (k0 // 2 + j)[None, :]).to(tl.int32)  # [BLOCK_N, HALF]
            x_lo = _load_x_tile(x_rows, k_lo[None, :], K, m_ok[:, None], SWIGLU)
            x_hi = _load_x_tile(x_rows, (k_lo + 16)[None, :], K, m_ok[:, None], SWIGLU)
            c_lo = _int4_as_dtype(b & 15, dt)
            c_hi = _int4_as_dtype(b >> 4, dt)
            if DOT_FP32:
                part = tl.dot(x_lo.to(tl.float32), tl.trans(c_lo.to(tl.float32)), input_precision="ieee")
                part = tl.dot(x_hi.to(tl.float32), tl.trans(c_hi.to(tl.float32)), part, input_precision="ieee")
            else:
                part = tl.dot(x_lo, tl.trans(c_lo), input_precision=DOT_PRECISION)
                part = tl.dot(x_hi, tl.trans(c_hi), part, input_precision=DOT_PRECISION)
            xsum = tl.sum(x_lo.to(tl.float32) + x_hi.to(tl.float32), axis=1)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                c = tl.load(q_rows + kk[None, :])
                xk = _load_x_tile(x_rows, kk[None, :], K, m_ok[:, None], SWIGLU)
            else:
                k_ok = kk < K
                c = tl.load(q_rows + kk[None, :], mask=k_ok[None, :], other=0)
                xk = _load_x_tile(x_rows, kk[None, :], K, m_ok[:, None] & k_ok[None, :], SWIGLU)
            if DOT_FP32:
                part = tl.dot(xk.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(xk, tl.trans(c.to(dt)), input_precision=DOT_PRECISION)
            xsum = tl.sum(xk.to(tl.float32), axis=1)
        s = tl.load(s_ptr + rn_safe * stride_sn + g).to(tl.float32)
        if HAS_MIN:
            off = tl.load(m_ptr + rn_safe * stride_sn + g).to(tl.float32) - OFFSET * s
        else:
            off = -OFFSET * s
        if HAS_MIN or OFFSET != 0:
            acc += part * s[None, :] + xsum[:, None] * off[None, :]
        else:
            acc += part * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn_safe).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm_safe[:, None] * stride_ym + rn_safe[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, m_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                       GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[n, k] = q * s + m (fp32 math, one rounding to w's dtype), [BLOCK_N, BLOCK_K] per program."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    NB: tl.constexpr = BLOCK_K // 32
    kb = tl.program_id(1) * BLOCK_K + tl.arange(0, NB) * 32  # first input of each block
    n_ok = rn < N
    rn_safe = tl.where(n_ok, rn, 0).to(tl.int64)
    blk_ok = kb < K
    grp = tl.where(blk_ok, kb // GROUP, 0)
    s = tl.load(s_ptr + rn_safe[:, None] * stride_sn + grp[None, :]).to(tl.float32)[:, :, None]
    if HAS_MIN:
        m = tl.load(m_ptr + rn_safe[:, None] * stride_sn + grp[None, :]).to(tl.float32)[:, :, None]
    out_rows = w_ptr + rn_safe[:, None, None] * stride_wn
    q_rows = q_ptr + rn_safe[:, None, None] * stride_qn
    dt = w_ptr.dtype.element_ty
    if BITS == 4:
        i = tl.arange(0, 16)
        k_lo = kb[:, None] + i[None, :]  # [NB, 16]
        ok = n_ok[:, None, None] & (blk_ok[:, None] & (i[None, :] < 16))[None, :, :]
        b = tl.load(q_rows + (kb // 2)[None, :, None] + i[None, None, :], mask=ok, other=0).to(tl.int32)
        lo = (b & 15).to(tl.float32) * s
        hi = (b >> 4).to(tl.float32) * s
        if HAS_MIN:
            lo += m
            hi += m
        tl.store(out_rows + k_lo[None, :, :], lo.to(dt), mask=ok)
        tl.store(out_rows + (k_lo + 16)[None, :, :], hi.to(dt), mask=ok)
    else:
        i = tl.arange(0, 32)
        kk = kb[:, None] + i[None, :]
        ok = n_ok[:, None, None] & (kk < K)[None, :, :]
        w = tl.load(q_rows + kk[None, :, :], mask=ok, other=0).to(tl.float32) * s
        if HAS_MIN:
            w += m
        tl.store(out_rows + kk[None, :, :], w.to(dt), mask=ok)


def dequantize_weight(prepared: PreparedQuant, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight ``W`` [N, K] in ``dtype`` (each element q*s + m in fp32, rounded
    once), into ``out`` when given (a reusable scratch buffer)."""
    n, k = prepared.out_features, prepared.in_features
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=prepared.qweight.device)
    elif tuple(out.shape) != (n, k) or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(f"dequantize_weight: out must be {dtype} [{n}, {k}] with a contiguous last axis")
    block_n, block_k = 16, 256
    q, s, m = prepared.qweight, prepared.scales, prepared.mins
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](q, s, m if m is not None else s, out, n, k, q.stride(0), s.stride(0), out.stride(0),
                             GROUP=prepared.group_size, BITS=prepared.bits, HAS_MIN=m is not None,
                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def _step(group: int, want: int) -> int:
    """The widest power-of-2 K step <= ``want`` (and >= 32) that divides the group, so that
    a step lies inside one group. Only an int8 weight with one group per row whose K is not
    a multiple of 32 has none; it steps by 32 and masks the tail (its group is the row)."""
    step = want
    while step > 32 and group % step:
        step //= 2
    return step


#: programs below which the fused path narrows its column tile (one per SM of an H100/H200)
_MIN_PROGRAMS = 132


def default_gemm_config(m: int, n: int, k: int, bits: int, group: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the fused path: the row tile
    grows with M up to 64 (a batch of 64 reads the weight once; a 128-row tile spills
    registers in the int4 sm_90 build), K steps of 128 (64 for larger M) inside a group,
    4 warps, and the widest column tile (128, 64 or 32) that still gives every SM a program:
    at M=64 and N=4096, 32 columns (128 programs, ~14 instructions per int4 weight per
    program) beat 128 columns (32 programs on 132 SMs, ~6.5 per weight)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    tiles_m = -(-m // block_m)
    block_n = 32
    for wide in (128, 64):
        if tiles_m * -(-n // wide) >= _MIN_PROGRAMS:
            block_n = wide
            break
    block_k = _step(group, 128 if m <= 64 else 64)
    return block_m, block_n, block_k, 4, 3 if m <= 64 else 4


def quant_gemm(x: torch.Tensor, prepared: PreparedQuant, *, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: tuple[int, int, int, int, int] | None = None,
               dequant_rows: int | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [M, K] (bf16/fp16; fp32 for tests) and the ``prepared``
    int4/int8 weight; returns [M, N] in x's dtype (into ``out`` when given). M below
    ``dequant_rows`` (default ``DEQUANT_ROWS``) runs the fused kernel with ``config``
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages; ``default_gemm_config`` when
    omitted), otherwise dequantize + cuBLAS."""
    n, k = prepared.out_features, prepared.in_features
    _check_x("quant_gemm", x, k, False)
    rows = x.shape[0]
    out = _check_bias_out("quant_gemm", x, rows, n, bias, out)
    if rows == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if rows >= (DEQUANT_ROWS if dequant_rows is None else dequant_rows):
        w = dequantize_weight(prepared, x.dtype)
        if bias is None:
            return torch.mm(x, w.t(), out=out)
        return torch.addmm(bias, x, w.t(), out=out)
    block_m, block_n, block_k, warps, stages = config or default_gemm_config(rows, n, k, prepared.bits,
                                                                             prepared.group_size)
    _launch_fused(x, prepared, bias, out, False, block_m, block_n, block_k, warps, stages)
    return out


def _launch_fused(x: torch.Tensor, prepared: PreparedQuant, bias: torch.Tensor | None, out: torch.Tensor,
                  swiglu: bool, block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> None:
    """Launch the fused kernel (checked arguments; x [rows, K] or [rows, 2K] with swiglu)."""
    rows, n, k = x.shape[0], prepared.out_features, prepared.in_features
    block_k = _step(prepared.group_size, max(32, block_k))
    offset = 0
    if prepared.bits == 4:
        offset = {torch.bfloat16: 128, torch.float16: 1024}.get(x.dtype, 0)
    q, s, m = prepared.qweight, prepared.scales, prepared.mins
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(n, block_n),)
    _quant_gemm_kernel[grid](
        x, q, s, m if m is not None else s, bias if bias is not None else s, out, rows, n, k,
        x.stride(0), q.stride(0), s.stride(0), out.stride(0), GROUP=prepared.group_size, BITS=prepared.bits,
        HAS_MIN=m is not None, HAS_BIAS=bias is not None, SWIGLU=swiglu, OFFSET=offset,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_FP32=_BF16_DOT_IN_FP32 and x.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        num_warps=warps, num_stages=stages)
