"""Linear layers of the native models: cuBLAS, or Hearth's Triton GEMV for one row.

A batch-1 decode step is a stream over the weights, and on an H100 the Triton GEMV in
``kernels/gemv.py`` read them 10-30% faster than cuBLAS for every Llama-8B projection
(benchmarks/results/*-profile-gemv-8b-h100.json). Which one runs is decided per kind of
layer at load time by timing both on the model's own weights (``engine/runner/gemv_tuning.py``),
and recorded on the layer as ``gemv_config`` (None: cuBLAS). Only single-row inputs take
the GEMV path; everything else (prefill, batched decode) is a plain matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(layer: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ layer.weight.T (+ bias)``; ``layer`` may also be a tied head's nn.Embedding.
    ``out`` (contiguous, [rows, N]) receives the result when given."""
    config = getattr(layer, "gemv_config", None)
    bias = getattr(layer, "bias", None)
    if config is not None and x.shape[0] == 1:
        from kernels.gemv import gemv

        return gemv(x, layer.weight, bias, config=config, out=out)
    if out is None:
        return F.linear(x, layer.weight, bias)
    if bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(bias, x, layer.weight.t(), out=out)


def swiglu_linear(layer: nn.Linear, gate_up: torch.Tensor) -> torch.Tensor | None:
    """``layer(silu(gate) * up)`` in one GEMV for a single row, or None when the layer
    has no GEMV config or there is more than one row (the caller runs the unfused path)."""
    config = getattr(layer, "gemv_config", None)
    if config is None or gate_up.shape[0] != 1:
        return None
    from kernels.gemv import gemv

    return gemv(gate_up, layer.weight, layer.bias, swiglu=True, config=config)
