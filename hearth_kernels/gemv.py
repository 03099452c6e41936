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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         swiglu: bool = False, out: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for one row: x [1, K] (or [1, 2K] with ``swiglu``),
    weight [N, K] with a contiguous last axis; returns [1, N] in x's dtype. With ``scale``
    (float32, one per row) the weight may be float8 and row n's product is multiplied by
    ``scale[n]``.

    ``config`` is (BLOCK_N, BLOCK_K, num_warps); ``default_config`` when omitted.
    """
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
    block_n, block_k, warps = config or default_config(n, k)
    block_k = min(block_k, triton.next_power_of_2(max(k, 16)))  # no wider than the row
    grid = (triton.cdiv(n, block_n),)
    s_arg = scale if scale is not None else weight
    b_arg = bias if bias is not None else weight
    _gemv_kernel[grid](x, weight, s_arg, b_arg, out, n, k, weight.stride(0), HAS_SCALE=scale is not None,
                       HAS_BIAS=bias is not None, SWIGLU=swiglu, BLOCK_N=block_n, BLOCK_K=block_k,
                       EVEN_K=k % block_k == 0, num_warps=warps, **pdl_args(x.device))
    return out
