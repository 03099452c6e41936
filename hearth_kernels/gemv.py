"""Matrix-vector product for batch-1 decode: ``y = W x (+ b)``, optionally ``x = silu(g) * u``.

    y[n] = sum_k W[n, k] * x[k]                         W: [N, K] (nn.Linear layout), x: [K]
    with SWIGLU: x[k] = round(round(silu(g[k])) * u[k])  for an input [g | u] of length 2K

At batch 1 a linear layer is a pure weight stream: every weight byte is read once and used
for one multiply-add, so the only figure of merit is the fraction of memory bandwidth it
reaches (roofline; Williams et al. 2009). cuBLAS picks split-K tiles for some of these
shapes (an extra reduction kernel per call) and reached only 1.7 TB/s on Llama-8B's
``o_proj`` on an H100 (benchmarks/results/*-profile-kernels-8b-h100.json).

This kernel gives each program ``BLOCK_N`` whole output rows: it streams their ``K``
weights in ``BLOCK_K`` chunks (contiguous along K, so loads coalesce), keeps a
``[BLOCK_N, BLOCK_K]`` fp32 partial-product tile in registers, and reduces it once at the
end, so there is no split-K pass and no atomics; the result is the same for every launch.
The vector chunk is re-read by every program from L2 (it is tiny). With ``SWIGLU`` the
activation of the MLP (``silu(gate) * up``, rounded like the eager reference, see
``hearth_kernels/activation.py``) is computed on the fly from the gate_up output, so the
``[I]`` intermediate never goes through memory and its kernel disappears.

With ``scale`` the weight is stored in fewer bits (float8 e4m3: ``hearth_kernels/fp8.py``) with one
float32 scale per output row: the kernel widens each weight to fp32 and multiplies the row's
sum by its scale, ``y[n] = s[n] * sum_k W8[n, k] * x[k]``.

Summation order differs from cuBLAS (fp32 accumulation in both): results agree to fp32
rounding of the dot products, then to one rounding to the output dtype.

``gemv_tma`` (a ``TmaConfig``; Hopper and newer) is the same K loop with each step's weight
tile brought by one TMA bulk copy into shared memory, ``stages`` - 1 steps ahead (Triton's
pipeliner with mbarriers), so the bytes in flight cost no registers: the dp4a GEMV of
``hearth_kernels/quant_dp4a.py`` fed that way ran an H100's down projection from L2 in 8.2 us
where its register-pipelined form took 13.4 (benchmarks/QUANT_LOG.md). Offered for float8
weights, whose batch-1 GEMVs read 2.4-3.8 TB/s of an H200's 4.8.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hearth_kernels._compat import interpreting
from hearth_kernels.pdl import pdl_args, pdl_start, pdl_wait


@triton.jit
def _kloop_ahead(w_ptr, rows_safe, stride_wn, k, K, EVEN_K: tl.constexpr):
    """One K step's weight tile [BLOCK_N, BLOCK_K] (columns past K read as 0)."""
    w_rows = w_ptr + rows_safe[:, None] * stride_wn
    if EVEN_K:
        w = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
    else:
        w = tl.load(w_rows + k[None, :], mask=(k < K)[None, :], other=0.0, eviction_policy="evict_first")
    return w


