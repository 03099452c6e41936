"""Hearth's canonical quantized weight: one layout every format is read into and every
kernel starts from.

A linear layer's weight ``W`` [N, K] (N = out_features, K = in_features, nn.Linear's
layout) is stored as integer codes in groups of ``group_size`` consecutive inputs (along
K) of one output row, each group with a float ``scale`` and, optionally, a float ``min``:

    w[n, k] = codes[n, k] * scales[n, k // G] + mins[n, k // G]     (mins given)
    w[n, k] = codes[n, k] * scales[n, k // G]                        (mins None)

- ``bits == 8``: ``qweight`` is int8 [N, K], the signed codes (-128..127). Symmetric
  int8 (per-channel RTN, GGUF Q8_0, GPTQ 8-bit sym) has ``mins`` None.
- ``bits == 4``: ``qweight`` is uint8 [N, K // 2], codes 0..15 packed two per byte in
  GGUF's order: within each block of 32 inputs, byte ``i`` (0..15) holds input ``i`` in
  its low nibble and input ``i + 16`` in its high nibble. K must be a multiple of 32.
  int4 always has ``mins`` (symmetric formats: ``min = -8 * scale``).
- ``scales`` and ``mins``: [N, K // G] float16 (lossless for GGUF's fp16 ``d``/``m`` and
  AWQ/GPTQ's fp16 scales; an integer zero point ``z`` becomes ``min = -z * scale``,
  rounded to float16 once at load, and every kernel and reference reads those stored
  values).
- ``perm``: None, or int64 [K]: GPTQ act-order. The stored columns are the checkpoint's
  inputs in the order ``perm`` (``W_stored[:, j] = W[:, perm[j]]``), so groups are
  contiguous again; a kernel multiplies ``x[:, perm]`` by the stored weight.

- ``fmt == "e4m3"`` (``--quant fp8``): ``qweight`` is float8 e4m3 [N, K], the weights
  themselves rather than integer codes, and ``scales`` float32 [N, 1], one per output row
  (``w = float(qweight) * scale``); ``bits`` 8, ``group_size`` K, no mins. Its kernels
  (``hearth_kernels/fp8.py``) also round the activations to e4m3, per token.

``G`` divides K; ``G == K`` is per-output-channel. Kernel objects may repack these tensors
into their own layout once at load; every kernel is tested against ``dequantize`` here,
in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: int4 codes are packed in blocks of this many inputs (GGUF's QK4_0 / QK4_1).
PACK_BLOCK = 32


@dataclass(slots=True)
class QuantizedWeight:
    bits: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    fmt: str = "int"  # "int": integer codes; "e4m3": float8 weights (see the module docstring)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits == 4 else 1)

    def codes(self) -> torch.Tensor:
        """The integer codes [N, K] as int16 (int4: 0..15, int8: -128..127)."""
        if self.fmt != "int":
            raise ValueError(f"an {self.fmt} weight has no integer codes")
        if self.bits == 8:
            return self.qweight.to(torch.int16)
        return unpack_int4(self.qweight).to(torch.int16)

    def dequantize(self, dtype: torch.dtype = torch.float32, *, unpermute: bool = False) -> torch.Tensor:
        """``W`` [N, K] in ``dtype`` (computed in float64 when ``dtype`` is float64, else in
        float32); in stored column order unless ``unpermute`` (then the checkpoint's)."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        if self.fmt == "e4m3":
            return (self.qweight.to(work) * self.scales.to(work)).to(dtype)
        n, k = self.out_features, self.in_features
        g = self.group_size
        w = self.codes().to(work).view(n, k // g, g) * self.scales.to(work).unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.to(work).unsqueeze(-1)
        w = w.view(n, k)
        if unpermute and self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w.to(dtype)

    def rows(self, first: int, n: int) -> "QuantizedWeight":
        """Output rows ``[first, first + n)`` (a tensor-parallel rank's; every layout's
        scales are per row, so rows slice without touching a group)."""
        def part(t):
            return None if t is None else t.narrow(0, first, n).contiguous()
        return QuantizedWeight(self.bits, self.group_size, part(self.qweight), part(self.scales), part(self.mins),
                               self.perm, fmt=self.fmt)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins, self.perm)
                   if t is not None)


def check_shape(bits: int, group_size: int, out_features: int, in_features: int) -> str | None:
    """Why ``bits``/``group_size`` can't store an [out, in] weight (None: it can)."""
    if bits not in (4, 8):
        return f"{bits}-bit weights are not supported (4 or 8)"
    if group_size <= 0 or in_features % group_size:
        return f"group size {group_size} does not divide its {in_features} input features"
    if bits == 4 and in_features % PACK_BLOCK:
        return f"int4 needs input features in multiples of {PACK_BLOCK}, it has {in_features}"
    if bits == 4 and group_size % PACK_BLOCK and group_size != in_features:
        return f"int4 group size must be a multiple of {PACK_BLOCK}"
    return None


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0..15, any integer dtype) -> uint8 [N, K // 2] in GGUF's nibble order."""
    n, k = codes.shape
    if k % PACK_BLOCK:
        raise ValueError(f"int4 packing needs K a multiple of {PACK_BLOCK}, got {k}")
    c = codes.to(torch.uint8).view(n, k // PACK_BLOCK, 2, PACK_BLOCK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] in GGUF's nibble order -> codes uint8 [N, K] (0..15)."""
    n, half = packed.shape
    p = packed.view(n, half // (PACK_BLOCK // 2), 1, PACK_BLOCK // 2)
    return torch.cat((p & 0x0F, p >> 4), dim=2).reshape(n, half * 2)
