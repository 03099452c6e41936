"""Weight-only int8/int4 matrix product for prefill and batched decode: ``y = x W^T (+ b)``
with ``W`` a ``PreparedQuant`` (``hearth_kernels/quant_gemv.py``; int4 codes in pair order).

Three paths, chosen by the number of rows M:

- weight-stationary (int4, and int8 per channel: ``swaps``; M <= ``SWAP_ROWS``, 128; batched
  decode, short prompts): ``hearth_kernels/quant_mma.py``, the weight tile as the dot's tall side
  and x as the narrow one (see there); from 65 rows two x tiles per weight tile (int4 in groups
  of 128+ and per-channel int8 only: GGUF's int4 in 32s keeps 64, not timed there). 64 until
  2026-12-05. On an H100 the four 8B projections (q/k/v, o, gate_up, down with SwiGLU) at 96 and
  128 rows took 268 and 272 us a layer on it (default configs) against 386 and 391 dequantized and
  447 and 471 fused for int4 in 128s, and 191 and 193 against 318 and 341 fused for int8 per
  channel; bf16 cuBLAS 182-185
  (benchmarks/results/2026-12-05-i14-profile-quant-mma-int{4,8}-rows128-8b-h100-175d951.json).
  End to end on the H200 (offline throughput, 512 requests, one call): int4 9,218 tok/s against
  9,184 with the 64-row limit, int8 9,000 against 8,805, bf16 11,165
  (benchmarks/results/2026-12-05-i14-bench-8b-routing-*-h200-07fdb63.json).
- fused (M < DEQUANT_ROWS; batched decode, short prompts): each program owns a
  ``[BLOCK_M, BLOCK_N]`` output tile and walks K in ``BLOCK_K`` steps that lie inside one
  quantization group (narrow groups excepted: ``fused_step``). A step loads the packed
  codes, turns them into exact small integers
  in the activation dtype (int4: the magic-number trick, ``0x4300 | q`` is the bf16
  ``128 + q``; int8: a plain conversion, -128..127 are exact in bf16/fp16), multiplies them
  with the x tile on the tensor cores (``tl.dot``, fp32 accumulation), and only then applies
  the group's scale and min in fp32: ``acc += s * dot(x, c) + (m - off*s) * sum(x)``
  (per-channel weights: once, after the loop). The weights are therefore never rounded
  (more exact than dequantize-to-bf16 + matmul), and the per-weight decode work is shared
  by BLOCK_M rows. int4 codes are in pair order, so ``tl.join(lo, hi)`` of a byte tile is
  the code tile in natural K order: one full-width dot per step over a contiguous x tile,
  both operands plain loads that the pipeliner keeps in flight (the first cut, on GGUF
  order, ran two half-width dots over gathered x and was 2-6x slower than cuBLAS bf16).
  Options per config: SPLIT_K (K split over several programs per tile, fp32 partial sums
  summed in a fixed order; the default up to 64 rows, where a few wide tiles would leave SMs
  idle and narrow ones re-read x and run thin dots) and SCALE_B (the weight tile
  dequantized to x's dtype in registers, one accumulator: 128-row int4 tiles fit).
- dequantize (M >= DEQUANT_ROWS; long prompts): the weight is expanded into a scratch
  ``[N, K]`` buffer of the activation dtype by one bandwidth-bound kernel (8 x 512 tiles,
  contiguous 16-byte stores; it should run near HBM speed), then multiplied
  by cuBLAS. At M=2048 a weight costs ~4096 FLOP of product (~6 ps at ~700 TFLOP/s) and
  ~2.3 bytes of expansion (write bf16, read the codes: ~0.6 ps at 4 TB/s), so the
  linear layers cost ~10% over bf16's (less end to end) and cuBLAS's tuning is kept; the
  fused path's per-group scaling epilogue on CUDA cores and its 64-row tile cap (spills
  beyond) would cost more there. The scratch buffer comes
  from torch's caching allocator (the largest layer's [N, K], reused layer after layer).

Narrow groups (``fused_step``: int8 in groups of 16, GGUF's Q6_K; int4 in 32s, Q4_K/Q4_0/Q4_1):
a K step spans several groups, so the weight tile is scaled in registers (SCALE_B). The step
loads its ``BLOCK_K / GROUP`` scales and mins of each row and scales the code tile viewed as
``[BLOCK_N, groups, GROUP]`` (``_scale_groups``). Until 2026-12-05 every weight loaded its own
group's scale and min: 128 global loads a step per thread for int8 in 16s at the 64 x 128
tile, 1,730 instructions a K step against 411 now (int4 in 32s: 1,073 against 450), and the
16-row tile spilled (sm_90 builds). On an H100, the 8B projections q/k/v, gate_up and down at 128
rows took 575 us together (int4 in 32s) against 2,555 before, and 563 against 1,025 for int8 in
16s (benchmarks/results/2026-12-05-i17-profile-narrow-gather{0,1}-8b-h100-2927d5f.json); the
dequantize + cuBLAS path (371 and 421 us) is faster still there (below).

``DEQUANT_ROWS`` was 1,024 for every weight until 2026-12-05, a first guess; it is now 96 rows for
int4, 192 for int8 per output channel and 128 for grouped int8 (where the weight-stationary
kernel doesn't take the rows: above 128 for int4 and per-channel int8 since then). The 8B
projections (q/k/v, o, gate_up, down) timed both ways on an H100
(benchmarks/results/2026-12-05-i14-profile-dequant-rows-8b-h100-e376f8b.json), summed per layer
(not every projection agrees: int4 gate_up ran fused as fast or faster at 96 and 128 rows): int4
in 128s ran 444/466/693 us fused (default configs) against 384/389/404 dequantized at 96/128/192
rows; int8 per channel 314/343/510 against 423/426/439. Grouped int8 was timed at 128 rows only,
in GGUF Q6_K's groups of 16 (563 fused against 421; 2026-12-05-i17-profile-narrow-gather0-8b-h100-2927d5f.json).
On the H200 earlier (2026-12-01-i14-profile-quant-gemv-8b-h200-v2.json) int4 in 128s was even at
64 rows and dequantized ~2x faster at 256; int8 per channel ran fused ahead at 64 rows (238
against 315 us) and dequantized 1.44x faster at 256 (363 against 524). End to end, offline
throughput of the 8B (512 requests) went from 5,456 to 7,551 tok/s for int4 and 6,151 to 7,400
for int8 (bf16 9,281; one run each, same H100 call,
2026-12-05-i14-dequant-rows-8b-throughput-*-h100-e376f8b-dq.json). An LM head keeps 1,024
(``engine.layers.quant_linear.HEAD_DEQUANT_ROWS``; the untied head of an int4 or int8 model is
int8 per channel): fused, the 8B's ran faster at 96 and 128 rows (542 and 620 us against 974 and
980 at the default config), dequantized slightly faster at 192 (989 against 1,029), and its scratch
would be the whole [vocab, hidden] matrix; since the weight-stationary kernel takes 128 rows
the head runs there up to 128 (not timed above 64 rows for the head; at 64 on the H200 it ran
199 us against 387 fused, 2026-12-05-i14-profile-quant-mma-int8-8b-h200-23cc299.json), fused to
1,023. The scratch (the largest dequantizing projection's [N, K]) is counted in the graphs'
reserved pool (``engine.runner.memory.scratch_bytes``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hearth_kernels._compat import interpreting
from hearth_kernels.quant_gemv import PreparedQuant, _check_bias_out, _check_x
from hearth_kernels.activation import silu_and_mul
from hearth_kernels.quant_mma import MAX_ROWS, quant_mma

# Triton 3.6's interpreter multiplies bf16 tl.dot operands as if their bits were another
# type (garbage results); under TRITON_INTERPRET=1 bf16 dots run in fp32 instead. The GPU
# build never takes this branch.
_BF16_DOT_IN_FP32 = interpreting()

#: from this many rows on, dequantize into scratch and use cuBLAS (where the weight-stationary
#: kernel doesn't take the rows; see the docstring): int4, int8 per output channel, grouped int8
#: (1,024 for all three, and ``SWAP_ROWS`` 64, until 2026-12-05)
DEQUANT_ROWS = {"int4": 96, "int8": 192, "int8 grouped": 128}


def dequant_rows_for(bits: int, group: int, k: int, dequant_rows: int | None = None) -> int:
    """From how many rows a weight of ``bits``-bit codes in groups of ``group`` (``k``: per
    channel) takes the dequantize path (``dequant_rows`` when given)."""
    if dequant_rows is not None:
        return dequant_rows
    return DEQUANT_ROWS["int4" if bits == 4 else "int8" if group >= k else "int8 grouped"]


#: up to this many rows int4 (and int8, see ``swaps``) runs hearth_kernels/quant_mma.py's weight-stationary kernel
#: (64 until 2026-12-05: see the module docstring)
SWAP_ROWS = 128


def swaps(bits: int, group: int, k: int) -> bool:
    """Whether a weight of these codes runs the weight-stationary kernel up to ``SWAP_ROWS``
    rows: int4 (any group), and int8 per output channel. Grouped int8 keeps the fused kernel:
    GGUF's Q8_0 and Q6_K groups would cut the weight-stationary kernel's K steps to the group
    (the fused kernel's steps span groups), and for groups of 128 or more it would dequantize
    each tile to x's dtype in registers (rounding q * s + m, where the fused kernel keeps
    int8 exact), not measured yet. On the H200 the per-channel int8 8B projections ran 0.98x
    (the head) to 1.5x as fast on it as on the fused kernel at 16 rows (where the x tile is the
    tall side and the converted codes go through shared memory every step), 1.9-3.2x at 64
    rows (gate_up 51.9 against 102.6 us, the head 199 against 387;
    benchmarks/results/2026-12-05-i14-profile-quant-mma-int8-8b-h200-23cc299.json).
    ``HEARTH_QUANT_SWAP_INT8=0`` keeps int8 on the fused kernel."""
    if bits == 4:
        return True
    return bits == 8 and group == k and os.environ.get("HEARTH_QUANT_SWAP_INT8", "1") != "0"


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
def _scale_groups(c, s, mn, WIDTH: tl.constexpr):
    """c [BN, NG * WIDTH] (fp32) * s + mn with s, mn [BN, NG]: column j takes group j // WIDTH's."""
    BN: tl.constexpr = c.shape[0]
    NG: tl.constexpr = s.shape[1]
    v = tl.reshape(c, [BN, NG, WIDTH]) * s[:, :, None] + mn[:, :, None]
    return tl.reshape(v, [BN, NG * WIDTH])


