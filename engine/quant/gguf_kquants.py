"""GGUF's K-quant blocks (Q4_K, Q5_K, Q6_K) read into integer codes and exact per-group
scales (and mins): the first step of keeping them quantized (issue 17).

Each super-block covers 256 consecutive inputs of one row (GGUF's ``QK_K``); a [rows, K]
tensor is ``rows x K/256`` super-blocks. The layouts, from ggml's published block
definitions (``block_q4_K`` and friends), byte offsets within a super-block:

- Q4_K, 144 bytes: float16 ``d`` (0), float16 ``dmin`` (2), 12 bytes of 6-bit sub-block
  scales and mins (4), 128 bytes of nibbles (16). Eight sub-blocks of 32 inputs:
  ``w = d * sc[j] * q - dmin * m[j]``. Sub-block ``j`` reads the low nibbles (j even) or
  the high nibbles (j odd) of bytes ``32 * (j // 2) ..+32``.
- Q5_K, 176 bytes: ``d``, ``dmin``, the same 12 scale bytes, 32 bytes of high bits (16),
  128 bytes of nibbles (48). Sub-block ``j`` adds 16 where bit ``j`` of ``qh[l]`` is set:
  ``w = d * sc[j] * (q + 16 * h) - dmin * m[j]``.
- Q6_K, 210 bytes: 128 bytes of low nibbles (0), 64 bytes of 2-bit high parts (128),
  16 int8 sub-block scales (192), float16 ``d`` (208). Sixteen sub-blocks of 16 inputs:
  ``w = d * sc[j] * (q - 32)``, q six bits. In each half of 128 inputs, input ``32 i + l``
  (i = 0..3, l = 0..31) takes nibble ``i // 2`` (low, high) of ``ql[l + 32 (i % 2)]`` and
  bits ``2 i`` of ``qh[l]``.

The 6-bit scales and mins of Q4_K / Q5_K: for j < 4, ``sc = s[j] & 63``, ``m = s[j + 4] &
63``; for j >= 4, ``sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4`` and ``m = (s[j + 4] >> 4) |
(s[j] >> 6) << 4``.

Scales and mins come out in float32, where they are exact (an fp16 ``d`` times a 6- or
8-bit integer needs at most 19 significant bits), so ``dequantize`` here equals
``gguf.quants.dequantize`` bit for bit (the tests hold it to that). Codes: Q4_K 0..15,
Q5_K 0..31 (uint8), Q6_K -32..31 (int8).

Kept quantized (``to_weight``): Q4_K as Hearth's int4 in groups of 32, Q5_K as int8 codes
0..31 in groups of 32 with mins, Q6_K as int8 codes in groups of 16 (no mins), all with their
scales and mins rounded once to float16 (Hearth's canonical layout: at most 2^-11 of a
scale, under 1% of one quantization step). The CPU kernel and the GPU's Triton kernels run
int8 in groups of 16 (two scales per block of 32), so a Q6_K layer stays quantized on both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.quant.qweight import QuantizedWeight, pack_int4

QK_K = 256
#: bytes per super-block of each K-quant type read here
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
KQUANT_TYPES = tuple(BLOCK_BYTES)


@dataclass(slots=True)
class KQuantBlocks:
    """A K-quant tensor as codes [rows, K], ``scales`` [rows, K / group] float32 and ``mins``
    (the same shape, None for Q6_K): ``w = codes * scale + min`` per group of ``group``."""

    type_name: str
    group: int
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, k = self.codes.shape
        g = self.group
        w = self.codes.to(torch.float32).view(rows, k // g, g) * self.scales.unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.unsqueeze(-1)
        return w.view(rows, k).to(dtype)


def _super_blocks(raw: np.ndarray, type_name: str) -> torch.Tensor:
    size = BLOCK_BYTES.get(type_name)
    if size is None:
        raise ValueError(f"GGUF type {type_name} is not a K-quant read here (only {', '.join(KQUANT_TYPES)})")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] % size:
        raise ValueError(f"{type_name} rows must be whole super-blocks of {size} bytes, got shape {raw.shape}")
    return torch.from_numpy(raw.reshape(raw.shape[0], -1, size).copy())  # [rows, nb, size] uint8


def _fp16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of every super-block, as float32 [rows, nb]."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _scales_mins_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes [rows, nb, 12] -> 6-bit scales and mins [rows, nb, 8] (int32)."""
    s = s.to(torch.int32)
    lo, hi, top = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat((lo & 63, (top & 15) | ((lo >> 6) << 4)), dim=-1)
    m = torch.cat((hi & 63, (top >> 4) | ((hi >> 6) << 4)), dim=-1)
    return sc, m


