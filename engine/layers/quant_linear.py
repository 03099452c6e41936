"""Quantized projections and embeddings: the modules a quantization transform puts in
place of ``Linear`` and ``VocabEmbedding`` on the meta device.

A ``QuantizedLinear`` stores its weight in Hearth's canonical layout
(``engine.quant.qweight``): parameters ``qweight``, ``scales``, ``mins`` (absent for
symmetric int8) and, for GPTQ act-order, the buffer ``perm``. It keeps the projection's
interface (``forward(x, out=None)``, ``input_width``, ``use_kernel``,
``kernel_candidates``, ``checkpoint_shards``), so model code, the GEMV tuner and CUDA graphs
run it like a float ``Linear``. Its ``QuantSource`` (``engine.quant.sources``) says which
checkpoint tensors make each shard's weight (a float ``weight`` quantized as it streams
in, or a pre-quantized checkpoint's own tensors); ``load_part`` gathers them per shard and
writes the converted rows at the shard's offsets.

The kernel (``engine.layers.quant_kernels``) is fixed at load like a float module's:
dequantize-then-matmul is the reference that runs anywhere; the CPU and Triton kernels
are chosen where they run.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from torch import nn

from engine.layers.linear import Linear, SwiGLUDownLinear, norm_then_project
from engine.layers.linear_kernels import silu_and_mul_reference, silu_and_mul_triton
from engine.layers.quant_kernels import DequantMatmul, QuantKernel, kernel_candidates, kernel_for, triton_reads
from engine.layers.weight_loader import WeightShapeError
from engine.quant.qweight import QuantizedWeight
from engine.quant.sources import QuantSource


#: an LM head's dequantize threshold (``QuantizedStore.dequant_rows``; the old default for every
#: projection): its scratch would be the whole [vocab, hidden] matrix (1 GB for Llama-3 8B in
#: bf16) in every decode step from there, and the fused kernel ran the 8B's int8 head faster at 96
#: and 128 rows on an H100, about even at 192 (benchmarks/results/2026-12-05-i14-profile-dequant-rows-8b-h100-e376f8b.json)
HEAD_DEQUANT_ROWS = 1024


def _param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class QuantizedStore(nn.Module):
    """The quantized weight of an [out_features, in_features] matrix and its loading.

    ``shard_offsets``: shard id -> (first row, rows) of a fused projection ({None: (0, N)}
    for a plain one). ``checkpoint_params`` are the checkpoint tensor names (per shard)
    this module loads itself (``load_part``); ``weight_loader`` streams them here.
    """

    #: from how many rows the GPU kernel dequantizes the weight into a scratch and runs cuBLAS
    #: (None: ``hearth_kernels/quant_gemm.dequant_rows_for`` its codes; an LM head:
    #: ``HEAD_DEQUANT_ROWS``)
    dequant_rows: int | None = None

    def _init_store(self, out_features: int, in_features: int, source: QuantSource,
                    shard_offsets: dict[Hashable, tuple[int, int]] | None) -> None:
        self.out_features, self.in_features = out_features, in_features
        self.source = source
        self.bits = source.bits
        self.fmt = source.fmt
        self.group_size = source.group_for(in_features)
        n, k, g = out_features, in_features, self.group_size
        if self.fmt == "e4m3":  # fp8: the weights themselves, one float32 scale per row
            self.qweight = _param((n, k), torch.float8_e4m3fn)
            self.scales = _param((n, 1), torch.float32)
        else:
            self.qweight = _param((n, k // 2) if self.bits == 4 else (n, k),
                                  torch.uint8 if self.bits == 4 else torch.int8)
            self.scales = _param((n, k // g), torch.float16)
        if source.has_mins:
            self.mins = _param((n, k // g), torch.float16)
        else:
            self.register_parameter("mins", None)
        self.register_buffer("perm", torch.empty(k, dtype=torch.long) if getattr(source, "act_order", False)
                             else None)
        self._perm_from: Hashable | None = None  # the shard whose act-order permutation ``perm`` holds
        self.shard_offsets = dict(shard_offsets or {None: (0, n)})
        self.checkpoint_params = tuple(source.parts) + tuple(source.optional)
        self.filled_by_parts = ("qweight", "scales", "mins")
        # shard id -> the checkpoint tensors of that shard received so far (until complete)
        self._pending: dict[Hashable, dict[str, torch.Tensor]] = {}

    # -- loading -------------------------------------------------------------------
    def load_part(self, key: str, tensor: torch.Tensor, shard_id: Hashable) -> None:
        """One checkpoint tensor (``key``: "weight", "qweight", ...) of shard ``shard_id``;
        once the shard has every part, its rows are converted and written."""
        parts = self._pending.setdefault(shard_id, {})
        parts[key] = tensor
        if all(p in parts for p in self.checkpoint_params):
            self._write_shard(shard_id)

    def finish_loading(self) -> list[str]:
        """Convert shards still waiting for optional parts; returns the required parts
        that never arrived ("q_proj's qweight"), for the loader's missing-tensor error."""
        missing = []
        for shard_id in list(self._pending):
            parts = self._pending[shard_id]
            absent = [p for p in self.source.parts if p not in parts]
            if absent:
                missing += [f"shard {shard_id!r}: {p}" for p in absent]
                continue
            self._write_shard(shard_id)
        return missing

    def _write_shard(self, shard_id: Hashable) -> None:
        parts = self._pending.pop(shard_id)
        start, rows = self.shard_offsets[shard_id]
        if "weight" in parts and tuple(parts["weight"].shape) != (rows, self.in_features):
            raise WeightShapeError(tuple(parts["weight"].shape), (rows, self.in_features))
        dev = self.qweight.device
        qw = self.source.to_weight({k: v.to(dev) for k, v in parts.items()}, rows, self.in_features)
        self._copy_rows(qw, start, rows, shard_id)

    def _copy_rows(self, qw: QuantizedWeight, start: int, rows: int, shard_id: Hashable = None) -> None:
        if (qw.bits, qw.group_size, qw.fmt) != (self.bits, self.group_size, self.fmt):
            raise ValueError(f"expected {self.bits}-bit {self.fmt} weights in groups of {self.group_size}, got "
                             f"{qw.bits}-bit {qw.fmt} in groups of {qw.group_size}")
        pairs = [(self.qweight, qw.qweight), (self.scales, qw.scales)]
        if self.mins is not None:
            if qw.mins is None and qw.bits == 4:
                raise ValueError("the checkpoint has no zero points/mins for an asymmetric layer")
            # An asymmetric int8 layer whose zero points all happen to be 128 reads as symmetric.
            pairs.append((self.mins, qw.mins if qw.mins is not None else torch.zeros_like(qw.scales)))
        elif qw.mins is not None:
            raise ValueError("a symmetric layer got zero points/mins")
        for dest, src in pairs:
            part = dest.data.narrow(0, start, rows)
            if tuple(part.shape) != tuple(src.shape):
                raise WeightShapeError(tuple(src.shape), tuple(part.shape))
            part.copy_(src)
        if self.perm is not None:
            # the shards of a fused layer share one input, so one permutation: the first shard
            # to arrive sets it (a checkpoint's tensors come in any order: safetensors sorts
            # k_proj before q_proj), the others must match it
            perm = qw.perm if qw.perm is not None else torch.arange(self.in_features)
            first = getattr(self, "_perm_from", None)
            if first is None:
                self.perm.copy_(perm)
                self._perm_from = shard_id if shard_id is not None else "the layer"
            elif not torch.equal(self.perm.cpu(), perm.cpu()):
                raise ValueError(f"the fused shards of this layer have different act-order permutations (g_idx): "
                                 f"shard {shard_id!r}'s differs from shard {first!r}'s")

    def init_random(self, generator: torch.Generator, std: float) -> None:
        """Random weights (benchmark shapes): a random float matrix per shard, quantized by
        round-to-nearest into this layout."""
        from engine.quant.sources import rtn

        maker = rtn("fp8" if self.fmt == "e4m3" else "int8" if self.bits == 8 else "int4", self.group_size)
        for shard_id, (start, rows) in self.shard_offsets.items():
            w = torch.empty(rows, self.in_features, device=self.qweight.device).normal_(0.0, std, generator=generator)
            self._copy_rows(maker.to_weight({"weight": w}, rows, self.in_features), start, rows)

    def quantized_weight(self) -> QuantizedWeight:
        """This module's weight as a ``QuantizedWeight`` (the tensors themselves, no copy;
        int4 codes a CUDA kernel keeps in its own order are turned back into canonical ones)."""
        return QuantizedWeight(self.bits, self.group_size, self._canonical_codes(), self.scales, self.mins, self.perm,
                               fmt=self.fmt)

    def _canonical_codes(self) -> torch.Tensor:
        from engine.layers.quant_kernels import int4_layout

        if self.bits == 4 and int4_layout(self.qweight) == "pairs":
            from hearth_kernels.quant_gemv import unpair_nibbles

            return unpair_nibbles(self.qweight.data)
        return self.qweight

    def weight_bytes(self) -> int:
        return self.quantized_weight().nbytes()