@triton.jit
def _quant_gemm_kernel(x_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, M, N, K, K_STEPS,
                       stride_xm, stride_qn, stride_sn, stride_ym, stride_ys,
                       GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, OFFSET: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, PER_ROW: tl.constexpr, SCALE_B: tl.constexpr,
                       SPLIT_K: tl.constexpr):
    # int4 codes are in pair order (byte j of a row: inputs 2j low, 2j + 1 high), so the
    # [BLOCK_N, BLOCK_K / 2] byte tile becomes the [BLOCK_N, BLOCK_K] code tile in natural
    # K order by tl.join(lo, hi) (register moves), and x is one contiguous tile: one dot
    # of the full step width per step, both operands plain loads the pipeliner can put in
    # flight. With one group per row (per-channel) the scale and min are applied once
    # after the loop instead of every step.
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
    xsum_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    # split-K: program (tile, j) takes K steps [j * K_STEPS, (j + 1) * K_STEPS) (all of them
    # without a split; the launcher makes the splits equal) and writes fp32 y[j]. k0 is
    # built as (step index) * BLOCK_K so that the compiler knows its alignment: the
    # 16-byte loads and the software pipelining depend on it.
    step0 = tl.program_id(1) * K_STEPS
    for i in range(0, K_STEPS):
        k0 = (step0 + i) * BLOCK_K
        if SCALE_B and not PER_ROW:
            # dequantize the weight tile in registers (q * s + m in fp32, rounded once to
            # x's dtype) and accumulate the dot straight into acc: one accumulator instead
            # of acc + part (the int4 128-row tile spills otherwise), the weight rounded
            # like the dequantize + cuBLAS path
            # Steps spanning groups (GROUP < BLOCK_K: GGUF's Q6_K int8 in 16s, int4 in 32s) load the
            # step's NG = BLOCK_K / GROUP scales and mins of each row, [BLOCK_N, NG], and scale the
            # code tile viewed as [BLOCK_N, NG, GROUP] (module docstring, "Narrow groups").
            if GROUP < BLOCK_K:
                NG: tl.constexpr = BLOCK_K // GROUP
                gi = k0 // GROUP + tl.arange(0, NG)  # (a group past K: index 0, its x is masked to 0)
                sg = rn_safe[:, None] * stride_sn + tl.where(gi * GROUP < K, gi, 0)[None, :]
            else:
                sg = (rn_safe * stride_sn + k0 // GROUP)[:, None]  # one group per step: [BLOCK_N, 1]
            s = tl.load(s_ptr + sg).to(tl.float32)
            if HAS_MIN:
                mn = tl.load(m_ptr + sg).to(tl.float32)
            else:
                mn = tl.zeros([BLOCK_N, 1], dtype=tl.float32)
            if BITS == 4:
                HALF_B: tl.constexpr = BLOCK_K // 2
                jb = k0 // 2 + tl.arange(0, HALF_B)
                if EVEN_K:
                    b = tl.load(q_rows + jb[None, :]).to(tl.int32)
                    xk = _load_x_tile(x_rows, (k0 + kk)[None, :], K, m_ok[:, None], SWIGLU)
                else:  # a step spanning groups may run past K (int4 in groups of 32, K = 32 x odd)
                    b = tl.load(q_rows + jb[None, :], mask=(jb < K // 2)[None, :], other=0).to(tl.int32)
                    xk = _load_x_tile(x_rows, (k0 + kk)[None, :], K, m_ok[:, None] & ((k0 + kk) < K)[None, :],
                                      SWIGLU)
                if GROUP < BLOCK_K:  # group g's GROUP / 2 bytes share s[:, g]
                    lo = _scale_groups((b & 15).to(tl.float32), s, mn, GROUP // 2).to(dt)
                    hi = _scale_groups((b >> 4).to(tl.float32), s, mn, GROUP // 2).to(dt)
                else:
                    lo = ((b & 15).to(tl.float32) * s + mn).to(dt)
                    hi = ((b >> 4).to(tl.float32) * s + mn).to(dt)
                w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
            else:
                if EVEN_K:
                    c = tl.load(q_rows + (k0 + kk)[None, :])
                    xk = _load_x_tile(x_rows, (k0 + kk)[None, :], K, m_ok[:, None], SWIGLU)
                else:
                    k_ok = (k0 + kk) < K
                    c = tl.load(q_rows + (k0 + kk)[None, :], mask=k_ok[None, :], other=0)
                    xk = _load_x_tile(x_rows, (k0 + kk)[None, :], K, m_ok[:, None] & k_ok[None, :], SWIGLU)
                if GROUP < BLOCK_K:
                    w = _scale_groups(c.to(tl.float32), s, mn, GROUP).to(dt)
                else:
                    w = (c.to(tl.float32) * s + mn).to(dt)
            if DOT_FP32:
                acc = tl.dot(xk.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xk, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            if BITS == 4:  # K is a multiple of BLOCK_K here (it divides the group)
                HALF: tl.constexpr = BLOCK_K // 2
                b = tl.load(q_rows + (k0 // 2 + tl.arange(0, HALF))[None, :])  # uint8 [BLOCK_N, HALF]
                xk = _load_x_tile(x_rows, (k0 + kk)[None, :], K, m_ok[:, None], SWIGLU)
                lo = _int4_as_dtype((b & 15).to(tl.int32), dt)
                hi = _int4_as_dtype((b >> 4).to(tl.int32), dt)
                c = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])  # [n, j, 2] -> input 2j + t
            else:
                if EVEN_K:
                    c = tl.load(q_rows + (k0 + kk)[None, :])
                    xk = _load_x_tile(x_rows, (k0 + kk)[None, :], K, m_ok[:, None], SWIGLU)
                else:
                    k_ok = (k0 + kk) < K
                    c = tl.load(q_rows + (k0 + kk)[None, :], mask=k_ok[None, :], other=0)
                    xk = _load_x_tile(x_rows, (k0 + kk)[None, :], K, m_ok[:, None] & k_ok[None, :], SWIGLU)
            if DOT_FP32:  # (int8 codes go straight to fp32: the interpreter's int8 -> bf16 is wrong too)
                part = tl.dot(xk.to(tl.float32), tl.trans(c.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(xk, tl.trans(c.to(dt)), input_precision=DOT_PRECISION)
            if HAS_MIN or OFFSET != 0:
                xsum = tl.sum(xk.to(tl.float32), axis=1)
            if PER_ROW:
                acc += part
                if HAS_MIN or OFFSET != 0:
                    xsum_all += xsum
            else:
                g = k0 // GROUP  # BLOCK_K divides GROUP: one group per step
                s = tl.load(s_ptr + rn_safe * stride_sn + g).to(tl.float32)
                if HAS_MIN:
                    off = tl.load(m_ptr + rn_safe * stride_sn + g).to(tl.float32) - OFFSET * s
                else:
                    off = -OFFSET * s
                if HAS_MIN or OFFSET != 0:
                    acc += part * s[None, :] + xsum[:, None] * off[None, :]
                else:
                    acc += part * s[None, :]
    if PER_ROW:
        s = tl.load(s_ptr + rn_safe * stride_sn).to(tl.float32)
        acc = acc * s[None, :]
        if HAS_MIN or OFFSET != 0:
            if HAS_MIN:
                off = tl.load(m_ptr + rn_safe * stride_sn).to(tl.float32) - OFFSET * s
            else:
                off = -OFFSET * s
            acc += xsum_all[:, None] * off[None, :]
    y_ptrs = y_ptr + rm_safe[:, None] * stride_ym + rn_safe[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_safe).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:  # the fp32 partial sums (the scaling is linear: each part scaled by itself)
        if HAS_BIAS:
            if tl.program_id(1) == 0:
                acc += tl.load(b_ptr + rn_safe).to(tl.float32)[None, :]
        tl.store(y_ptrs + tl.program_id(1) * stride_ys, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, m_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                       GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MIN: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """w[n, k] = q * s + m (fp32 math, one rounding to w's dtype), [BLOCK_N, BLOCK_K] per
    program: int4 reads a [BLOCK_N, BLOCK_K/2] byte tile (pair order) and writes the
    [BLOCK_N, BLOCK_K] tile contiguously (tl.join of the low and high nibbles); the scale
    and min are loaded once per block of 32 inputs (int8 in groups of 16: per input)."""
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
        if EVEN:
            b = tl.load(q_rows + (kb // 2)[None, :, None] + i[None, None, :], eviction_policy="evict_first")
        else:
            okb = n_ok[:, None, None] & blk_ok[None, :, None]
            b = tl.load(q_rows + (kb // 2)[None, :, None] + i[None, None, :], mask=okb, other=0,
                        eviction_policy="evict_first")
        b = b.to(tl.int32)
        lo = (b & 15).to(tl.float32) * s
        hi = (b >> 4).to(tl.float32) * s
        if HAS_MIN:
            lo += m
            hi += m
        w = tl.reshape(tl.join(lo.to(dt), hi.to(dt)), [BLOCK_N, NB, 32])  # input 2i + t of each block
    else:
        i = tl.arange(0, 32)
        kk = kb[:, None] + i[None, :]
        if EVEN:
            q = tl.load(q_rows + kk[None, :, :], eviction_policy="evict_first")
        else:
            q = tl.load(q_rows + kk[None, :, :], mask=n_ok[:, None, None] & (kk < K)[None, :, :], other=0,
                        eviction_policy="evict_first")
        if GROUP < 32:  # int8 in groups of 16: each input its own group's scale (and min)
            gk = tl.where(kk < K, kk // GROUP, 0)  # [NB, 32]
            sk = rn_safe[:, None, None] * stride_sn + gk[None, :, :]
            w = q.to(tl.float32) * tl.load(s_ptr + sk).to(tl.float32)
            if HAS_MIN:
                w += tl.load(m_ptr + sk).to(tl.float32)
        else:
            w = q.to(tl.float32) * s
            if HAS_MIN:
                w += m
        w = w.to(dt)
    k_all = kb[:, None] + tl.arange(0, 32)[None, :]  # [NB, 32]
    if EVEN:
        tl.store(out_rows + k_all[None, :, :], w)
    else:
        tl.store(out_rows + k_all[None, :, :], w, mask=n_ok[:, None, None] & (k_all < K)[None, :, :])


def dequantize_weight(prepared: PreparedQuant, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight ``W`` [N, K] in ``dtype`` (each element q*s + m in fp32, rounded
    once), into ``out`` when given (a reusable scratch buffer)."""
    n, k = prepared.out_features, prepared.in_features
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=prepared.qweight.device)
    elif tuple(out.shape) != (n, k) or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(f"dequantize_weight: out must be {dtype} [{n}, {k}] with a contiguous last axis")
    block_n, block_k, warps = DEQUANT_TILE
    block_k = min(block_k, triton.next_power_of_2(max(k, 32)))
    q, s, m = prepared.qweight, prepared.scales, prepared.mins
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](q, s, m if m is not None else s, out, n, k, q.stride(0), s.stride(0), out.stride(0),
                             GROUP=prepared.group_size, BITS=prepared.bits, HAS_MIN=m is not None,
                             BLOCK_N=block_n, BLOCK_K=block_k, EVEN=n % block_n == 0 and k % block_k == 0,
                             num_warps=warps)
    return out


#: (BLOCK_N, BLOCK_K, num_warps) of the dequantize kernel: 8 KiB of bf16 out per program
#: (16 values = two 16-byte stores per thread at 4 warps), big enough to keep HBM busy
DEQUANT_TILE = (8, 512, 4)


def _step(group: int, want: int) -> int:
    """The widest power-of-2 K step <= ``want`` (and >= 32) that divides the group, so that
    a step lies inside one group. Only an int8 weight with one group per row whose K is not
    a multiple of 32 has none; it steps by 32 and masks the tail (its group is the row)."""
    step = want
    while step > 32 and group % step:
        step //= 2
    return step


def fused_step(bits: int, group: int, k: int, block_k: int, scale_b: bool) -> tuple[int, bool]:
    """(BLOCK_K, SCALE_B) the fused kernel runs for a config's ``block_k`` and ``scale_b``:
    K steps inside one group (``_step``), except where those would be too narrow: int8 in
    groups of 16 (GGUF Q6_K) has none of 32, and int4 in groups of 32 (GGUF Q4_0/Q4_1/Q4_K)
    would load 16-byte rows of codes, a shared-memory tile Triton 3.6 can't build for its
    pipelined loads on Hopper ("Illegal shared layout": the compile aborts). Those steps
    span groups and the tile is scaled in registers, each group's columns by that group's
    scale (SCALE_B, ``_scale_groups``)."""
    if group != k and group < (64 if bits == 4 else 32):
        step = max(64, min(block_k, 128))
        while step > 64 and k % step:  # a step that divides K where one does (no masked tail)
            step //= 2
        return step, True
    return _step(group, max(32, block_k)), scale_b


#: programs below which the fused path narrows its column tile (about one per SM of an H100/H200)
_MIN_PROGRAMS = 120


def default_gemm_config(m: int, n: int, k: int, bits: int, group: int) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SCALE_B, SPLIT_K) for the fused
    path. The row tile grows with M (16, 32, 64; 128 rows on 8 warps for per-channel
    weights: grouped ones keep a per-step partial product beside the accumulator and spill
    at 128 rows). K steps of 128 inside a group (one dot of the full width per step:
    pair-order codes need no x gather). Up to 64 rows (memory-bound: batched decode) the
    column tile stays 128 wide and K is split until about every SM has a program (the
    first H200 profile had narrow column tiles 2-4x slower than bf16: each re-reads all of
    x and runs thin dots); more rows take the widest column tile that still fills the SMs,
    and deep pipelines go to few rows."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if m > 64 and group >= k:  # per-channel: one accumulator, a 128-row tile fits (no spills)
        block_m = 128
    warps = 8 if block_m == 128 else 4
    tiles_m = -(-m // block_m)
    block_k = _step(group, 128)
    stages = 5 if m <= 16 else 4 if m <= 64 else 3
    if m <= 64:
        tiles = tiles_m * -(-n // 128)
        split = 1
        while tiles * split < _MIN_PROGRAMS and split < 8 and k % (2 * split * block_k) == 0:
            split *= 2
        # 64 x 128 tiles on 4 warps hold acc and the per-step product in 255 registers and
        # spill a little (sm_90 build); 8 warps share them
        return block_m, 128, block_k, 8 if block_m == 64 else warps, stages, False, split
    block_n = 32
    for wide in (128, 64):
        if tiles_m * -(-n // wide) >= _MIN_PROGRAMS:
            block_n = wide
            break
    return block_m, block_n, block_k, warps, stages, False, 1


def gemm_path(rows: int, prepared: PreparedQuant, *, config: tuple | None = None, dequant_rows: int | None = None,
              swap_rows: int | None = None) -> str:
    """Which kernel ``quant_gemm`` runs for ``rows`` rows (same arguments): ``"mma"`` (the
    weight-stationary kernel: no ``config``, ``swaps``, up to ``swap_rows``, unless an explicit
    ``dequant_rows`` is at most ``rows``), else ``"dequant"`` from ``dequant_rows_for``'s
    threshold, else ``"fused"``."""
    bits, group, k = prepared.bits, prepared.group_size, prepared.in_features
    # above 64 rows (two x tiles) only the forms measured there: groups of 128+ and per channel
    # (GGUF's int4 in 32s steps K by 32: not timed with two x tiles)
    if config is None and swaps(bits, group, k) and k % 16 == 0 \
            and rows <= min(MAX_ROWS, SWAP_ROWS if swap_rows is None else swap_rows) \
            and (rows <= 64 or group >= 128) and (dequant_rows is None or rows < dequant_rows):
        return "mma"
    return "dequant" if rows >= dequant_rows_for(bits, group, k, dequant_rows) else "fused"


def quant_gemm(x: torch.Tensor, prepared: PreparedQuant, *, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: tuple[int, int, int, int, int] | None = None,
               dequant_rows: int | None = None, swap_rows: int | None = None, swiglu: bool = False) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [M, K] (bf16/fp16; fp32 for tests) and the ``prepared``
    int4/int8 weight; returns [M, N] in x's dtype (into ``out`` when given). M below
    ``dequant_rows`` (default ``dequant_rows_for``: int4, int8, grouped int8) runs the fused kernel with ``config``
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages; ``default_gemm_config`` when
    omitted; a sixth element ``True`` (SCALE_B) dequantizes each weight tile to x's dtype in
    registers before the dot: one accumulator, so 128-row tiles of grouped int4 fit, at
    the cost of rounding the weight like the dequantize path; a seventh, SPLIT_K > 1, splits
    K over that many programs per tile, see ``_launch_fused``), otherwise dequantize + cuBLAS.
    Without a ``config``, int4 with up to ``swap_rows`` rows (default ``SWAP_ROWS``) runs
    ``hearth_kernels/quant_mma.py`` instead of either (int8 per channel too: ``swaps``), unless
    an explicit ``dequant_rows`` is at most M.
    ``swiglu``: x is ``[gate | up]`` [M, 2K] and the product is of silu(gate) * up, rounded
    like ``hearth_kernels/activation.silu_and_mul`` (that kernel runs first)."""
    n, k = prepared.out_features, prepared.in_features
    _check_x("quant_gemm", x, k, swiglu)
    rows = x.shape[0]
    out = _check_bias_out("quant_gemm", x, rows, n, bias, out)
    if rows == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if swiglu:  # first on every path (inside quant_mma every program would repeat it)
        x = silu_and_mul(x)
    path = gemm_path(rows, prepared, config=config, dequant_rows=dequant_rows, swap_rows=swap_rows)
    if path == "mma":
        return quant_mma(x, prepared, bias=bias, out=out)
    if path == "dequant":
        w = dequantize_weight(prepared, x.dtype)
        if bias is None:
            return torch.mm(x, w.t(), out=out)
        return torch.addmm(bias, x, w.t(), out=out)
    cfg = tuple(config or default_gemm_config(rows, n, k, prepared.bits, prepared.group_size))  # 5 to 7 items
    block_m, block_n, block_k, warps, stages = cfg[:5]
    _launch_fused(x, prepared, bias, out, False, block_m, block_n, block_k, warps, stages,
                  scale_b=bool(cfg[5]) if len(cfg) > 5 else False, split_k=int(cfg[6]) if len(cfg) > 6 else 1)
    return out


def _launch_fused(x: torch.Tensor, prepared: PreparedQuant, bias: torch.Tensor | None, out: torch.Tensor,
                  swiglu: bool, block_m: int, block_n: int, block_k: int, warps: int, stages: int,
                  scale_b: bool = False, split_k: int = 1) -> None:
    """Launch the fused kernel (checked arguments; x [rows, K] or [rows, 2K] with swiglu).
    ``split_k`` > 1 splits K over that many programs per output tile (more programs and
    bytes in flight for few rows and small N; x read once per column tile instead of many
    narrow ones); each writes its fp32 partial sums into a [split_k, rows, N] scratch,
    summed in a fixed order and rounded into ``out`` (two small extra kernels; no atomics,
    so every run gives the same bits)."""
    rows, n, k = x.shape[0], prepared.out_features, prepared.in_features
    block_k, scale_b = fused_step(prepared.bits, prepared.group_size, k, block_k, scale_b)
    offset = 0
    if prepared.bits == 4:
        offset = {torch.bfloat16: 128, torch.float16: 1024}.get(x.dtype, 0)
    q, s, m = prepared.qweight, prepared.scales, prepared.mins
    steps = triton.cdiv(k, block_k)
    split_k = max(1, min(split_k, steps))
    while steps % split_k:  # every split the same whole number of steps
        split_k -= 1
    k_steps = steps // split_k
    y = out if split_k == 1 else torch.empty((split_k, rows, n), dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(n, block_n), split_k)
    _quant_gemm_kernel[grid](
        x, q, s, m if m is not None else s, bias if bias is not None else s, y, rows, n, k, k_steps,
        x.stride(0), q.stride(0), s.stride(0), y.stride(-2), y.stride(0) if split_k > 1 else 0,
        GROUP=prepared.group_size, BITS=prepared.bits,
        HAS_MIN=m is not None, HAS_BIAS=bias is not None, SWIGLU=swiglu, OFFSET=offset,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_FP32=_BF16_DOT_IN_FP32 and x.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PER_ROW=prepared.group_size == k, SCALE_B=scale_b, SPLIT_K=split_k,
        num_warps=warps, num_stages=stages)
    if split_k > 1:  # summed in a fixed order: the same result on every run (atomics would not be)
        out.copy_(y.sum(dim=0))