def _nibbles_k4(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes [rows, nb, 128] -> codes [rows, nb, 256] in input order: each 32-byte chunk
    gives 32 low nibbles, then 32 high nibbles."""
    chunks = qs.view(*qs.shape[:-1], 4, 1, 32)
    return torch.cat((chunks & 0x0F, chunks >> 4), dim=-2).reshape(*qs.shape[:-1], QK_K)


def read_kquant(raw: np.ndarray, type_name: str) -> KQuantBlocks:
    """``raw``: uint8 [rows, bytes per row] (``ReaderTensor.data``) of ``type_name``."""
    b = _super_blocks(raw, type_name)
    rows, nb, _ = b.shape
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _fp16(b, 0), _fp16(b, 2)
        sc, m = _scales_mins_k4(b[..., 4:16])
        if type_name == "Q4_K":
            codes = _nibbles_k4(b[..., 16:144])
        else:
            qh = b[..., 16:48]  # bit j of qh[l]: sub-block j's input l gets +16 (uint8 throughout)
            bits = torch.stack([(qh >> j) & 1 for j in range(8)], dim=-2)  # [rows, nb, 8, 32]
            codes = (_nibbles_k4(b[..., 48:176]).view(rows, nb, 8, 32) + (bits << 4)).view(rows, nb, QK_K)
        scales = (d.unsqueeze(-1) * sc.to(torch.float32)).reshape(rows, nb * 8)
        mins = (-(dmin.unsqueeze(-1) * m.to(torch.float32))).reshape(rows, nb * 8)
        return KQuantBlocks(type_name, 32, codes.reshape(rows, nb * QK_K), scales, mins)
    # Q6_K
    ql = b[..., 0:128].view(rows, nb, 2, 2, 32).to(torch.int32)  # [half, which 32 bytes, l]
    qh = b[..., 128:192].view(rows, nb, 2, 1, 32).to(torch.int32)  # [half, l]
    low = torch.cat((ql & 15, ql >> 4), dim=-2)  # [rows, nb, half, i = 0..3, l]: nibble i // 2 of ql[l + 32 (i % 2)]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(4, 1)
    high = (qh >> shifts) & 3  # [rows, nb, half, 4, 32]
    codes = ((low | (high << 4)) - 32).to(torch.int8).reshape(rows, nb * QK_K)
    sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)  # [rows, nb, 16]
    d = _fp16(b, 208)
    scales = (d.unsqueeze(-1) * sc).reshape(rows, nb * 16)
    return KQuantBlocks(type_name, 16, codes, scales, None)


#: K-quant types kept quantized (the rest of ``KQUANT_TYPES`` dequantize at load)
KEPT_KQUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def to_weight(blocks: KQuantBlocks) -> QuantizedWeight | None:
    """``blocks`` in Hearth's canonical layout (None for a type kept as float for now, or a
    scale or min beyond float16's range: d above ~1040)."""
    if blocks.type_name not in KEPT_KQUANT_TYPES:
        return None
    scales = blocks.scales.to(torch.float16)
    if blocks.type_name == "Q6_K":
        return QuantizedWeight(8, 16, blocks.codes, scales, None) if bool(torch.isfinite(scales).all()) else None
    mins = blocks.mins.to(torch.float16)
    if not (bool(torch.isfinite(scales).all()) and bool(torch.isfinite(mins).all())):
        return None
    if blocks.type_name == "Q4_K":
        return QuantizedWeight(4, 32, pack_int4(blocks.codes), scales, mins)
    return QuantizedWeight(8, 32, blocks.codes.to(torch.int8), scales, mins)