class QuantizedLinear(QuantizedStore):
    """``y = x @ W.T (+ bias)`` with ``W`` quantized; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, source: QuantSource, *, bias: nn.Parameter | None = None,
                 shard_offsets: dict[Hashable, tuple[int, int]] | None = None,
                 checkpoint_shards: dict[str, Hashable] | None = None, gated: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._init_store(out_features, in_features, source, shard_offsets)
        if checkpoint_shards:
            self.checkpoint_shards = dict(checkpoint_shards)
        self.bias = bias
        self.dtype = dtype
        self.gated = gated
        self.act = silu_and_mul_reference if gated else None
        self.kernel: QuantKernel = DequantMatmul()

    @classmethod
    def replacing(cls, linear: Linear, source: QuantSource) -> "QuantizedLinear":
        """The quantized twin of ``linear`` (a plain, fused or SwiGLU-down projection),
        with its shards, its bias parameter (and that parameter's loader) and dtype."""
        return cls(linear.in_features, linear.out_features, source, bias=linear.bias,
                   shard_offsets=getattr(linear, "shard_offsets", None),
                   checkpoint_shards=getattr(linear, "checkpoint_shards", None),
                   gated=isinstance(linear, SwiGLUDownLinear), dtype=linear.weight.dtype)

    @property
    def input_width(self) -> int:
        return 2 * self.in_features if self.gated else self.in_features

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [rows, input_width] (a down projection's ``[gate | up]``: the kernel applies
        or fuses SwiGLU) -> [rows, out_features]."""
        return self.kernel(x, self, out)

    def normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        """``(self(norm(s)), s)``, ``s = x + residual`` (or ``x``): in one kernel where this
        projection's kernel takes the norm into its prologue (``TritonQuant.fuses_norm``:
        one row, a dp4a config, the fused plan's norm); for several rows of an fp8 layer the
        norm writes the e4m3 rows its product takes (``Fp8Kernel.fuses_norm_rows``); else as
        two calls."""
        if x.shape[0] == 1 and self.act is None and x.dtype == norm.weight.dtype and self.kernel.fuses_norm(self, norm):
            return self.kernel.normed(x, self, residual, norm)
        if (x.shape[0] > 1 and x.dim() == 2 and x.dtype == norm.weight.dtype and x.device.type == "cuda"
                and self.kernel.fuses_norm_rows(self, norm)):
            return self.kernel.normed_rows(x, self, residual, norm)  # fp8: the norm rounds the rows itself
        return norm_then_project(self, x, residual, norm)

    def choose_kernels(self, plan) -> "QuantizedLinear | Linear":
        """The plan's SwiGLU activation, and the kernel that runs on this device. On a GPU a
        layout its kernels don't read (groups neither a multiple of 32 nor int8's 16)
        becomes a float projection here (its codes are dropped; ``gpu_float_extra`` counts the difference
        before the load)."""
        if self.qweight.device.type == "cuda" and self.float_on_gpu:
            return self.as_float().choose_kernels(plan)
        if self.gated:
            self.act = silu_and_mul_triton() if plan.fused else silu_and_mul_reference
        self.use_kernel(kernel_for(self))
        return self

    def use_kernel(self, kernel: QuantKernel) -> None:
        self.kernel = kernel.bind(self)

    @property
    def float_on_gpu(self) -> bool:
        """Whether a GPU load runs this projection as a float one (an integer layout its
        kernels don't read, and no act-order permutation to carry)."""
        return self.fmt == "int" and not triton_reads(self) and self.perm is None

    def as_float(self) -> Linear:
        """This projection dequantized into a float ``Linear`` (``SwiGLUDownLinear`` for a
        down projection over ``[gate | up]``) in the model's dtype, sharing the bias."""
        dtype = self.dtype or torch.bfloat16
        cls = SwiGLUDownLinear if self.gated else Linear
        with torch.device("meta"):
            lin = cls(self.in_features, self.out_features, dtype=dtype)
        lin.weight = nn.Parameter(self.quantized_weight().dequantize(dtype), requires_grad=False)
        lin.bias = self.bias
        return lin

    def kernel_candidates(self) -> list[QuantKernel]:
        return kernel_candidates(self)

    def extra_repr(self) -> str:
        form = "fp8 e4m3" if self.fmt == "e4m3" else f"bits={self.bits}, group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {form}, "
                f"source={self.source.label}, kernel={self.kernel!r}")


