"""Shared pieces of the published layouts: int32 bit packing, and the conversion between
"unsigned codes + integer zero points + scales" (what AWQ, GPTQ and compressed-tensors all
store, each in its own arrangement) and Hearth's canonical ``QuantizedWeight``.

Every published layout here dequantizes as ``w = (u - z) * s`` with unsigned codes ``u``
(0..2^b-1) and unsigned integer zero points ``z``. The canonical form is:

- int4: codes ``u`` as they are (GGUF-order packed), ``mins = -z * s`` (float16);
- int8: signed codes ``q = u - 128``, so ``w = q * s + (128 - z) * s``: ``mins =
  (128 - z) * s`` (float16), or None when every ``z == 128`` (symmetric).

``mins`` is computed in float32 from the float16 scale and rounded once, exactly as
``engine.quant.rtn`` does, so ``zero_points`` recovers ``z`` and a weight read and written
again is bit-identical.
"""

from __future__ import annotations

import torch

from engine.errors import UnsupportedModelError
from engine.quant.qweight import PACK_BLOCK, QuantizedWeight, pack_int4, unpack_int4
from engine.quant.rtn import zero_points

SCALE_DTYPE = torch.float16
_U32 = 1 << 32


def pack_factor(bits: int) -> int:
    """How many ``bits``-bit values one int32 word holds."""
    return 32 // bits


def unpack_int32(words: torch.Tensor, bits: int, dim: int, size: int | None = None) -> torch.Tensor:
    """Unsigned ``bits``-bit values from int32 ``words`` packed along ``dim`` (0 or 1),
    element ``i`` of each word at bits ``[bits*i, bits*(i+1))`` (sequential, the order GPTQ
    and compressed-tensors use). Returns int32 with ``size`` elements along ``dim``
    (trailing padding dropped; default: all)."""
    if words.dtype != torch.int32:
        raise UnsupportedModelError(f"packed weights must be int32, got {words.dtype}")
    p = pack_factor(bits)
    mask = (1 << bits) - 1
    w = words if dim == 1 else words.t()
    shifts = torch.arange(p, dtype=torch.int32, device=words.device) * bits
    # An arithmetic right shift of a negative word still leaves the right low bits once masked.
    values = ((w.unsqueeze(-1) >> shifts) & mask).reshape(w.shape[0], w.shape[1] * p)
    if size is not None:
        if size > values.shape[1]:
            raise UnsupportedModelError(
                f"packed tensor of shape {tuple(words.shape)} holds {values.shape[1]} values "
                f"along dim {dim}, fewer than the {size} expected")
        values = values[:, :size]
    return values if dim == 1 else values.t()


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned ``bits``-bit ``values`` (2-D, any integer dtype) -> int32 words packed along
    ``dim`` in sequential order (the inverse of ``unpack_int32``); zero-padded to a whole
    number of words."""
    p = pack_factor(bits)
    v = (values if dim == 1 else values.t()).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values outside 0..{(1 << bits) - 1} can't be packed as {bits}-bit")
    rows, cols = v.shape
    pad = -cols % p
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    shifts = torch.arange(p, dtype=torch.int64, device=v.device) * bits
    words = (v.view(rows, -1, p) << shifts).sum(dim=-1)
    words = torch.where(words >= 1 << 31, words - _U32, words).to(torch.int32)
    return words if dim == 1 else words.t().contiguous()


def check_canonical_shape(bits: int, out_features: int, in_features: int, group_size: int,
                          what: str, expected: tuple[int, int] | None = None) -> None:
    """Refuse what the canonical layout can't hold, naming the tensor shape, and a weight
    whose (out, in) shape isn't the ``expected`` one the model asks for."""
    if expected is not None and (out_features, in_features) != tuple(expected):
        raise UnsupportedModelError(
            f"{what}: the checkpoint's quantized weight is [{out_features}, {in_features}] (out, in), "
            f"the model expects {list(expected)}")
    if bits == 4 and in_features % PACK_BLOCK:
        raise UnsupportedModelError(
            f"{what}: a 4-bit weight of shape [{out_features}, {in_features}] (out, in) can't be "
            f"loaded: Hearth's int4 layout needs input features in multiples of {PACK_BLOCK}")
    if group_size <= 0 or in_features % group_size:
        raise UnsupportedModelError(
            f"{what}: group size {group_size} does not divide the {in_features} input features "
            f"of a [{out_features}, {in_features}] weight")


def scales_to_canonical(scales: torch.Tensor, what: str) -> torch.Tensor:
    """Checkpoint scales (fp16, bf16 or fp32) -> float16. bf16 is exact in fp16 within
    fp16's normal range; a scale too large for fp16 is refused rather than made infinite."""
    out = scales.to(SCALE_DTYPE)
    if not torch.isfinite(out).all() and torch.isfinite(scales).all():
        raise UnsupportedModelError(f"{what}: a scale is too large for float16 ({float(scales.abs().max()):g})")
    return out.contiguous()


