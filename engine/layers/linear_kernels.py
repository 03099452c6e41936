"""Kernel objects: how a linear module computes its product, chosen once at load.

A linear module (``engine.layers.linear``) holds one of these and calls it with its own
weight and bias on every forward; which one it holds is decided at load (the kernel plan
picks the activation of the MLP's down projection, the GEMV tuner picks cuBLAS or a Triton
GEMV config per kind of layer), never by a flag read while running. A quantized or sharded
linear module brings kernel objects of its own.

A batch-1 decode step is a stream over the weights, and on an H100 the Triton GEMV in
``hearth_kernels/gemv.py`` read them 10-30% faster than cuBLAS for every Llama-8B projection
(benchmarks/results/*-profile-gemv-8b-h100.json). Only single-row inputs take the GEMV;
everything else (prefill, batched decode) is a plain matmul.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (BLOCK_N, BLOCK_K, num_warps): the best configs of sweeps for the Llama-1B/8B shapes
# (benchmarks/profile_gemv.py --sweep), on an H100 (the first five) and an H200 (the last
# two). Each shape also tries its ``default_config`` first: on an H200 that default beat
# cuBLAS by 18% on the 8B gate_up and lm_head, where none of the H100's five did.
GEMV_CONFIGS = ((1, 1024, 2), (1, 1024, 4), (1, 1024, 8), (1, 512, 4), (16, 1024, 8),
                (2, 1024, 4), (8, 256, 2))


def gemv_configs(n: int, k: int) -> list[tuple[int, int, int]]:
    """The Triton GEMV configs worth timing for an [n, k] weight, in timing order: the
    shape's default first, then ``GEMV_CONFIGS`` (without repeating it)."""
    from hearth_kernels.gemv import default_config

    first = default_config(n, k)
    return [first] + [c for c in GEMV_CONFIGS if c != first]


#: The fp8-weight GEMV's candidates besides the shape's default: the K-loop kernel's best per
#: 8B layer on the H200 (benchmarks/results/2026-12-02-i17-profile-gemv-fp8-8b-h200.json:
#: 16x512/8w qkv, 8x1024/4w o and down, 8x512/4w gate_up, 16x512/4w lm_head) and, as
#: 4-tuples (rows per program, rows per step, warps, steps in flight), the x-stationary
#: kernel of hearth_kernels/fp8.py.
FP8_GEMV_CONFIGS = ((16, 512, 8), (8, 1024, 4), (16, 512, 4), (16, 2, 8, 3), (32, 4, 8, 3), (32, 2, 16, 3),
                    (64, 4, 8, 3), (16, 4, 16, 3))


#: The TMA-fed K-loop GEMV's candidates for fp8 weights (``hearth_kernels/gemv.gemv_tma``,
#: ``TmaConfig``: rows, K step, warps, stages): the four that came nearest the best of a 64-config
#: grid over the 8B layers on an H100, from HBM and with the weights in L2 (where memory outruns
#: the kernels, as an H200's does), within 4% of it at every layer
#: (benchmarks/results/2026-12-06-i17-profile-gemv-fp8-tma-{hbm,l2}-h100-9e55e97.json). There the
#: other fp8 GEMVs (no TMA) were as fast or faster from HBM; in L2 the TMA grid was ahead for
#: down (10.4 against 11.7 us), q/k/v (6.6 against 7.0) and gate_up (7.1 against 7.3), behind
#: for o: the tuner decides per card.
FP8_TMA_CONFIGS = ((16, 512, 4, 3), (16, 512, 4, 8), (16, 1024, 4, 3), (16, 1024, 4, 8))


