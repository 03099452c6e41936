"""A projection whose weight bitsandbytes quantizes and multiplies (``--quant bnb-nf4``,
``bnb-nf4-dq``, ``bnb-int8``; ``engine.quant.bnb``).

``BnbLinear`` takes the place of a float ``Linear`` (plain, fused q/k/v or gate/up, or the
SwiGLU down projection) on the meta device and keeps its interface (``forward(x, out=None)``,
``input_width``, ``checkpoint_shards``, the bias and its loader). Its parameters are
bitsandbytes' own layout, named as transformers saves them:

- NF4: ``weight`` (uint8, two codes a byte, the [out, in] matrix flattened row by row),
  ``absmax`` (fp32 per block of 64 weights; with double quantization uint8 codes, plus
  ``nested_absmax`` per 256 of them and the buffers ``offset`` and ``nested_code``), and
  the buffer ``code`` (NF4's 16 values).
- int8: ``weight`` (int8 [out, in]) and ``SCB`` (fp32 absmax per row).

Loading: each shard's float rows are quantized as they stream in (bitsandbytes'
``quantize_4bit`` / ``int8_vectorwise_quant``) and written at the shard's offsets; a
block never straddles two shards, so the result is what quantizing the whole matrix
gives. Double quantization waits for the last shard (it needs every absmax) and keeps the
fp32 absmaxes only until then. A bitsandbytes checkpoint's tensors are copied as they are.

Running: bitsandbytes' ``matmul_4bit`` / ``matmul`` (LLM.int8()), with the SwiGLU of a
gated down projection applied first. bitsandbytes' state objects are rebuilt from the
module's tensors on each call (a few microseconds), so the module holds nothing the
release of a model could miss. Nothing here is timed by the batch-1 GEMV tuner (no
candidates), and the C decode step and, for LLM.int8(), CUDA graphs say why they can't
run it (``cpu_decode_reason``, ``cuda_graphs_off``).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import nn

from engine.layers.linear import Linear, SwiGLUDownLinear
from engine.layers.linear_kernels import silu_and_mul_reference, silu_and_mul_triton
from engine.layers.weight_loader import WeightShapeError
from engine.quant.bnb import BLOCKSIZE, NESTED_BLOCKSIZE, BnbSource, import_bitsandbytes


def _param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class BnbLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W`` held and multiplied by bitsandbytes; see the
    module docstring."""

    #: why the CPU's one-call decode step can't run a model holding this module
    cpu_decode_reason = "bitsandbytes projections run through bitsandbytes' own ops (the C step has no form of them)"

    def __init__(self, in_features: int, out_features: int, source: BnbSource, *,
                 bias: nn.Parameter | None = None, shard_offsets: dict[Hashable, tuple[int, int]] | None = None,
                 checkpoint_shards: dict[str, Hashable] | None = None, gated: bool = False,
                 dtype: torch.dtype | None = None, nested: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.source = source
        self.bits = source.bits
        self.nested = bool(nested and self.bits == 4)
        self.bias = bias
        self.dtype = dtype or torch.bfloat16
        self.gated = gated
        self.act = silu_and_mul_reference if gated else None
        self.shard_offsets = dict(shard_offsets or {None: (0, out_features)})
        if checkpoint_shards:
            self.checkpoint_shards = dict(checkpoint_shards)
        self.checkpoint_params = tuple(source.parts) + tuple(source.optional)
        n, k = out_features, in_features
        if self.bits == 4:
            blocks = -(-n * k // BLOCKSIZE)
            self.weight = _param(((n * k + 1) // 2, 1), torch.uint8)
            if self.nested:
                self.absmax = _param((blocks,), torch.uint8)
                self.nested_absmax = _param((-(-blocks // NESTED_BLOCKSIZE),), torch.float32)
                self.register_buffer("offset", torch.zeros((), dtype=torch.float32))
                self.register_buffer("nested_code", torch.zeros(256, dtype=torch.float32))
            else:
                self.absmax = _param((blocks,), torch.float32)
            self.register_buffer("code", torch.zeros(16, dtype=torch.float32))
            self.filled_by_parts = ("weight", "absmax", "nested_absmax")
            self.cuda_graphs_off = None
        else:
            self.weight = _param((n, k), torch.int8)
            self.SCB = _param((n,), torch.float32)
            self.filled_by_parts = ("weight", "SCB")
            self.threshold = float(source.threshold)
            # Finding the outlier columns reads them back to the host at every matmul.
            self.cuda_graphs_off = (
                f"bitsandbytes int8 (LLM.int8(), outlier threshold {self.threshold:g}) finds the outlier columns "
                "on the host at every matmul, which a CUDA graph can't hold: steps run eagerly"
                if self.threshold > 0 else None)
        self._shape = torch.Size((n, k))
        self._bnb = import_bitsandbytes()
        self._pending: dict[Hashable, dict[str, torch.Tensor]] = {}  # shard id -> its tensors so far
        self._written: set = set()  # shards written
        self._absmax32: torch.Tensor | None = None  # fp32 absmaxes until a nested module is whole

    @classmethod
    def replacing(cls, linear: Linear, source: BnbSource, nested: bool = False) -> "BnbLinear":
        """The bitsandbytes twin of ``linear`` (plain, fused or SwiGLU-down), with its
        shards, its bias parameter (and that parameter's loader) and dtype."""
        return cls(linear.in_features, linear.out_features, source, bias=linear.bias,
                   shard_offsets=getattr(linear, "shard_offsets", None),
                   checkpoint_shards=getattr(linear, "checkpoint_shards", None),
                   gated=isinstance(linear, SwiGLUDownLinear), dtype=linear.weight.dtype, nested=nested)

    # -- what it is --------------------------------------------------------------------
    @property
    def input_width(self) -> int:
        return 2 * self.in_features if self.gated else self.in_features

    @property
    def quant_form(self) -> str:
        """What ``ModelInfo.quant_detail`` counts it as."""
        if self.bits == 8:
            return f"bnb int8 (outliers >= {self.threshold:g} in fp16)" if self.threshold > 0 else "bnb int8"
        return "bnb nf4 b64" + (" double-quant" if self.nested else "")

    def kernel_candidates(self) -> list:
        """Nothing for the batch-1 GEMV tuner to time: bitsandbytes picks its own kernel."""
        return []

    def choose_kernels(self, plan) -> "BnbLinear":
        """The plan's SwiGLU activation for a gated down projection."""
        if self.gated:
            self.act = silu_and_mul_triton() if plan.fused else silu_and_mul_reference
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_form}, "
                f"source={self.source.label}")

    # -- running -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [rows, input_width] (a down projection's ``[gate | up]``) -> [rows, out_features]."""
        if self.act is not None:
            x = self.act(x)
        if self.bits == 4:
            y = self._bnb.matmul_4bit(x, self.weight, quant_state=self.quant_state(x.dtype), bias=self.bias)
        else:
            y = self._bnb.matmul(x, self.weight, state=self.int8_state(), bias=self.bias)
        return y if out is None else out.copy_(y)

    def quant_state(self, dtype: torch.dtype | None = None):
        """bitsandbytes' ``QuantState`` of the NF4 weight, over this module's tensors."""
        F = self._bnb.functional
        state2 = None
        if self.nested:
            state2 = F.QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE,
                                  dtype=torch.float32)
        return F.QuantState(absmax=self.absmax, shape=self._shape, code=self.code, blocksize=BLOCKSIZE,
                            quant_type="nf4", dtype=dtype or self.dtype, offset=self.offset if self.nested else None,
                            state2=state2)

    def int8_state(self):
        """bitsandbytes' ``MatmulLtState`` for inference over this module's int8 weight."""
        state = self._bnb.MatmulLtState()
        state.CB, state.SCB, state.threshold = self.weight, self.SCB, self.threshold
        state.has_fp16_weights = False
        state.is_training = False
        return state

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a float [out, in] matrix (references, tests)."""
        if self.bits == 4:
            return self._bnb.functional.dequantize_4bit(self.weight, self.quant_state(torch.float32)).to(dtype)
        return (self.weight.float() * (self.SCB.float() / 127).unsqueeze(1)).to(dtype)

    # -- loading -----------------------------------------------------------------------
    def load_part(self, key: str, tensor: torch.Tensor, shard_id: Hashable) -> None:
        """One checkpoint tensor (``key``: "weight", "weight.absmax", "SCB", ...) of shard
        ``shard_id``; once the shard has every part, its rows are written."""
        parts = self._pending.setdefault(shard_id, {})
        parts[key] = tensor
        if all(p in parts for p in self.checkpoint_params):
            self._write_shard(shard_id)

    def finish_loading(self) -> list[str]:
        """Write shards still waiting for optional parts; returns the required parts that
        never arrived."""
        missing = []
        for shard_id in list(self._pending):
            absent = [p for p in self.source.parts if p not in self._pending[shard_id]]
            if absent:
                missing += [f"shard {shard_id!r}: {p}" for p in absent]
                continue
            self._write_shard(shard_id)
        return missing

    def init_random(self, generator: torch.Generator, std: float) -> None:
        """Random weights (benchmark shapes): a random float matrix per shard, quantized."""
        for shard_id, (start, rows) in self.shard_offsets.items():
            w = torch.empty(rows, self.in_features, device=self.weight.device).normal_(0.0, std, generator=generator)
            self._write_float(start, rows, w)
            self._shard_done(shard_id)

    def _write_shard(self, shard_id: Hashable) -> None:
        parts = self._pending.pop(shard_id)
        start, rows = self.shard_offsets[shard_id]
        dev = self.weight.device
        parts = {key: t.to(dev) for key, t in parts.items()}
        if self.source.from_float:
            self._write_float(start, rows, parts["weight"])
        elif self.bits == 4:
            self._write_nf4(start, rows, parts)
        else:
            self._write_int8(start, rows, parts)
        self._shard_done(shard_id)

    def _shard_done(self, shard_id: Hashable) -> None:
        self._written.add(shard_id)
        if self._absmax32 is not None and len(self._written) == len(self.shard_offsets):
            self._nest()

    def _write_float(self, start: int, rows: int, w: torch.Tensor) -> None:
        """Float rows ``start:start + rows``, quantized as bitsandbytes does (from the
        model's dtype for NF4, as transformers does; from fp16 for int8, as Int8Params does)."""
        if tuple(w.shape) != (rows, self.in_features):
            raise WeightShapeError(tuple(w.shape), (rows, self.in_features))
        F = self._bnb.functional
        if self.bits == 4:
            packed, state = F.quantize_4bit(w.to(self.dtype).contiguous(), blocksize=BLOCKSIZE, quant_type="nf4")
            self._put_nf4(start, rows, packed, state.absmax, state.code)
        else:
            cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16).contiguous())
            self.weight.data.narrow(0, start, rows).copy_(cb)
            self.SCB.data.narrow(0, start, rows).copy_(scb)

    def _put_nf4(self, start: int, rows: int, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> None:
        """Packed codes and fp32 absmaxes of rows ``start:start + rows`` (whole blocks:
        ``engine.quant.bnb.apply`` refuses fused shards that aren't)."""
        lo, hi = start * self.in_features, (start + rows) * self.in_features
        dest = self.weight.data.view(-1)[lo // 2:(hi + 1) // 2]
        src = packed.reshape(-1)
        if src.numel() != dest.numel():
            raise WeightShapeError((src.numel(),), (dest.numel(),))
        dest.copy_(src)
        if self.nested and self._absmax32 is None:
            self._absmax32 = torch.empty(self.absmax.shape, dtype=torch.float32, device=self.weight.device)
        scales = (self._absmax32 if self.nested else self.absmax.data)[lo // BLOCKSIZE:-(-hi // BLOCKSIZE)]
        if scales.numel() != absmax.numel():
            raise WeightShapeError(tuple(absmax.shape), tuple(scales.shape))
        scales.copy_(absmax)
        self.code.copy_(code)

    def _nest(self) -> None:
        """Double quantization of the whole module's absmaxes (bitsandbytes'
        ``compress_statistics``: minus their mean, 8-bit blockwise in blocks of 256)."""
        absmax, self._absmax32 = self._absmax32, None
        offset = absmax.mean()
        codes, state2 = self._bnb.functional.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        self.absmax.data.copy_(codes)
        self.nested_absmax.data.copy_(state2.absmax)
        self.nested_code.copy_(state2.code)
        self.offset.copy_(offset)

    def _write_nf4(self, start: int, rows: int, parts: dict[str, torch.Tensor]) -> None:
        """A bitsandbytes checkpoint's NF4 tensors of one shard (as transformers saves them)."""
        F = self._bnb.functional
        stats = {key.removeprefix("weight."): t for key, t in parts.items() if key != "weight"}
        try:
            state = F.QuantState.from_dict(stats, device=self.weight.device)
        except (ValueError, AssertionError, KeyError) as e:
            raise ValueError(f"its bitsandbytes quantization state doesn't read ({e or type(e).__name__})") from None
        if state.quant_type != "nf4" or state.blocksize != BLOCKSIZE:
            raise ValueError(f"{state.quant_type} in blocks of {state.blocksize}: Hearth reads nf4 in blocks of "
                             f"{BLOCKSIZE}")
        if tuple(state.shape) != (rows, self.in_features):
            raise WeightShapeError(tuple(state.shape), (rows, self.in_features))
        packed = parts["weight"]
        if packed.dtype != torch.uint8:
            raise ValueError(f"4-bit codes stored as {packed.dtype}; Hearth reads uint8 storage")
        if self.nested:  # one shard: the checkpoint's own nested state, as it is
            if not state.nested or state.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError("expected double-quantized absmaxes in blocks of 256")
            for dest, src in ((self.weight, packed.reshape(self.weight.shape)), (self.absmax, state.absmax),
                              (self.nested_absmax, state.state2.absmax), (self.nested_code, state.state2.code),
                              (self.code, state.code), (self.offset, state.offset.reshape(()))):
                if dest.shape != src.shape:
                    raise WeightShapeError(tuple(src.shape), tuple(dest.shape))
                dest.data.copy_(src)
            return
        absmax = state.absmax
        if state.nested:  # what bitsandbytes computes from them at every matmul, kept in fp32
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        self._put_nf4(start, rows, packed, absmax.float(), state.code)

    def _write_int8(self, start: int, rows: int, parts: dict[str, torch.Tensor]) -> None:
        """A bitsandbytes checkpoint's int8 tensors of one shard: ``weight`` and ``SCB``."""
        fmt = parts.get("weight_format")
        if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
            raise ValueError(f"int8 weights in layout {int(fmt.reshape(-1)[0])}: Hearth reads the row-major one (0)")
        for dest, src in ((self.weight.data.narrow(0, start, rows), parts["weight"]),
                          (self.SCB.data.narrow(0, start, rows), parts["SCB"])):
            if dest.shape != src.shape:
                raise WeightShapeError(tuple(src.shape), tuple(dest.shape))
            dest.copy_(src)
