"""RMSNorm, optionally fused with the residual add that precedes it.

    y = weight * (x / sqrt(mean(x^2) + eps))            (Zhang & Sennrich, 2019)

Rounding follows Hearth's reference (``engine.layers.norm.RMSNorm``, itself following
Hugging Face Llama) step for step, so bf16 results match it to within an ulp or two:

    x = (x + residual) rounded to the model dtype      (the new residual stream)
    h = x.float() * rsqrt(mean(x.float()^2) + eps)    fp32
    y = (weight * h.to(dtype)) rounded to the model dtype

One program normalises one row held entirely in registers (rows are at most a few
thousand wide in the models Hearth runs), so x is read once and y written once: the
kernel is a single pass over memory, which is all a memory-bound op can ask for. Works on
``[T, N]`` and on ``[T, H, D]`` (per-head q/k norm of Qwen3: normalise the last axis),
including strided views such as slices of a fused qkv output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hearth_kernels.pdl import pdl_args, pdl_start, pdl_wait

# Beyond this a row no longer fits in one program's registers.
_MAX_ROW = 65536


@triton.jit
def _rms_normalize(x, w, eps, N: tl.constexpr):
    """``w * x / rms(x)`` of one row ``x`` (the model dtype; ``w`` fp32), in fp32, before its
    last rounding: the reference's steps (shared with ``hearth_kernels/fp8.py``'s norm)."""
    h = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    h = (h * inv_rms).to(x.dtype).to(tl.float32)
    return w * h


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    inner, stride_x0, stride_x1, stride_r0, stride_r1,
    stride_o0, stride_o1, stride_ro0, stride_ro1,
    eps, N: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    pdl_wait(PDL)  # (hearth_kernels/pdl.py)
    pid = tl.program_id(0)
    # Rows are indexed by up to two leading axes ([T, H, D] views are not one-stride).
    i0 = (pid // inner).to(tl.int64)
    i1 = (pid % inner).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + i0 * stride_x0 + i1 * stride_x1 + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + i0 * stride_r0 + i1 * stride_r1 + cols, mask=mask, other=0.0)
        # Round the sum to the model dtype first: that rounded value is the residual stream.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + i0 * stride_ro0 + i1 * stride_ro1 + cols, x, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = _rms_normalize(x, w, eps, N).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + i0 * stride_o0 + i1 * stride_o1 + cols, y, mask=mask)


def _rows(t: torch.Tensor, name: str) -> tuple[int, int, int, int]:
    """(outer, inner, stride0, stride1) of the leading axes of a 2-D or 3-D tensor."""
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.stride(0), t.stride(1)
    raise ValueError(f"rms_norm: {name} must be [T, N] or [T, H, D], got shape {tuple(t.shape)}")


def _check(x: torch.Tensor, weight: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    n = x.shape[-1] if x.dim() else 0
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight must have shape [{n}] (the last axis of x), "
                         f"got {tuple(weight.shape)}")
    if n > _MAX_ROW:
        raise ValueError(f"rms_norm: rows of {n} elements are too wide for this kernel "
                         f"(max {_MAX_ROW}); use engine.layers.norm.RMSNorm")
    for name, t in {"x": x, **others}.items():
        if t.shape != x.shape:
            raise ValueError(f"rms_norm: {name} has shape {tuple(t.shape)}, expected {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"rms_norm: {name} is {t.dtype} but x is {x.dtype}; use one dtype")
        if t.stride(-1) != 1:
            raise ValueError(f"rms_norm: the last axis of {name} must be contiguous (stride 1)")
    if not weight.is_contiguous():
        raise ValueError("rms_norm: weight must be contiguous")


def _launch(x, residual, weight, eps, out, res_out) -> None:
    outer, inner, sx0, sx1 = _rows(x, "x")
    if outer * inner == 0:
        return
    n = x.shape[-1]
    block = triton.next_power_of_2(n)
    _, _, so0, so1 = _rows(out, "out")
    has_residual = residual is not None
    if has_residual:
        _, _, sr0, sr1 = _rows(residual, "residual")
        _, _, sro0, sro1 = _rows(res_out, "residual_out")
    else:
        residual, res_out = x, out  # unused (HAS_RESIDUAL=False); any valid pointer will do
        sr0 = sr1 = sro0 = sro1 = 0
    # ~8 elements per thread keeps the row in registers without spilling.
    warps = min(max(block // 256, 1), 16)
    _rms_norm_kernel[(outer * inner,)](
        x, residual, weight, out, res_out, inner, sx0, sx1, sr0, sr1, so0, so1, sro0, sro1,
        eps, N=n, BLOCK_N=block, HAS_RESIDUAL=has_residual, num_warps=warps, **pdl_args(x.device),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMS-normalise the last axis of ``x`` ([T, N] or [T, H, D]) and scale by ``weight``.

    Returns ``out`` (allocated like ``x`` if not given). ``x`` may be a strided view whose
    last axis is contiguous.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check(x, weight, {"out": out})
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       *, out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in x's dtype), then ``(rms_norm(s), s)`` in one pass.

    Returns ``(out, new_residual)``; both are new tensors unless ``out`` / ``residual_out``
    are given. Passing ``residual_out=residual`` (or ``out=x``) updates in place, which is
    safe: each program reads its whole row before writing it.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check(x, weight, {"residual": residual, "out": out, "residual_out": residual_out})
    _launch(x, residual, weight, eps, out, residual_out)
    return out, residual_out
