"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum; vLLM and transformers
``quant_method: "gptq"``), 4 or 8 bits, any group size, with or without act-order.

For a linear layer with N outputs, K inputs, groups of G inputs and ``p = 32 / bits``:

- ``qweight`` int32 [K/p, N]: packed along K, sequentially: input ``p*r + i`` of column n
  sits at bits ``[bits*i, bits*(i+1))`` of word ``[r, n]``.
- ``qzeros`` int32 [K/G, N/p]: unsigned zero points packed along N, sequentially. The
  original ("gptq", v1) packer stored ``z - 1`` and every v1 loader adds 1 back
  (symmetric 4-bit words read 0x77777777); GPTQModel's "gptq_v2" stores ``z``.
- ``scales`` float16 [K/G, N].
- ``g_idx`` int32 [K]: the group of each input, ``k // G`` without act-order; with
  ``desc_act`` the groups are permuted (Hearth sorts the inputs by group into ``perm``).
- ``w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``.
"""

from __future__ import annotations

import torch

from engine.errors import UnsupportedModelError
from engine.quant.formats.config import CheckpointQuant
from engine.quant.formats.packing import (
    check_canonical_shape,
    from_canonical,
    g_idx_from_perm,
    pack_factor,
    pack_int32,
    perm_from_g_idx,
    scales_to_canonical,
    to_canonical,
    unpack_int32,
)
from engine.quant.qweight import QuantizedWeight

GPTQ_FORMATS = ("gptq", "gptq_v2")


def read_gptq(tensors: dict[str, torch.Tensor], q: CheckpointQuant, *, name: str = "",
              shape: tuple[int, int] | None = None) -> QuantizedWeight:
    """One GPTQ linear's ``qweight``/``qzeros``/``scales`` and, if present, ``g_idx``
    (names without the module prefix) -> ``QuantizedWeight``. ``q.checkpoint_format``
    says whether zero points are stored minus one ("gptq") or as is ("gptq_v2"). A
    non-trivial ``g_idx`` becomes the canonical ``perm``. ``name`` labels errors;
    ``shape`` (out, in), when given, must match."""
    what = name or "a GPTQ layer"
    for key in ("qweight", "qzeros", "scales") + (("g_idx",) if q.desc_act else ()):
        if key not in tensors:
            raise UnsupportedModelError(f"{what}: the checkpoint has no {key} tensor for it")
    bits, p = q.bits, pack_factor(q.bits)
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    g_idx = tensors.get("g_idx")
    k, n = qweight.shape[0] * p, qweight.shape[1]
    if g_idx is not None and g_idx.numel() != k:
        raise UnsupportedModelError(
            f"{what}: g_idx has {g_idx.numel()} entries but qweight {tuple(qweight.shape)} holds {k} inputs")
    g = q.group_size_for(k)
    check_canonical_shape(bits, n, k, g, what, shape)
    groups = k // g
    expect = {"scales": (groups, n), "qzeros": (groups, -(-n // p))}
    for key, want in expect.items():
        if tuple(tensors[key].shape) != want:
            raise UnsupportedModelError(
                f"{what}: {key} has shape {tuple(tensors[key].shape)}, expected {want} for a "
                f"{bits}-bit qweight of shape {tuple(qweight.shape)} and group size {g}")
    codes = unpack_int32(qweight, bits, dim=0).t()  # [N, K], checkpoint input order
    zeros = unpack_int32(qzeros, bits, dim=1, size=n).t()  # [N, K/G]
    if q.checkpoint_format != "gptq_v2":
        zeros = zeros + 1  # v1 stored z - 1 (unmasked: a stored 15 is z = 16, as v1 kernels read it)
    perm = None if g_idx is None else perm_from_g_idx(g_idx, g, groups, what)
    if perm is not None:
        codes = codes[:, perm]
    return to_canonical(codes.contiguous(), zeros, scales_to_canonical(scales.t(), what), bits, g, perm)


def write_gptq(qw: QuantizedWeight, *, checkpoint_format: str = "gptq", name: str = "") -> dict[str, torch.Tensor]:
    """A ``QuantizedWeight`` -> GPTQ ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (an
    act-order ``perm`` becomes a permuted ``g_idx``; the config then needs ``desc_act``).

    ``checkpoint_format`` "gptq" (v1, what vLLM and transformers read) stores ``z - 1``,
    so a zero point of 0 can't be written: ValueError, as for mins that are not integer
    zero points or input/output counts that don't fill whole int32 words."""
    what = name or "this weight"
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"unknown GPTQ checkpoint format {checkpoint_format!r} ({', '.join(GPTQ_FORMATS)})")
    codes, zeros, scales = from_canonical(qw, what)
    p = pack_factor(qw.bits)
    n, k = codes.shape
    if k % p or n % p:
        raise ValueError(f"{what}: GPTQ {qw.bits}-bit packs {p} values per int32; a [{n}, {k}] weight "
                         f"needs both dimensions to be multiples of {p}")
    if checkpoint_format == "gptq":
        if zeros.numel() and int(zeros.min()) < 1:
            raise ValueError(f"{what}: has a zero point of 0, which GPTQ v1 (stored minus one) can't "
                             f"hold; write it as compressed-tensors or AWQ, or as gptq_v2")
        zeros = zeros - 1
    if qw.perm is not None:
        in_checkpoint_order = torch.empty_like(codes)
        in_checkpoint_order[:, qw.perm.to(torch.int64)] = codes
        codes = in_checkpoint_order
    return {"qweight": pack_int32(codes.t(), qw.bits, dim=0),
            "qzeros": pack_int32(zeros.t(), qw.bits, dim=1),
            "scales": scales.t().contiguous(),
            "g_idx": g_idx_from_perm(qw.perm, k, qw.group_size)}
