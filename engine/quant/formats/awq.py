"""AWQ checkpoints, GEMM packing (AutoAWQ ``WQLinear_GEMM``; vLLM and transformers
``quant_method: "awq"``, ``version: "gemm"``), 4-bit only.

For a linear layer with N outputs, K inputs and groups of G inputs:

- ``qweight`` int32 [K, N/8]: the weight transposed (one row per input), 8 codes per word
  packed along N. Word slot ``i`` (bits ``[4i, 4i+4)``) holds output column
  ``AWQ_ORDER[i]`` of its 8: the order is interleaved, not sequential.
- ``qzeros`` int32 [K/G, N/8]: unsigned zero points, packed the same way, stored as is.
- ``scales`` float16 [K/G, N].
- ``w[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]``.
"""

from __future__ import annotations

import torch

from engine.errors import UnsupportedModelError
from engine.quant.formats.config import CheckpointQuant
from engine.quant.formats.packing import (
    check_canonical_shape,
    from_canonical,
    pack_int32,
    scales_to_canonical,
    to_canonical,
    unpack_int32,
)
from engine.quant.qweight import QuantizedWeight

#: Word slot i holds logical column AWQ_ORDER[i] of each group of 8 (AutoAWQ's pack order).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Logical column j sits in word slot AWQ_REVERSE_ORDER[j] (the inverse permutation).
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _columns(n: int, order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Column indices that apply ``order`` within each group of 8 of ``n`` columns."""
    return (torch.arange(0, n, 8, device=device).unsqueeze(1) + torch.tensor(order, device=device)).flatten()


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] in AWQ order -> unsigned codes int32 [R, C] in logical column order."""
    physical = unpack_int32(words, 4, dim=1)
    return physical[:, _columns(physical.shape[1], AWQ_REVERSE_ORDER, words.device)]


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [R, C] (C a multiple of 8) -> int32 [R, C/8] in AWQ order."""
    if values.shape[1] % 8:
        raise ValueError(f"AWQ packs 8 output columns per word; {values.shape[1]} is not a multiple of 8")
    return pack_int32(values[:, _columns(values.shape[1], AWQ_ORDER, values.device)], 4, dim=1)


def read_awq(tensors: dict[str, torch.Tensor], q: CheckpointQuant, *, name: str = "",
             shape: tuple[int, int] | None = None) -> QuantizedWeight:
    """One AWQ linear's ``qweight``/``qzeros``/``scales`` (names without the module
    prefix) -> ``QuantizedWeight`` (int4, mins ``-z * s``). ``name`` labels errors;
    ``shape`` (out, in), when given, must match."""
    what = name or "an AWQ layer"
    try:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    except KeyError as e:
        raise UnsupportedModelError(f"{what}: the checkpoint has no {e.args[0]} tensor for it") from None
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = q.group_size_for(k)
    check_canonical_shape(4, n, k, g, what, shape)
    expect = {"scales": (k // g, n), "qzeros": (k // g, n // 8)}
    for key, want in expect.items():
        if tuple(tensors[key].shape) != want:
            raise UnsupportedModelError(
                f"{what}: {key} has shape {tuple(tensors[key].shape)}, expected {want} for a "
                f"qweight of shape {tuple(qweight.shape)} and group size {g}")
    codes = unpack_awq(qweight).t()
    zeros = unpack_awq(qzeros).t()
    return to_canonical(codes, zeros, scales_to_canonical(scales.t(), what), 4, g)


def write_awq(qw: QuantizedWeight, *, name: str = "") -> dict[str, torch.Tensor]:
    """A 4-bit ``QuantizedWeight`` -> AWQ GEMM ``qweight``, ``qzeros``, ``scales``.
    Raises ValueError for 8-bit or act-order weights (AWQ has neither), an output count
    that isn't a multiple of 8, or mins that are not integer zero points."""
    what = name or "this weight"
    if qw.bits != 4:
        raise ValueError(f"{what}: AWQ checkpoints are 4-bit; write an 8-bit weight as GPTQ or compressed-tensors")
    if qw.perm is not None:
        raise ValueError(f"{what}: AWQ can't store act-order (a permuted weight); "
                         f"write GPTQ or compressed-tensors")
    codes, zeros, scales = from_canonical(qw, what)
    return {"qweight": pack_awq(codes.t()), "qzeros": pack_awq(zeros.t()),
            "scales": scales.t().contiguous()}
