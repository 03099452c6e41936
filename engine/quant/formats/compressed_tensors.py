"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor W4A16/W8A16; vLLM
``quant_method: "compressed-tensors"``, scheme WNA16), 4 or 8 bits.

For a linear layer with N outputs, K inputs, groups of G inputs and ``p = 32 / bits``:

- ``weight_packed`` int32 [N, ceil(K/p)]: row-major like the float weight, packed along
  K sequentially (input ``p*c + i`` at bits ``[bits*i, bits*(i+1))`` of word ``[n, c]``),
  codes stored unsigned: the signed code plus ``2^(b-1)``.
- ``weight_shape`` [2] = (N, K): strips the padding of a K that isn't a multiple of p.
- ``weight_scale`` [N, K/G] (strategy "group") or [N, 1] ("channel"), in the model dtype.
- ``weight_zero_point`` (asymmetric only): signed zero points, packed along N like the
  codes (plus ``2^(b-1)``), int32 [ceil(N/p), K/G]; versions before zero-point packing
  stored them unpacked, signed, [N, K/G]. Symmetric: zero point 0 (unsigned ``2^(b-1)``).
- ``weight_g_idx`` [K] with ``actorder: "group"``: the group of each input, as GPTQ's.
- ``w[n, k] = (q_signed - zp_signed) * s = (u - z_unsigned) * s``.
"""

from __future__ import annotations

import torch

from engine.errors import UnsupportedModelError
from engine.quant.formats.config import CheckpointQuant
from engine.quant.formats.packing import (
    check_canonical_shape,
    from_canonical,
    g_idx_from_perm,
    is_symmetric,
    pack_factor,
    pack_int32,
    perm_from_g_idx,
    scales_to_canonical,
    to_canonical,
    unpack_int32,
)
from engine.quant.qweight import QuantizedWeight


def read_compressed_tensors(tensors: dict[str, torch.Tensor], q: CheckpointQuant, *, name: str = "",
                            shape: tuple[int, int] | None = None) -> QuantizedWeight:
    """One pack-quantized linear's ``weight_packed``/``weight_scale``/``weight_shape`` and,
    as the scheme needs, ``weight_zero_point``/``weight_g_idx`` (names without the module
    prefix) -> ``QuantizedWeight``. ``name`` labels errors; ``shape`` (out, in), when
    given, must match."""
    what = name or "a compressed-tensors layer"
    required = ["weight_packed", "weight_scale"] + ([] if q.sym else ["weight_zero_point"])
    required += ["weight_g_idx"] if q.actorder == "group" else []
    for key in required:
        if key not in tensors:
            raise UnsupportedModelError(f"{what}: the checkpoint has no {key} tensor for it")
    bits, p = q.bits, pack_factor(q.bits)
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    stored_shape = tensors.get("weight_shape")  # (N, K): K may not fill the last word
    n = packed.shape[0]
    k = int(stored_shape.flatten()[1]) if stored_shape is not None else packed.shape[1] * p
    if stored_shape is not None and int(stored_shape.flatten()[0]) != n:
        raise UnsupportedModelError(f"{what}: weight_shape {stored_shape.tolist()} doesn't match "
                                    f"weight_packed {tuple(packed.shape)}")
    g = q.group_size_for(k)
    check_canonical_shape(bits, n, k, g, what, shape)
    groups = k // g
    if tuple(scale.shape) != (n, groups):
        raise UnsupportedModelError(f"{what}: weight_scale has shape {tuple(scale.shape)}, expected "
                                    f"{(n, groups)} for a [{n}, {k}] weight and group size {g}")
    codes = unpack_int32(packed, bits, dim=1, size=k)
    zeros = None if q.sym else _zero_points(tensors["weight_zero_point"], bits, n, groups, what)
    perm = None
    if q.actorder == "group":
        perm = perm_from_g_idx(tensors["weight_g_idx"], g, groups, what)
        if perm is not None:
            codes = codes[:, perm]
    return to_canonical(codes.contiguous(), zeros, scales_to_canonical(scale, what), bits, g, perm)


def _zero_points(zp: torch.Tensor, bits: int, n: int, groups: int, what: str) -> torch.Tensor:
    """Unsigned zero points [N, K/G] from the packed [ceil(N/p), K/G] int32 form or the
    older unpacked signed [N, K/G] form."""
    packed_rows = -(-n // pack_factor(bits))
    if zp.dtype == torch.int32 and tuple(zp.shape) == (packed_rows, groups):
        return unpack_int32(zp, bits, dim=0, size=n)
    if tuple(zp.shape) == (n, groups):
        return zp.to(torch.int32) + (1 << (bits - 1))
    raise UnsupportedModelError(
        f"{what}: weight_zero_point has shape {tuple(zp.shape)} ({zp.dtype}); expected packed "
        f"{(packed_rows, groups)} int32 or unpacked {(n, groups)}")


def write_compressed_tensors(qw: QuantizedWeight, *, sym: bool | None = None,
                             name: str = "") -> dict[str, torch.Tensor]:
    """A ``QuantizedWeight`` -> pack-quantized ``weight_packed``, ``weight_shape``,
    ``weight_scale`` (float16), plus ``weight_zero_point`` (packed along N) unless ``sym``
    and ``weight_g_idx`` for an act-order ``perm`` (config ``actorder: "group"``).

    ``sym`` None decides from the weight; a checkpoint has one scheme for every layer, so
    pass the value written in its config. ValueError when ``sym`` is asked of a weight with
    other zero points, or its mins are not integer zero points."""
    what = name or "this weight"
    codes, zeros, scales = from_canonical(qw, what)
    symmetric = is_symmetric(qw)
    if sym is None:
        sym = symmetric
    elif sym and not symmetric:
        raise ValueError(f"{what}: has zero points other than {1 << (qw.bits - 1)}, so it can't be "
                         f"written with a symmetric scheme")
    n, k = codes.shape
    if qw.perm is not None:
        in_checkpoint_order = torch.empty_like(codes)
        in_checkpoint_order[:, qw.perm.to(torch.int64)] = codes
        codes = in_checkpoint_order
    out = {"weight_packed": pack_int32(codes, qw.bits, dim=1),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64),
           "weight_scale": scales.contiguous()}
    if not sym:
        out["weight_zero_point"] = pack_int32(zeros, qw.bits, dim=0)
    if qw.perm is not None:
        out["weight_g_idx"] = g_idx_from_perm(qw.perm, k, qw.group_size)
    return out
