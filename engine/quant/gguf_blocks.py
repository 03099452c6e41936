"""GGUF's Q8_0, Q4_0 and Q4_1 blocks repacked, without loss, into Hearth's canonical layout.

Each block covers 32 consecutive inputs of one row (GGUF's ``ne0``, the row's own inner
dimension), so a [rows, K] tensor is ``rows x K/32`` blocks (sizes from
``gguf.GGML_QUANT_SIZES``):

- Q8_0, 34 bytes: float16 ``d``, 32 int8 ``qs``; ``w = d * q``.
- Q4_0, 18 bytes: float16 ``d``, 16 bytes of nibbles; ``w = d * (q - 8)``.
- Q4_1, 20 bytes: float16 ``d``, float16 ``m``, 16 bytes; ``w = d * q + m``.

In a 4-bit block byte ``i`` holds input ``i`` (low nibble) and input ``i + 16`` (high
nibble): exactly Hearth's int4 packing, so the bytes are kept as they are. Q4_0 becomes
asymmetric-form int4 with ``min = -8 d`` (exact in float16: a power-of-two multiple).
``gguf.quants.dequantize`` is the reference the tests hold this to, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.quant.qweight import QuantizedWeight

#: GGUF tensor types Hearth keeps quantized (by ``GGMLQuantizationType`` name).
KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def blocks_to_weight(raw: np.ndarray, type_name: str) -> QuantizedWeight:
    """``raw``: uint8 [rows, bytes per row] (``ReaderTensor.data``) of type ``type_name``."""
    size = _BLOCK_BYTES.get(type_name)
    if size is None:
        raise ValueError(f"GGUF type {type_name} is not kept quantized (only {', '.join(KEPT_TYPES)})")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, size)
    nb = blocks.shape[1]
    d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16).reshape(rows, nb))
    if type_name == "Q8_0":
        qs = torch.from_numpy(blocks[:, :, 2:].copy().view(np.int8).reshape(rows, nb * 32))
        return QuantizedWeight(8, 32, qs, d)
    if type_name == "Q4_0":
        qs = torch.from_numpy(blocks[:, :, 2:].copy().reshape(rows, nb * 16))
        return QuantizedWeight(4, 32, qs, d, (d.float() * -8.0).to(torch.float16))
    m = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16).reshape(rows, nb))
    qs = torch.from_numpy(blocks[:, :, 4:].copy().reshape(rows, nb * 16))
    return QuantizedWeight(4, 32, qs, d, m)


def permute_rows(qw: QuantizedWeight, perm: torch.Tensor) -> QuantizedWeight:
    """``qw`` with its output rows reordered (row ``i`` of the result is row ``perm[i]``):
    llama.cpp stores q/k projections with rows permuted for its RoPE."""
    pick = lambda t: None if t is None else t.index_select(0, perm)  # noqa: E731
    return QuantizedWeight(qw.bits, qw.group_size, pick(qw.qweight), pick(qw.scales), pick(qw.mins), qw.perm)


def row_permutation(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
    """The ``perm`` with ``source[perm] == target`` exactly (rows matched by a random
    projection, then checked), or None when ``target`` is no row permutation of ``source``."""
    if target.shape != source.shape:
        return None
    if torch.equal(target, source):
        return torch.arange(source.shape[0])
    probe = torch.randn(source.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    order_t = torch.argsort(target.double() @ probe, stable=True)
    order_s = torch.argsort(source.double() @ probe, stable=True)
    perm = torch.empty_like(order_t)
    perm[order_t] = order_s
    return perm if torch.equal(source[perm], target) else None