def fp8_gemv_configs(n: int, k: int) -> list[tuple[int, ...]]:
    """The fp8 batch-1 configs for an [n, k] e4m3 weight: the shape's default first (the
    x-stationary ones only where x fits in registers), then, as 5-tuples, the weight-stationary
    tensor-core kernel's (``hearth_kernels/fp8.fp8_mma``: x rounded to e4m3 per token, as the
    prompt path does) where K steps evenly, unless ``HEARTH_FP8_MMA=0``, then, as
    ``TmaConfig``s, the TMA-fed GEMV's where the card has TMA (``gemv.tma_listed``)."""
    from hearth_kernels.fp8 import FP8_MMA_CONFIGS, ROWS_MAX_K, fp8_mma_enabled, fp8_mma_fits
    from hearth_kernels.gemv import TmaConfig, tma_listed, tma_problem

    first, *_ = gemv_configs(n, k)
    mma = [c for c in FP8_MMA_CONFIGS if fp8_mma_fits(k, c)] if fp8_mma_enabled() else []
    tma = []
    if tma_listed():
        for bn, bk, warps, stages in FP8_TMA_CONFIGS:
            c = TmaConfig(bn, min(bk, 1 << (k - 1).bit_length()), warps, stages)  # no wider than the row
            if c not in tma and tma_problem(k, 1, c) is None:
                tma.append(c)
    return [first] + [c for c in FP8_GEMV_CONFIGS if c != first and (len(c) == 3 or k <= ROWS_MAX_K)] + mma + tma


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` through torch (cuBLAS on a GPU); into ``out`` when given."""
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate in plain torch: ``silu(x[:, :I]) * x[:, I:]`` (the eager reference)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_triton() -> Callable[[torch.Tensor], torch.Tensor]:
    """The same gate in one Triton kernel (``hearth_kernels/activation.py``), rounded alike."""
    from hearth_kernels.activation import silu_and_mul

    return silu_and_mul


class LinearKernel:
    """Computes ``x @ weight.T (+ bias)`` (into ``out``, [rows, N] contiguous, when given).
    ``name`` is what ``ModelInfo.batch1_matmul`` reports for the choice."""

    name = "?"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class Matmul(LinearKernel):
    """torch's matmul for every row count: cuBLAS on a GPU."""

    name = "cublas"
    __call__ = staticmethod(matmul)  # called as kernel(x, weight, bias, out): no extra frame


class CpuRowsF32(LinearKernel):
    """A float32 weight on the CPU through Hearth's C kernel (``hearth_kernels.cpu_quant.
    prepare_f32``): every row's product has the same bits however many rows share the
    call, and the same as the C decode step's GEMV. torch's CPU matmul gives a row other
    bits at 1, 2-3 and 4+ rows, so a request's logits (and a near-tie's token) depended on
    what else its step read; the float LM head of a CPU load runs here (``cpu_step.
    use_c_head``). At the rows a sampler reads it is also faster than torch's here (the
    SmolLM2 head at 1-64 rows: 7.5-45 ms against 13-71 ms, 2 cores)."""

    name = "c fp32 rows"
    #: More rows than this (perplexity's windows, not a step's sampled rows: at most
    #: max_num_seqs, 64 by default) go to torch's matmul, faster there: the C kernel is
    #: GEMV-shaped (1.4x slower than torch at 256 rows of k=2048, even at k=576).
    MAX_ROWS = 64
    holds_tensors = True  # (engine.runner.lifecycle.release_module lets go of them)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        from hearth_kernels import cpu_quant

        self._weight, self._bias = weight, bias
        self._prepared = cpu_quant.prepare_f32(weight.detach(), None if bias is None else bias.detach())
        self._matmul = cpu_quant.matmul

    def __call__(self, x, weight, bias, out=None):
        if (weight is not self._weight or bias is not self._bias or x.dtype is not torch.float32 or x.dim() != 2
                or not x.is_cpu or x.shape[0] > self.MAX_ROWS):
            return matmul(x, weight, bias, out)  # (not the tensors it was made for, or many rows)
        return self._matmul(x, self._prepared, out)


class GemvForOneRow(LinearKernel):
    """The Triton GEMV with a tuned ``config`` (BLOCK_N, BLOCK_K, num_warps) for one row;
    a matmul for more rows."""

    def __init__(self, config: tuple[int, int, int]) -> None:
        from hearth_kernels.gemv import gemv

        self.config = tuple(config)
        self.name = "triton gemv %dx%d/%dw" % self.config
        self._gemv = gemv

    def __call__(self, x, weight, bias, out=None):
        if x.shape[0] == 1:
            return self._gemv(x, weight, bias, config=self.config, out=out)
        if out is None:  # the common case inline: this runs in every layer of an eager step
            return F.linear(x, weight, bias)
        return matmul(x, weight, bias, out)


class GatedMatmul(LinearKernel):
    """For a projection whose input is SwiGLU's ``[gate | up]``: ``act`` (the reference or
    the Triton SiLU-and-mul), then a matmul."""

    name = "cublas"

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.act = act

    def __call__(self, x, weight, bias, out=None):
        if out is None:
            return F.linear(self.act(x), weight, bias)
        return matmul(self.act(x), weight, bias, out)


class GatedGemvForOneRow(LinearKernel):
    """SwiGLU fused into the Triton GEMV for one row (the [I] intermediate never goes
    through memory); ``act`` then a matmul for more rows."""

    def __init__(self, config: tuple[int, int, int], act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        from hearth_kernels.gemv import gemv

        self.config = tuple(config)
        self.name = "triton gemv %dx%d/%dw" % self.config
        self.act = act
        self._gemv = gemv

    def __call__(self, x, weight, bias, out=None):
        if x.shape[0] == 1:
            return self._gemv(x, weight, bias, swiglu=True, config=self.config, out=out)
        if out is None:
            return F.linear(self.act(x), weight, bias)
        return matmul(self.act(x), weight, bias, out)
