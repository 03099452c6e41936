"""float8 (e4m3) matrix products: activations quantized per token, then ``torch._scaled_mm``.

    y[m, n] = a[m] * s[n] * sum_k X8[m, k] * W8[n, k]      (+ bias[n])

``W8`` [N, K] is the layer's e4m3 weight with one float32 scale ``s[n]`` per output row
(``engine.quant.rtn.quantize_fp8``); ``X8`` [M, K] is the input rounded to e4m3 with one
scale ``a[m] = max_k |x[m, k]| / 448`` per row (token), computed on the fly each call
("dynamic per-token" in vLLM's and llm-compressor's terms), so the largest value of every
token lands on e4m3's largest finite value and nothing saturates. ``torch._scaled_mm``
multiplies the two on the fp8 tensor cores (Ada, Hopper: twice bf16's rate) with fp32
accumulation and applies both scales in its epilogue (CUTLASS's row-wise scaling on sm90).

``quantize_rows`` is one Triton pass per row (the GPU path; the row read twice from L2: its
absolute maximum, then the rounding; with ``swiglu`` the MLP's ``silu(gate) * up`` is
computed on the way, rounded like the eager reference, so the [M, I] intermediate is never
written in bf16); ``quantize_rows_reference`` is the same arithmetic in torch, the CPU path
and the tests' reference.

Batch-1 decode does not come here: it runs the fp8-weight GEMV (``kernels/gemv.py`` with a
row scale) on the unrounded activations, one kernel per projection inside the CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
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
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                          SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + cols
        amax = tl.maximum(amax, tl.abs(_act(x_row, k, K, k < K, SWIGLU)))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        k = k0 + cols
        ok = k < K
        v = _to_e4m3_grid(tl.clamp(_act(x_row, k, K, ok, SWIGLU) / scale, -448.0, 448.0))
        tl.store(q_ptr + row * stride_qm + k, v.to(q_ptr.dtype.element_ty), mask=ok)


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
        block = min(4096, triton.next_power_of_2(max(k, 16)))
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), SWIGLU=swiglu, BLOCK=block,
                                    num_warps=8 if block >= 2048 else 4)
    return q, s


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a * s * (X8 @ W8.T) (+ bias)``: xq e4m3 [M, K] with x_scale [M, 1], weight e4m3
    [N, K] with w_scale float32 [N, 1]; [M, N] in ``out_dtype``."""
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=out_dtype)
    if bias is not None:
        y += bias.to(y.dtype)
    return y
