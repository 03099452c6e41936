"""Kernel objects of the quantized projections (``engine.layers.quant_linear``).

Like a float ``Linear``'s kernels (``engine.layers.linear_kernels``) they are fixed once at
load (``choose_kernels``, then the batch-1 tuner on CUDA), never picked by a flag while
running. A kernel that keeps the weight in a layout of its own makes it in ``bind`` (once,
at load) and holds it.

- ``DequantMatmul``: dequantize the weight (``engine.quant.qweight``'s reference
  arithmetic, in float32) into the activation dtype, then a matmul. Exact and portable,
  the reference every other kernel is tested against; slow, since every call expands the
  whole weight.
"""

from __future__ import annotations

import torch

from engine.layers.linear_kernels import matmul


class QuantKernel:
    """Computes ``x @ W.T (+ bias)`` for a quantized module ``layer``; ``name`` is what
    ``ModelInfo.batch1_matmul`` reports."""

    name = "?"

    def bind(self, layer) -> "QuantKernel":
        """The kernel ready to run ``layer`` (a repacked copy of its weight, if it needs one)."""
        return self

    def __call__(self, x: torch.Tensor, layer, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def permuted(x: torch.Tensor, layer) -> torch.Tensor:
    """``x`` with its columns in the stored (act-order) order of ``layer``'s weight."""
    return x if layer.perm is None else x.index_select(-1, layer.perm)


class DequantMatmul(QuantKernel):
    """Dequantize, then torch's matmul: the reference, on every device."""

    name = "dequantize+matmul"

    def __call__(self, x, layer, out=None):
        w = layer.quantized_weight().dequantize(x.dtype)
        return matmul(permuted(x, layer), w, layer.bias, out)


def kernel_for(layer) -> QuantKernel:
    """The kernel ``layer`` runs on its device before any timing: the fastest one that
    runs there (a CPU kernel where it is built, else the reference)."""
    return DequantMatmul()


def kernel_candidates(layer) -> list[QuantKernel]:
    """The batch-1 kernels worth timing for ``layer`` (the one it runs first)."""
    return [layer.kernel]