def to_canonical(codes: torch.Tensor, zeros: torch.Tensor | None, scales: torch.Tensor, bits: int,
                 group_size: int, perm: torch.Tensor | None = None) -> QuantizedWeight:
    """Unsigned ``codes`` [N, K], unsigned integer ``zeros`` [N, K/G] (None: symmetric,
    ``2^(b-1)``) and float16 ``scales`` [N, K/G] -> ``QuantizedWeight``. ``codes`` are
    already in stored column order (``perm`` applied)."""
    s = scales.float()
    mid = 1 << (bits - 1)
    z = None if zeros is None else zeros.to(torch.int32)
    if bits == 4:
        zf = torch.full_like(s, mid) if z is None else z.float()
        return QuantizedWeight(4, group_size, pack_int4(codes), scales, (-zf * s).to(SCALE_DTYPE), perm)
    q = (codes.to(torch.int16) - 128).to(torch.int8)
    if z is None or bool((z == 128).all()):
        return QuantizedWeight(8, group_size, q.contiguous(), scales, None, perm)
    return QuantizedWeight(8, group_size, q.contiguous(), scales, ((128 - z.float()) * s).to(SCALE_DTYPE), perm)


def unsigned_zero_points(qw: QuantizedWeight, what: str) -> torch.Tensor:
    """The unsigned integer zero points [N, K/G] int32 ``qw`` is written with (int8's
    shifted by 128, like its codes: a symmetric int8 weight's are 128).

    Raises ValueError when the weight's mins are not integer zero points (a GGUF Q4_1
    weight) or a zero point falls outside the code range."""
    if qw.bits not in (4, 8):
        raise ValueError(f"{what}: {qw.bits}-bit weights can't be written (4 or 8)")
    try:
        z = zero_points(qw)
    except ValueError:
        raise ValueError(
            f"{what}: this weight's offsets are not integer zero points (an asymmetric GGUF "
            f"Q4_1, Q4_K or Q5_K weight?), so it can't be written in this layout without loss; requantize "
            f"it from the float checkpoint instead") from None
    if qw.bits == 8:
        z = z + 128
    top = (1 << qw.bits) - 1
    if z.numel() and (int(z.min()) < 0 or int(z.max()) > top):
        raise ValueError(f"{what}: a zero point falls outside 0..{top}, which {qw.bits}-bit layouts can't store")
    return z


def from_canonical(qw: QuantizedWeight, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``QuantizedWeight`` -> (unsigned codes [N, K] int32 in stored column order,
    unsigned integer zero points [N, K/G] int32, float16 scales [N, K/G]); raises as
    ``unsigned_zero_points``."""
    z = unsigned_zero_points(qw, what)
    if qw.bits == 4:
        codes = unpack_int4(qw.qweight).to(torch.int32)
    else:
        codes = qw.qweight.to(torch.int32) + 128
    return codes, z, qw.scales.to(SCALE_DTYPE)


def is_symmetric(qw: QuantizedWeight) -> bool:
    """Whether every zero point is the middle code (2^(b-1)), i.e. the weight can be
    written with a symmetric scheme (no zero-point tensor)."""
    if qw.mins is None:
        return True
    try:
        z = zero_points(qw)
    except ValueError:
        return False
    return bool((z == (8 if qw.bits == 4 else 0)).all())


def perm_from_g_idx(g_idx: torch.Tensor, group_size: int, num_groups: int, what: str) -> torch.Tensor | None:
    """The canonical ``perm`` for a checkpoint's per-input group index ``g_idx`` [K]: the
    inputs sorted by group (stably), so groups are contiguous. None when ``g_idx`` is
    already ``k // G``. Refuses a ``g_idx`` whose groups don't each have exactly
    ``group_size`` members, which no contiguous grouping can represent."""
    g = g_idx.to(torch.int64).flatten()
    k = g.numel()
    if k != num_groups * group_size:
        raise UnsupportedModelError(f"{what}: g_idx has {k} entries, expected {num_groups * group_size}")
    if k and (int(g.min()) < 0 or int(g.max()) >= num_groups):
        raise UnsupportedModelError(f"{what}: g_idx names a group outside 0..{num_groups - 1}")
    counts = torch.bincount(g, minlength=num_groups).cpu()
    if not bool((counts == group_size).all()):
        bad = int(torch.nonzero(counts != group_size)[0, 0])
        raise UnsupportedModelError(
            f"{what}: its act-order g_idx puts {int(counts[bad])} inputs in group {bad}, not "
            f"{group_size}; Hearth needs every group to have exactly group_size inputs "
            f"(re-quantize with a group size that divides the input features, or without act-order)")
    if torch.equal(g, torch.arange(k, device=g.device) // group_size):
        return None
    return torch.argsort(g, stable=True)


def g_idx_from_perm(perm: torch.Tensor | None, in_features: int, group_size: int) -> torch.Tensor:
    """The checkpoint-order group index [K] int32 of a canonical weight: stored column
    ``j`` (checkpoint input ``perm[j]``) is in group ``j // G``."""
    device = None if perm is None else perm.device
    stored_group = torch.arange(in_features, dtype=torch.int32, device=device) // group_size
    if perm is None:
        return stored_group
    g = torch.empty(in_features, dtype=torch.int32, device=device)
    g[perm.to(torch.int64)] = stored_group
    return g


def resolve_group_size(group_size: int | None, in_features: int) -> int:
    """A config's group size (None: per output channel) for a layer with ``in_features``."""
    return in_features if group_size is None else group_size