class QuantizedVocabEmbedding(QuantizedStore):
    """``W[input_ids]`` with ``W`` [vocab, hidden] quantized (GGUF's Q8_0 token embedding,
    or a quantized tied head): only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, source: QuantSource, dtype: torch.dtype) -> None:
        super().__init__()
        self._init_store(num_embeddings, embedding_dim, source, None)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        g = self.group_size
        rows = self.qweight[input_ids]
        if self.bits == 4:
            from engine.layers.quant_kernels import int4_layout

            if int4_layout(self.qweight) == "pairs":  # a tied head's kernel repacked the shared codes
                from hearth_kernels.quant_gemv import unpair_nibbles

                rows = unpair_nibbles(rows)
        codes = rows.to(torch.float32) if self.bits == 8 else _unpack_rows(rows)
        w = codes.view(len(input_ids), -1, g) * self.scales[input_ids].float().unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins[input_ids].float().unsqueeze(-1)
        return w.view(len(input_ids), self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    from engine.quant.qweight import unpack_int4

    return unpack_int4(packed).to(torch.float32)


class QuantizedTiedHead(QuantizedLinear):
    """The LM head of a tied model whose embedding is quantized: the same parameters."""

    dequant_rows = HEAD_DEQUANT_ROWS

    def __init__(self, embedding: QuantizedVocabEmbedding) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = embedding.num_embeddings, embedding.embedding_dim
        self.source, self.bits, self.group_size = embedding.source, embedding.bits, embedding.group_size
        self.fmt = embedding.fmt
        self.qweight, self.scales = embedding.qweight, embedding.scales
        if embedding.mins is not None:
            self.mins = embedding.mins
        else:
            self.register_parameter("mins", None)
        self.register_buffer("perm", None)
        self.shard_offsets = {None: (0, self.out_features)}
        self.checkpoint_params = ()  # filled through the embedding
        self.filled_by_parts = ("qweight", "scales", "mins")
        self._pending = {}
        self.register_parameter("bias", None)
        self.dtype, self.gated, self.act = embedding.dtype, False, None
        self.kernel = DequantMatmul()


def dequantized_linear(module: QuantizedStore, dtype: torch.dtype) -> torch.Tensor:
    """The module's weight as a float [out, in] matrix in ``dtype`` (prefill, references)."""
    return module.quantized_weight().dequantize(dtype)





def gpu_float_extra(model: nn.Module) -> int:
    """Bytes a CUDA load of ``model`` (on the meta device, transformed) holds beyond what
    its modules count: each quantized projection the GPU kernels don't read becomes a float
    one at load (``QuantizedLinear.choose_kernels``)."""
    extra = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m.float_on_gpu:
            quantized = sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.mins) if t is not None)
            extra += m.out_features * m.in_features * (m.dtype or torch.bfloat16).itemsize - quantized
    return extra