@triton.jit
def _kloop_step(acc, w, x_ptr, k, K, SWIGLU: tl.constexpr, EVEN_K: tl.constexpr):
    """``acc`` plus one K step's products: the weight tile ``w`` times x[k] (SWIGLU: times
    silu(x[k]) * x[K + k], rounded to x's dtype as the unfused MLP rounds it)."""
    dt = x_ptr.dtype.element_ty
    if EVEN_K:
        if SWIGLU:
            g = tl.load(x_ptr + k).to(tl.float32)
            u = tl.load(x_ptr + K + k).to(tl.float32)
        else:
            xk = tl.load(x_ptr + k)
    else:
        k_ok = k < K
        if SWIGLU:
            g = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + k, mask=k_ok, other=0.0).to(tl.float32)
        else:
            xk = tl.load(x_ptr + k, mask=k_ok, other=0.0)
    if SWIGLU:
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        xk = (act * u).to(dt)
    return acc + w.to(tl.float32) * xk.to(tl.float32)[None, :]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_wn,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_safe = tl.where(row_ok, rows, 0).to(tl.int64)  # clamp: loads stay in bounds unmasked
    cols = tl.arange(0, BLOCK_K)
    # the first step's weights are requested before the wait, so that their memory round
    # trip overlaps the end of the kernel before (which writes x; hearth_kernels/pdl.py)
    w = _kloop_ahead(w_ptr, rows_safe, stride_wn, cols, K, EVEN_K)
    pdl_wait(PDL)
    acc = _kloop_step(tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), w, x_ptr, cols, K, SWIGLU, EVEN_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + cols
        acc = _kloop_step(acc, _kloop_ahead(w_ptr, rows_safe, stride_wn, k, K, EVEN_K), x_ptr, k, K, SWIGLU, EVEN_K)
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y *= tl.load(s_ptr + rows_safe).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def default_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [n, k] weight: 8 rows x 512 columns per program
    (8 KiB of bf16 weights per loop step) and 4 warps; fewer rows when n is small so that
    the grid still covers the GPU."""
    block_k = min(512, triton.next_power_of_2(max(k, 16)))
    block_n = 8 if n >= 8 * 512 else 4 if n >= 4 * 256 else 2
    return block_n, block_k, 4


def _checked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
             out: torch.Tensor | None, scale: torch.Tensor | None):
    """``gemv``'s argument checks: (x contiguous, out, the scale and bias arguments)."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv: x must be one row [1, K], got shape {tuple(x.shape)}; "
                         "use a matmul for more rows")
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"gemv: weight must be [N, K] with a contiguous last axis, got "
                         f"shape {tuple(weight.shape)} strides {weight.stride()}")
    n, k = weight.shape
    want = 2 * k if swiglu else k
    if x.shape[1] != want:
        raise ValueError(f"gemv: x has {x.shape[1]} columns, the weight needs {want}"
                         + (" ([gate | up] of the MLP)" if swiglu else ""))
    if scale is None and x.dtype != weight.dtype:
        raise ValueError(f"gemv: x is {x.dtype} but the weight is {weight.dtype}")
    if scale is not None and (scale.numel() != n or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"gemv: scale must be a contiguous float32 tensor of {n} row scales, got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"gemv: bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    x = x.contiguous()
    if out is None:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    elif out.shape != (1, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"gemv: out must be a contiguous {x.dtype} [1, {n}] tensor")
    return x, out, scale if scale is not None else weight, bias if bias is not None else weight


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         swiglu: bool = False, out: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for one row: x [1, K] (or [1, 2K] with ``swiglu``),
    weight [N, K] with a contiguous last axis; returns [1, N] in x's dtype. With ``scale``
    (float32, one per row) the weight may be float8 and row n's product is multiplied by
    ``scale[n]``.

    ``config`` is (BLOCK_N, BLOCK_K, num_warps); ``default_config`` when omitted.
    """
    x, out, s_arg, b_arg = _checked(x, weight, bias, swiglu, out, scale)
    n, k = weight.shape
    block_n, block_k, warps = config or default_config(n, k)
    block_k = min(block_k, triton.next_power_of_2(max(k, 16)))  # no wider than the row
    grid = (triton.cdiv(n, block_n),)
    _gemv_kernel[grid](x, weight, s_arg, b_arg, out, n, k, weight.stride(0), HAS_SCALE=scale is not None,
                       HAS_BIAS=bias is not None, SWIGLU=swiglu, BLOCK_N=block_n, BLOCK_K=block_k,
                       EVEN_K=k % block_k == 0, num_warps=warps, **pdl_args(x.device))
    return out


class TmaConfig(NamedTuple):
    """``gemv_tma``'s launch: rows per program, K step (weights), warps, pipeline stages."""

    block_n: int
    block_k: int
    warps: int
    stages: int


#: rows and K-step bytes of a weight tile the TMA GEMV takes: TMA boxes of up to 256 elements a
#: side (Triton splits wider ones), shared memory for the ring of ``stages`` - 1 tiles
TMA_MAX_ROW_BYTES = 1024
TMA_MAX_SMEM = 200_000


def tma_available(device: torch.device) -> bool:
    """Whether TMA GEMVs run on ``device``: a Hopper or newer GPU, or Triton's interpreter
    (which emulates the descriptors: the CPU tests)."""
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def tma_listed() -> bool:
    """Whether the load-time tuners time the TMA GEMVs (this one, and the dp4a kind of
    ``hearth_kernels/quant_gemv.py``): where the current CUDA device has TMA, or under the
    interpreter, unless ``HEARTH_QUANT_TMA=0`` (for A/B runs)."""
    if os.environ.get("HEARTH_QUANT_TMA", "1") == "0":
        return False
    cuda = torch.cuda.is_available()
    return tma_available(torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))


