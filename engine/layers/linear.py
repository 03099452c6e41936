"""The native models' projections, each a module whose ``forward`` owns its kernel choice.

``Linear`` computes ``x @ W.T (+ b)`` with the kernel object it holds
(``engine.layers.linear_kernels``): torch's matmul (cuBLAS) until the load-time GEMV tuner
(``engine/runner/gemv_tuning.py``) times the module's ``kernel_candidates`` through the
module itself and fixes the fastest with ``use_kernel``. Model code only ever calls the
modules, so a module swapped in at load (a quantized linear, a tensor-parallel shard, a
reference implementation in a test) is what runs.

The fused variants: ``QKVLinear`` (q, k and v in one matmul, knowing each one's rows),
``MergedLinear`` (e.g. the MLP's gate and up), ``SwiGLUDownLinear`` (the down projection
over SwiGLU's ``[gate | up]``, so one row can run as one fused GEMV) and ``TiedLMHead``
(the head that shares the embedding's matrix). Each declares which checkpoint tensors
fill it (``checkpoint_shards``) and gives its parameters their loaders
(``engine.layers.weight_loader``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import nn

from engine.layers.linear_kernels import (GatedGemvForOneRow, GatedMatmul, GemvForOneRow, LinearKernel, Matmul,
                                          gemv_configs, silu_and_mul_reference, silu_and_mul_triton)
from engine.layers.weight_loader import row_shards, set_weight_loader


class Linear(nn.Module):
    """``y = x @ weight.T (+ bias)``, weight ``[out_features, in_features]`` (nn.Linear's
    layout), computed by ``self.kernel`` (fixed at load)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.kernel: LinearKernel = Matmul()

    @property
    def input_width(self) -> int:
        """Columns of the input ``forward`` takes."""
        return self.in_features

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [rows, input_width] -> [rows, out_features]; into ``out`` (contiguous) when
        given (the CUDA graphs write every bucket's logits into one buffer)."""
        return self.kernel(x, self.weight, self.bias, out)

    def normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        """``(self(norm(s)), s)`` with ``s = x + residual`` (``x`` without one): the
        RMSNorm before a projection (``norm_then_project``; a quantized projection may run
        both in one kernel, see ``QuantizedLinear.normed``)."""
        return norm_then_project(self, x, residual, norm)

    def use_kernel(self, kernel: LinearKernel) -> None:
        """Fix the kernel this module runs (the GEMV tuner, at load)."""
        self.kernel = kernel

    def gemv_kernel(self, config: tuple[int, int, int]) -> LinearKernel:
        """The Triton GEMV for one row with ``config``, as this module would run it."""
        return GemvForOneRow(config)

    def kernel_candidates(self) -> list[LinearKernel]:
        """The kernels worth timing for this module at batch 1, the baseline (cuBLAS) first."""
        return [Matmul()] + [self.gemv_kernel(c) for c in gemv_configs(*self.weight.shape)]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel!r}")


def norm_then_project(proj: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
    """``(proj(norm(s)), s)``, ``s = x + residual`` (the norm's fused add) or ``x``: the norm
    and the projection as two calls (hooks on ``proj`` see its normalised input)."""
    if residual is None:
        h, residual = norm(x), x
    else:
        h, residual = norm(x, residual)
    return proj(h), residual


class MergedLinear(Linear):
    """Several projections of one input stacked as row blocks of one weight (one matmul):
    checkpoint module ``checkpoint_names[i]`` fills rows ``output_sizes[i]`` of it, in
    order, as shard ``i``."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], checkpoint_names: Sequence[str],
                 bias: bool = False, *, dtype: torch.dtype | None = None,
                 shard_ids: Sequence[Hashable] | None = None) -> None:
        if len(output_sizes) != len(checkpoint_names):
            raise ValueError("one output size per checkpoint name")
        super().__init__(in_features, sum(output_sizes), bias, dtype=dtype)
        ids = list(shard_ids) if shard_ids is not None else list(range(len(output_sizes)))
        starts = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        # shard id -> (first row, rows)
        self.shard_offsets = {sid: (start, size) for sid, start, size in zip(ids, starts, output_sizes)}
        # checkpoint module name -> shard id (read by engine.layers.weight_loader)
        self.checkpoint_shards = dict(zip(checkpoint_names, ids))
        loader = row_shards(self.shard_offsets)
        for param in self.parameters(recurse=False):
            set_weight_loader(param, loader)


class QKVLinear(MergedLinear):
    """q, k and v of one attention layer in one matmul: rows ``[q | k | v]`` of sizes
    ``num_heads * head_dim`` and ``num_kv_heads * head_dim`` (twice), shards "q", "k", "v".
    A tensor-parallel shard would be built with its own (fewer) heads."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool = False, *, dtype: torch.dtype | None = None,
                 checkpoint_names: Sequence[str] = ("q_proj", "k_proj", "v_proj")) -> None:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], checkpoint_names, bias,
                         dtype=dtype, shard_ids=("q", "k", "v"))
        self.q_size, self.kv_size = q_size, kv_size


class SwiGLUDownLinear(Linear):
    """The MLP's down projection over SwiGLU's activation: ``forward`` takes the gate_up
    projection's ``[gate | up]`` (``2 * in_features`` columns) and returns
    ``(silu(gate) * up) @ weight.T``. Holding the activation in its kernel lets one row run
    as one GEMV; the kernel plan picks the reference or the Triton activation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype=dtype)
        self.kernel = GatedMatmul(silu_and_mul_reference)

    @property
    def input_width(self) -> int:
        return 2 * self.in_features

    def choose_kernels(self, plan) -> "SwiGLUDownLinear":
        """The kernel plan's activation: SiLU-and-mul in one Triton kernel when fused."""
        self.kernel = GatedMatmul(silu_and_mul_triton() if plan.fused else silu_and_mul_reference)
        return self

    def gemv_kernel(self, config: tuple[int, int, int]) -> LinearKernel:
        return GatedGemvForOneRow(config, self.kernel.act)

    def kernel_candidates(self) -> list[LinearKernel]:
        act = self.kernel.act
        return [GatedMatmul(act)] + [self.gemv_kernel(c) for c in gemv_configs(*self.weight.shape)]


class TiedLMHead(Linear):
    """The LM head of a model with tied embeddings: its weight IS the embedding's parameter
    (one matrix in memory, filled once from the checkpoint's embedding tensor)."""

    def __init__(self, embedding: nn.Module) -> None:
        """``embedding``: a ``VocabEmbedding`` (or ``nn.Embedding``): its weight is shared."""
        nn.Module.__init__(self)
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self.weight = embedding.weight
        self.register_parameter("bias", None)
        self.kernel = Matmul()
