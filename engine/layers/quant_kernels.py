"""Kernel objects of the quantized projections (``engine.layers.quant_linear``).

Like a float ``Linear``'s kernels (``engine.layers.linear_kernels``) they are fixed once at
load (``choose_kernels``, then the batch-1 tuner on CUDA), never picked by a flag while
running. A kernel that keeps the weight in a layout of its own makes it in ``bind`` (once,
at load) and holds it.

- ``DequantMatmul``: dequantize the weight (``engine.quant.qweight``'s reference
  arithmetic, in float32) into the activation dtype, then a matmul. Exact and portable,
  the reference every other kernel is tested against; slow, since every call expands the
  whole weight.
- ``TritonQuant`` (CUDA): the dequantize-GEMV of ``kernels/quant_gemv.py`` for one row
  (with a config the load-time tuner picks by timing, SwiGLU fused for the down
  projection) and the dequantize-GEMM of ``kernels/quant_gemm.py`` for more rows (prefill,
  batched decode).

A kernel receives the module's raw input: for a SwiGLU-down projection that is
``[gate | up]``, and the kernel applies ``layer.act`` (or fuses it).
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


def gated(x: torch.Tensor, layer) -> torch.Tensor:
    """The projection's input: SwiGLU applied for a down projection over ``[gate | up]``."""
    return layer.act(x) if layer.act is not None else x


class DequantMatmul(QuantKernel):
    """Dequantize, then torch's matmul: the reference, on every device."""

    name = "dequantize+matmul"

    def __call__(self, x, layer, out=None):
        w = layer.quantized_weight().dequantize(x.dtype)
        return matmul(permuted(gated(x, layer), layer), w, layer.bias, out)


class TritonQuant(QuantKernel):
    """The Triton dequantize-GEMV (``config``) for one row, the dequantize-GEMM for more."""

    def __init__(self, config=None) -> None:
        self.config = config
        self.prepared = None
        self.name = "triton quant gemv" if config is None else "triton quant gemv %dx%d/%dw k%d s%d" % tuple(config)

    def bind(self, layer) -> "TritonQuant":
        from kernels.quant_gemv import prepare_int4, prepare_int8

        bound = TritonQuant(self.config)
        prepare = prepare_int4 if layer.bits == 4 else prepare_int8
        bound.prepared = prepare(layer.qweight, layer.scales, layer.mins, layer.group_size)
        from kernels.quant_gemm import quant_gemm
        from kernels.quant_gemv import quant_gemv

        bound._gemv, bound._gemm = quant_gemv, quant_gemm
        return bound

    def __call__(self, x, layer, out=None):
        if x.shape[0] == 1 and layer.perm is None:
            return self._gemv(x, self.prepared, config=self.config, swiglu=layer.act is not None, out=out,
                              bias=layer.bias)
        return self._gemm(permuted(gated(x, layer), layer), self.prepared, bias=layer.bias, out=out)


def kernel_for(layer) -> QuantKernel:
    """The kernel ``layer`` runs on its device before any timing: the fastest one that
    runs there (Triton on a CUDA GPU, else the reference)."""
    if layer.qweight.device.type == "cuda":
        return TritonQuant()
    return DequantMatmul()


def kernel_candidates(layer) -> list[QuantKernel]:
    """The batch-1 kernels worth timing for ``layer``, the one it runs first first."""
    if layer.qweight.device.type != "cuda":
        return [layer.kernel]
    from kernels.quant_gemv import quant_gemv_configs

    return [TritonQuant(c) for c in quant_gemv_configs(layer.out_features, layer.in_features, layer.bits)]
