"""RMSNorm with an optional fused residual add: plain torch, or one Triton kernel.

The kernel plan (``engine.layers.kernel_plan``) swaps each ``RMSNorm`` for a
``TritonRMSNorm`` sharing its weight when the load runs the fused kernels; neither reads
a flag while running.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 like the reference.

    With ``residual`` given, the sum ``x + residual`` is normalised and also returned as
    the new residual stream (saves one pass over memory once fused in a kernel).
    """

    def __init__(self, size: int, eps: float, *, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)

    def choose_kernels(self, plan) -> nn.Module:
        """This norm as the kernel plan runs it: itself, or a Triton one on the same weight."""
        return TritonRMSNorm(self) if plan.fused else self


class TritonRMSNorm(RMSNorm):
    """The same norm (and residual add) in one pass over memory: ``hearth_kernels/rmsnorm.py``."""

    def __init__(self, norm: RMSNorm) -> None:
        nn.Module.__init__(self)
        from hearth_kernels.rmsnorm import fused_add_rms_norm, rms_norm

        self.eps = norm.eps
        self.weight = norm.weight  # the same parameter: nothing is copied
        self._norm, self._add_norm = rms_norm, fused_add_rms_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm(x, residual, self.weight, self.eps)

    def choose_kernels(self, plan) -> nn.Module:
        return self
