"""SwiGLU's gate: ``silu(gate) * up`` on a fused ``[T, 2I]`` gate_up projection.

    silu(g) = g * sigmoid(g)                  (Elfwing et al. 2018; SwiGLU: Shazeer 2020)
    out     = silu(x[:, :I]) * x[:, I:]

Rounding follows the eager reference ``F.silu(gate) * up``: silu is computed in fp32 and
rounded to the model dtype, then multiplied by ``up`` and rounded again. Fusing the two
saves a round trip of the ``[T, I]`` intermediate through memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hearth_kernels.pdl import pdl_args, pdl_start, pdl_wait

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, stride_ot, inter,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    pdl_wait(PDL)  # (hearth_kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    base = x_ptr + row * stride_xt
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_ot + cols, (act * u).to(dt), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` of shape ``[T, 2I]``; returns ``[T, I]``.

    ``x`` may have any row stride but its last axis must be contiguous. ``out`` (``[T, I]``,
    x's dtype) is allocated if not given.
    """
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_and_mul: x must be [T, 2*I], got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError("silu_and_mul: the last axis of x must be contiguous (stride 1)")
    t, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((t, inter), dtype=x.dtype, device=x.device)
    elif out.shape != (t, inter) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"silu_and_mul: out must be a {x.dtype} [{t}, {inter}] tensor with a "
                         f"contiguous last axis, got {out.dtype} {tuple(out.shape)}")
    if t == 0 or inter == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inter))
    grid = (t, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), inter, BLOCK=block,
                               num_warps=4 if block >= 512 else 1, **pdl_args(x.device))
    return out