def tma_problem(k: int, itemsize: int, config: TmaConfig) -> str | None:
    """Why ``config`` can't run a [*, k] weight of ``itemsize``-byte elements (None: it can)."""
    bn, bk, _, stages = config
    if bn & (bn - 1) or bk & (bk - 1) or not 1 <= bn <= 256 or bk * itemsize > TMA_MAX_ROW_BYTES or bk * itemsize < 16:
        return (f"a TMA GEMV config needs a power of 2 of rows (at most 256) and a K step a power of 2 of 16 to "
                f"{TMA_MAX_ROW_BYTES} bytes a row, got {bn} rows, steps of {bk}")
    if (k * itemsize) % 16:
        return f"a TMA GEMV needs rows of a multiple of 16 bytes, got K {k} of {itemsize}-byte weights"
    if stages < 1:
        return f"a TMA GEMV config needs at least 1 stage, got {stages}"
    if (stages - 1) * (bn * bk * itemsize + 4 * bk) > TMA_MAX_SMEM:  # weight tiles, x's chunks (SwiGLU: two)
        return f"a TMA GEMV config's {stages - 1} tiles of {bn} x {bk} in flight pass {TMA_MAX_SMEM // 1000} KB"
    return None


@triton.jit
def _gemv_tma_kernel(x_ptr, w_desc, s_ptr, b_ptr, y_ptr, N, K,
                     HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, STAGES: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    # w_desc: the weight [N, K], a [BLOCK_N, BLOCK_K] box (zeros past N and K)
    pdl_start(PDL)
    n0 = tl.program_id(0) * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_safe = tl.where(row_ok, rows, 0)
    cols = tl.arange(0, BLOCK_K)
    pdl_wait(PDL)  # the pipeliner's first copies follow it (the PDL contract: one top-level wait)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        acc = _kloop_step(acc, w_desc.load([n0, k0]), x_ptr, k0 + cols, K, SWIGLU, EVEN_K)
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y *= tl.load(s_ptr + rows_safe).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_safe).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv_tma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
             swiglu: bool = False, out: torch.Tensor | None = None, config: TmaConfig,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """``gemv`` with each K step's weight tile brought by TMA (``TmaConfig``; Hopper and
    newer, or the interpreter): the same products, summed in steps of ``config.block_k``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    x, out, s_arg, b_arg = _checked(x, weight, bias, swiglu, out, scale)
    config = TmaConfig(*config)
    n, k = weight.shape
    problem = tma_problem(k, weight.element_size(), config)
    if problem is None and not tma_available(x.device):
        problem = "the TMA GEMV needs a Hopper or newer GPU (TMA)"
    if problem is None and (weight.data_ptr() % 16 or (weight.stride(0) * weight.element_size()) % 16):
        problem = "the TMA GEMV needs the weight 16-byte aligned, rows included"
    if problem is not None:
        raise ValueError(f"gemv: {problem}")
    desc = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [config.block_n, config.block_k])
    _gemv_tma_kernel[(triton.cdiv(n, config.block_n),)](
        x, desc, s_arg, b_arg, out, n, k, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, SWIGLU=swiglu,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, STAGES=config.stages, EVEN_K=k % config.block_k == 0,
        num_warps=config.warps, **pdl_args(x.device))
    return out
