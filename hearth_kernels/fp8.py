"""float8 (e4m3) matrix products: activations quantized per token, then ``torch._scaled_mm``.

    y[m, n] = a[m] * s[n] * sum_k X8[m, k] * W8[n, k]      (+ bias[n])

``W8`` [N, K] is the layer's e4m3 weight with one float32 scale ``s[n]`` per output row
(``engine.quant.rtn.quantize_fp8``); ``X8`` [M, K] is the input rounded to e4m3 with one
scale ``a[m] = max_k |x[m, k]| / 448`` per row (token), computed on the fly each call
("dynamic per-token" in vLLM's and llm-compressor's terms), so the largest value of every
token lands on e4m3's largest finite value and nothing saturates. ``torch._scaled_mm``
multiplies the two on the fp8 tensor cores (Ada, Hopper: twice bf16's rate) with fp32
accumulation and applies both scales in its epilogue (CUTLASS's row-wise scaling on sm90).

``quantize_rows`` is one Triton program per row (the GPU path; a row of up to 16,384
inputs read once into registers, a longer one twice: its absolute maximum, then the
rounding; with ``swiglu`` the MLP's ``silu(gate) * up`` is computed on the way, rounded like
the eager reference, so the [M, I] intermediate is never written in bf16); ``quantize_rows_reference`` is the same arithmetic in torch, the CPU path
and the tests' reference.

Batch-1 decode does not round the activations: one kernel per projection inside the CUDA
graph multiplies the e4m3 weights by x as it is, either the K-loop GEMV of
``hearth_kernels/gemv.py`` with a row scale or ``fp8_gemv_rows`` here, x-stationary (each program
loads x once into registers, then streams its rows ``R`` at a time, 16-byte vectors of
weights per thread, steps pipelined by Triton: no x traffic per step, and the row scales
are 4-byte loads its asynchronous copies take). The load-time tuner picks per layer.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hearth_kernels.split_fence import launch_fence
from hearth_kernels.pdl import pdl_args, pdl_start, pdl_wait
from hearth_kernels.rmsnorm import _rms_normalize
from hearth_kernels.quant_mma import _DOT_IN_FP32, _split, _tile_rows, _write_tile, block_m_for

#: the most rows ``fp8_mma`` takes (one x tile; it runs batch 1)
MAX_ROWS = 64

#: e4m3's largest finite value.
FP8_MAX = 448.0
#: The least activation scale: an all-zero row quantizes to zeros instead of NaN.
MIN_SCALE = 1e-12


def quantize_rows_reference(x: torch.Tensor, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] (with ``swiglu``: [M, 2K], ``silu(x[:, :K]) * x[:, K:]`` rounded to
    x's dtype first) -> (e4m3 [M, K], float32 scales [M, 1]); torch ops, any device."""
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    xf = x.float()
    # times the float32 reciprocal, not divided: torch's CUDA division by a Python number is a
    # multiplication by its reciprocal, its CPU one a division; a product rounds alike everywhere
    scale = (xf.abs().amax(dim=-1, keepdim=True) * (1.0 / FP8_MAX)).clamp_min(MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@triton.jit
def _act(x_ptr, k, K, ok, SWIGLU: tl.constexpr):
    """The row's inputs k (fp32): x, or SwiGLU's silu(gate) * up rounded like the reference."""
    if SWIGLU:
        dt = x_ptr.dtype.element_ty
        g = tl.load(x_ptr + k, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + K + k, mask=ok, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        return (a * u).to(dt).to(tl.float32)
    return tl.load(x_ptr + k, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _to_e4m3_grid(v):
    """``v`` (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32:
    the step at v's binade (3 mantissa bits; subnormal below 2**-6) from its exponent bits,
    then the add-and-subtract of 1.5 * 2**23 rounds v / step to an integer the way fp32
    addition rounds. The cast to e4m3 after it is exact, so every converter gives the same
    bytes (Triton's interpreter rounds some values wrongly: 125.4 to 64)."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return ((v / step + 12582912.0) - 12582912.0) * step


@triton.jit
def _div(v, scale):
    """``v / scale`` rounded as IEEE division (torch's): a compiled ``/`` is approximate
    (``div.full.f32``, up to 2 ulp), which moved a quotient near an e4m3 rounding boundary to
    the other side of it (the reference's bytes differed on the H200, now and then)."""
    return tl.math.div_rn(v, scale + tl.zeros_like(v))


@triton.jit
def _round_row(v, q_row, s_ptr, row, k, ok):
    """Row ``v`` (fp32, held whole) rounded to e4m3 at its own scale: the scale to ``s_ptr``,
    the codes to ``q_row`` at ``k`` (as ``quantize_rows_reference``)."""
    scale = tl.maximum(tl.max(tl.abs(v), axis=0) * (1.0 / 448.0), 1e-12)  # as the reference
    tl.store(s_ptr + row, scale)
    q = _to_e4m3_grid(tl.clamp(_div(v, scale), -448.0, 448.0))
    tl.store(q_row + k, q.to(q_row.dtype.element_ty), mask=ok)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                          SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK)
    if BLOCK >= K:  # the whole row in registers: one read
        ok = cols < K
        _round_row(_act(x_row, cols, K, ok, SWIGLU), q_row, s_ptr, row, cols, ok)
    else:  # longer rows: the absolute maximum first, then the rounding (the row read again, from L2)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + cols
            amax = tl.maximum(amax, tl.abs(_act(x_row, k, K, k < K, SWIGLU)))
        scale = tl.maximum(tl.max(amax, axis=0) * (1.0 / 448.0), 1e-12)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            k = k0 + cols
            ok = k < K
            q = _to_e4m3_grid(tl.clamp(_div(_act(x_row, k, K, ok, SWIGLU), scale), -448.0, 448.0))
            tl.store(q_row + k, q.to(q_ptr.dtype.element_ty), mask=ok)


#: Rows up to this long are rounded from registers in one read (fp32: 64 values a thread at 8 warps).
ONE_PASS_K = 16384


def quantize_rows(x: torch.Tensor, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows_reference`` in one Triton kernel (one program per row)."""
    if x.dim() != 2 or (swiglu and x.shape[1] % 2):
        raise ValueError("quantize_rows: x must be [M, K]" + (" with K even ([gate | up])" if swiglu else "")
                         + f", got {tuple(x.shape)}")
    m, width = x.shape
    k = width // 2 if swiglu else width
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(ONE_PASS_K, triton.next_power_of_2(max(k, 16)))
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), SWIGLU=swiglu, BLOCK=block,
                                    num_warps=8 if block >= 4096 else 4)
    return q, s


@triton.jit
def _norm_quantize_rows_kernel(x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, res_out_ptr, eps,
                               stride_xm, stride_rm, stride_qm, stride_rom,
                               N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                               PDL: tl.constexpr):
    pdl_start(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_xm + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:  # the residual add and the norm as hearth_kernels/rmsnorm.py rounds them
        r = tl.load(res_ptr + row * stride_rm + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_rom + cols, x, mask=ok)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    v = _rms_normalize(x, w, eps, N).to(x_ptr.dtype.element_ty).to(tl.float32)  # the norm's output, model dtype
    _round_row(v, q_ptr + row * stride_qm, s_ptr, row, cols, ok)  # then quantize_rows' rounding


def norm_quantize_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``quantize_rows(rms_norm(s))`` with ``s = x + residual`` (or ``x``) in one pass: the
    RMSNorm before an fp8 projection hands it e4m3 rows and their scales directly, the
    normalised rows never written in the model dtype. The same bits as
    ``hearth_kernels/rmsnorm.py`` then ``quantize_rows``. Returns ``(q [M, N] e4m3, scales
    [M, 1] float32, s)`` (``s`` is ``x`` itself without a residual)."""
    if x.dim() != 2 or weight.shape != (x.shape[1],) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"norm_quantize_rows: x must be [M, N] with weight [N] and residual like x, got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}"
                         + ("" if residual is None else f", {tuple(residual.shape)}"))
    m, n = x.shape
    if n > ONE_PASS_K:
        raise ValueError(f"norm_quantize_rows: rows of at most {ONE_PASS_K} inputs, got {n}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if residual is None:
        res, res_out = x, x
    else:
        res = residual if residual.stride(-1) == 1 else residual.contiguous()
        res_out = torch.empty_like(x)
    if m:
        block = triton.next_power_of_2(max(n, 16))
        _norm_quantize_rows_kernel[(m,)](x, res, weight, q, s, res_out, eps, x.stride(0), res.stride(0),
                                         q.stride(0), res_out.stride(0), N=n, BLOCK=block,
                                         HAS_RESIDUAL=residual is not None,
                                         # rmsnorm.py's warps: its sum of squares in the same order
                                         num_warps=min(max(block // 256, 1), 16), **pdl_args(x.device))
    return q, s, res_out


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a * s * (X8 @ W8.T) (+ bias)``: xq e4m3 [M, K] with x_scale [M, 1], weight e4m3
    [N, K] with w_scale float32 [N, 1]; [M, N] in ``out_dtype``. On the CPU (writing and
    testing checkpoints only) the same arithmetic in float32: e4m3 values and their
    products are exact there, and torch's CPU ``_scaled_mm`` takes row-wise scales only
    from torch 2.12 on (2.11's asserts per-tensor scaling)."""
    if xq.device.type == "cpu":
        y = (xq.float() @ weight.float().t() * x_scale * w_scale.view(1, -1)).to(out_dtype)
    else:
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=out_dtype)
    if bias is not None:
        y += bias.to(y.dtype)
    return y


@triton.jit
def _fp8_rows_ahead(w_ptr, rows, ok, k, k_ok, stride_wn):
    """One step's weights [R, KP] (rows not ``ok`` read row 0, unused)."""
    safe = tl.where(ok, rows, 0).to(tl.int64)
    return tl.load(w_ptr + safe[:, None] * stride_wn + k[None, :], mask=k_ok[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _fp8_rows_step(w, x, s_ptr, b_ptr, y_ptr, rows, ok, HAS_BIAS: tl.constexpr):
    safe = tl.where(ok, rows, 0).to(tl.int64)
    y = tl.sum(w.to(tl.float32) * x[None, :], axis=1) * tl.load(s_ptr + safe)
    if HAS_BIAS:
        y += tl.load(b_ptr + safe).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fp8_gemv_rows_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_wn,
                          HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, ROWS: tl.constexpr, R: tl.constexpr,
                          KP: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    k = tl.arange(0, KP)
    k_ok = k < K
    r = tl.arange(0, R)
    first = tl.program_id(0) * ROWS
    # the first step's weights are requested before x (with PDL, before waiting for the
    # kernel that writes x: hearth_kernels/pdl.py), then the other steps are pipelined
    ok0 = (first + r < N) & (r < ROWS)
    w0 = _fp8_rows_ahead(w_ptr, first + r, ok0, k, k_ok, stride_wn)
    pdl_wait(PDL)
    x = _act(x_ptr, k, K, k_ok, SWIGLU)  # [KP] fp32, in registers for every row
    _fp8_rows_step(w0, x, s_ptr, b_ptr, y_ptr, first + r, ok0, HAS_BIAS)
    for r0 in tl.range(R, ROWS, R, num_stages=STAGES):
        rows = first + r0 + r
        ok = (rows < N) & (r0 + r < ROWS)
        w = _fp8_rows_ahead(w_ptr, rows, ok, k, k_ok, stride_wn)
        _fp8_rows_step(w, x, s_ptr, b_ptr, y_ptr, rows, ok, HAS_BIAS)


#: x-stationary needs x in registers: at most this many inputs (the tuner's candidates use up
#: to 16 warps: 64 fp32 values of x a thread at 32,768).
ROWS_MAX_K = 32768


def fp8_gemv_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                  *, swiglu: bool = False, out: torch.Tensor | None = None,
                  config: tuple[int, int, int, int] = (16, 2, 8, 3)) -> torch.Tensor:
    """``x @ (weight * scale).T (+ bias)`` for one row, x-stationary (module docstring):
    x [1, K] (or [1, 2K] ``[gate | up]`` with ``swiglu``), weight e4m3 [N, K] with a
    contiguous last axis, scale float32 [N] or [N, 1]; [1, N] in x's dtype. ``config`` is
    (rows per program, rows per step, warps, steps in flight). No host sync, no allocation
    with ``out``: safe in a CUDA graph."""
    n, k = weight.shape
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != (2 * k if swiglu else k):
        raise ValueError(f"fp8_gemv_rows: x must be one row of {2 * k if swiglu else k}, got {tuple(x.shape)}")
    if weight.dtype != torch.float8_e4m3fn or weight.stride(1) != 1 or k > ROWS_MAX_K:
        raise ValueError(f"fp8_gemv_rows: needs an e4m3 [N, K <= {ROWS_MAX_K}] weight with a contiguous last axis, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    if scale.numel() != n or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"fp8_gemv_rows: scale must be {n} contiguous float32 row scales, got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"fp8_gemv_rows: bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    elif out.shape != (1, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"fp8_gemv_rows: out must be a contiguous {x.dtype} [1, {n}] tensor")
    rows, per_step, warps, stages = config
    per_step = 1 << (min(per_step, rows).bit_length() - 1)  # a power of 2 (tl.arange), at most rows
    x = x.contiguous()
    _fp8_gemv_rows_kernel[(triton.cdiv(n, rows),)](
        x, weight, scale, bias if bias is not None else scale, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, SWIGLU=swiglu, ROWS=rows, R=per_step,
        KP=triton.next_power_of_2(max(k, 16)), STAGES=stages, num_warps=warps, **pdl_args(x.device))
    return out


# The weight-stationary fp8 tensor-core product for few rows (batch-1 decode: a candidate of
# the load-time tuner beside the GEMVs above). x is rounded to e4m3 per token first
# (``quantize_rows``, as for prefill), so both operands are e4m3 and the weight tile goes from
# the cp.async ring straight into the wgmma: no conversion instruction per weight, only the
# loads and one dot a step, so the kernel can stream at the memory's speed where the GEMVs,
# which convert every weight on the CUDA cores, stall (2.4-3.8 TB/s on the 8B projections,
# benchmarks/results/2026-12-02-i17-profile-gemv-fp8-8b-h200.json). The weight rows are the
# dot's tall side, the (up to 64) x rows its narrow one, as in hearth_kernels/quant_mma.py,
# whose tile, split-K and store helpers it shares.

@triton.jit
def _fp8_mma_kernel(xq_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K_STEPS,
                    stride_xm, stride_wn, stride_ym,
                    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
                    FENCE: tl.constexpr = 0):
    tile, rn_safe, rm_safe, n_ok, m_ok = _tile_rows(M, N, BLOCK_N, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    step0 = tl.program_id(1) * K_STEPS
    for i in tl.range(0, K_STEPS, num_stages=STAGES):
        k0 = (step0 + i) * BLOCK_K
        w = tl.load(w_ptr + rn_safe[:, None] * stride_wn + (k0 + kk)[None, :], eviction_policy="evict_first")
        xq = tl.load(xq_ptr + rm_safe[:, None] * stride_xm + (k0 + kk)[None, :])  # [BLOCK_M, BLOCK_K]
        if DOT_FP32:  # the interpreter: the same e4m3 values, multiplied in fp32
            acc = tl.dot(w.to(tl.float32), tl.trans(xq.to(tl.float32)), acc, input_precision="ieee")
        else:  # full fp32 accumulation (Hopper's fp8 wgmma otherwise keeps fewer bits across K), as scaled_mm
            acc = tl.dot(w, tl.trans(xq), acc, max_num_imprecise_acc=BLOCK_K)
    acc = acc * tl.load(s_ptr + rn_safe)[:, None] * tl.load(xs_ptr + rm_safe)[None, :]
    _write_tile(acc, tile, rn_safe, rm_safe, n_ok, m_ok, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, FENCE)


#: fp8_mma's configs the tuner times: (weight rows a program, inputs a step, warps, steps in
#: flight, K split), from 64-row wgmma tiles (4 warps) to 128 (8 warps); K split so that
#: the narrow layers (N = 4096-6144) put a program on every SM
FP8_MMA_CONFIGS = ((64, 256, 4, 4, 4), (64, 256, 4, 4, 2), (128, 256, 8, 4, 1), (64, 128, 4, 6, 4))


def fp8_mma_enabled() -> bool:
    """Whether the batch-1 tuner times ``fp8_mma``: yes unless ``HEARTH_FP8_MMA=0`` (where it
    wins, batch-1 steps round their activations to e4m3 like prompt steps; the GEMVs don't)."""
    return os.environ.get("HEARTH_FP8_MMA", "1") != "0"


def fp8_mma_fits(k: int, config: tuple[int, ...]) -> bool:
    """Whether ``fp8_mma`` takes a K of ``k`` with ``config``: whole steps, split evenly."""
    block_k, split = config[1], config[4]
    return k % block_k == 0 and (k // block_k) % split == 0


def fp8_mma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
            swiglu: bool = False, out: torch.Tensor | None = None,
            config: tuple[int, int, int, int, int] = FP8_MMA_CONFIGS[0]) -> torch.Tensor:
    """``a * s * (round_e4m3(x / a) @ W8.T) (+ bias)`` for up to 64 rows of x (``[gate | up]``
    with ``swiglu``) on the tensor cores, x rounded per token by ``quantize_rows`` (so the
    product is ``scaled_mm``'s); weight e4m3 [N, K] (last axis contiguous), scale float32 [N]
    or [N, 1]; [M, N] in x's dtype, into ``out`` when given. ``config``: (BLOCK_N, BLOCK_K,
    warps, stages, split_k), ``fp8_mma_fits``. Capturable in a CUDA graph once a split-K
    launch has run outside capture (hearth_kernels/counters.py)."""
    n, k = weight.shape
    rows = x.shape[0]
    if x.dim() != 2 or not 1 <= rows <= MAX_ROWS or x.shape[1] != (2 * k if swiglu else k):
        raise ValueError(f"fp8_mma: x must be 1 to {MAX_ROWS} rows of {2 * k if swiglu else k}, got {tuple(x.shape)}")
    if weight.dtype != torch.float8_e4m3fn or weight.stride(1) != 1:
        raise ValueError(f"fp8_mma: needs an e4m3 weight with a contiguous last axis, got {weight.dtype}")
    if scale.numel() != n or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"fp8_mma: scale must be {n} contiguous float32 row scales, got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if not fp8_mma_fits(k, config):
        raise ValueError(f"fp8_mma: config {tuple(config)} does not step evenly through K = {k}")
    if out is None:
        out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    elif out.shape != (rows, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"fp8_mma: out must be a {x.dtype} [{rows}, {n}] tensor with a contiguous last axis")
    xq, xs = quantize_rows(x, swiglu)
    block_n, block_k, warps, stages, split = config
    block_m = block_m_for(rows)
    tiles, split, ws, cnt = _split(block_n, split, k // block_k, n, rows, block_m, scale)
    _fp8_mma_kernel[(tiles, split)](
        xq, xs, weight, scale, bias if bias is not None else scale, out, ws, cnt, rows, n, k // block_k // split,
        xq.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        DOT_FP32=_DOT_IN_FP32, BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_M=block_m, SPLIT_K=split, STAGES=stages, FENCE=launch_fence(split),
        num_warps=warps)
    return out
