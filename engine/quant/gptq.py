"""GPTQ: round one input column at a time and push each rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al.
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers";
Hearth's own code, written from the paper's algorithm).

For a linear ``y = x W^T`` with calibration inputs ``x`` the output error of a quantized
``Q`` is ``tr((W - Q) H (W - Q)^T)`` with ``H = sum x x^T`` [K, K]. Quantizing column
``j`` to ``q_j`` and updating the remaining columns ``W[:, j+1:] -= (w_j - q_j) / U_jj *
U_j,j+1:`` (``U`` the upper Cholesky factor of ``H^-1``) minimises that error given the
earlier choices (Optimal Brain Quantization applied column by column). Choices here:

- Damping: ``damp * mean(diag H)`` is added to the diagonal (``damp=0.01``, the paper's
  1%), ten times more on each retry if the Cholesky factorisation still fails. With few
  calibration tokens per input (a few thousand for K=1536) GPTQ overfits them: on
  SmolLM2's down_proj, held-out error against RTN was 1.41x at damp 0.01, 1.10x at 0.1,
  0.98x at 0.3 (3k calibration tokens, one vote per token: see the per-token weights of
  ``engine.quant.calibrate._gptq_statistics``). Use plenty of text, or a larger ``damp``.
- Dead inputs (``H_jj == 0``: never non-zero in the calibration data) get ``H_jj = 1`` and
  weight 0; nothing reads them, so their zero costs nothing.
- Groups: a group's scale and zero point are found when the quantizer reaches its first
  column, from that group's weights *as updated by every earlier column's error* (the
  reference implementation reads the block-stale copy for a group starting inside a lazy
  block; here the pending in-block updates are applied first, so the result does not
  depend on ``block_size``). Group parameters follow ``engine.quant.rtn.quantize_int4``
  (asymmetric: min/max of the group, integer zero point) or GPTQ's symmetric form
  (``scale = 2 * absmax / (2^bits - 1)``, zero ``2^(bits-1)``).
- Lazy batch updates (the paper's section 4, step 2): columns are processed in blocks of
  ``block_size``; within a block the updates touch only the block, and the block's
  accumulated error is applied to the rest of the matrix in one matmul.
- act-order (``act_order=True``, GPTQ's ``desc_act``): columns are processed in order of
  descending ``H_jj`` (the most-used inputs first, while there is most freedom left to
  compensate), and groups are formed in that order. The result's ``perm`` is that order
  (``QuantizedWeight``: ``W_stored[:, j] = W[:, perm[j]]``), so groups are contiguous in
  the stored columns. Written as a GPTQ checkpoint, ``g_idx = argsort(perm) // group_size``
  (the group of each original input), with the stored rows un-permuted.
- With a diagonal Hessian nothing propagates, so GPTQ gives exactly round-to-nearest
  (``rtn.quantize_int4`` for the asymmetric int4 default).

The error compensation uses the values actually stored (codes times the fp16 scale plus the
fp16 min), so it compensates for the fp16 rounding too.
"""

from __future__ import annotations

import torch

from engine.quant.qweight import QuantizedWeight, check_shape, pack_int4
from engine.quant.rtn import SCALE_DTYPE

# An all-zero group (e.g. inputs the calibration never used) still gets a usable, non-zero
# scale: the smallest normal fp16 (rtn's 1e-8 rounds to 0 in fp16, and 0/0 is NaN).
_TINY = torch.finfo(SCALE_DTYPE).tiny


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` [N, G] (one group per row).

    Returns ``(scale, zero, minv)`` as float32 [N]: ``scale`` already rounded to fp16 (the
    stored value), ``zero`` the integer zero point in the unsigned code range, and
    ``minv`` the stored fp16 offset (``-zero * scale``; for 8-bit, relative to the signed
    codes: ``(2^(bits-1) - zero) * scale``). Asymmetric int4 is exactly rtn.quantize_int4's
    rule, so a diagonal Hessian reproduces it bit for bit."""
    maxq = 2 ** bits - 1
    w = w.float()
    if sym:
        amax = w.abs().amax(dim=-1)
        scale = (2.0 * amax / maxq).to(SCALE_DTYPE).float().clamp_min(_TINY)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        lo = w.amin(dim=-1).clamp(max=0.0)
        hi = w.amax(dim=-1).clamp(min=0.0)
        scale = ((hi - lo) / maxq).to(SCALE_DTYPE).float().clamp_min(_TINY)
        zero = torch.round(-lo / scale).clamp_(0, maxq)
    offset = 2 ** (bits - 1) if bits == 8 else 0  # int8 codes are stored signed
    minv = ((offset - zero) * scale).to(SCALE_DTYPE).float()
    return scale, zero, minv


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, minv: torch.Tensor,
                    bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (unsigned, 0..2^bits-1) of ``w`` [N] and the value they store (``code * scale +
    min`` in the stored code range: signed for 8-bit)."""
    maxq = 2 ** bits - 1
    q = (torch.round(w / scale) + zero).clamp_(0, maxq)
    stored = q - (2 ** (bits - 1) if bits == 8 else 0)
    return q, stored * scale + minv


def act_order_of(hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: the inputs by descending ``H_jj`` (ties in input order)."""
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in float64; the
    damping grows tenfold per retry while the factorisation fails."""
    k = h.shape[0]
    mean_diag = torch.diagonal(h).mean().item()
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    bump = damp
    for _ in range(5):
        lower, info = torch.linalg.cholesky_ex(h + (bump * mean_diag) * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        bump *= 10.0
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with damping "
                     f"{bump / 10:g}; use more calibration text or a larger damp")


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                  sym: bool = False, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128, order: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ of ``w`` [N, K] (any float dtype) given ``hessian`` [K, K] = sum of ``x x^T``
    over the calibration inputs of this linear (float32 or float64; its scale doesn't
    matter; the rows ``x`` may carry per-token weights). ``bits`` 4 (the canonical
    GGUF-packed int4, fp16 scales and mins with integer zero points) or 8 (int8 codes;
    ``sym`` gives ``mins`` None); ``group_size`` divides K (``K`` for per-output-channel).
    Returns a ``QuantizedWeight`` whose ``perm`` is the act-order column order when
    ``act_order`` (else None). ``order`` (int64 [K], a permutation) is an act-order the
    caller chose instead of this Hessian's own (row blocks of one fused weight quantized
    with different Hessians must share one order); it implies ``act_order``."""
    n, k = w.shape
    problem = check_shape(bits, group_size, n, k)
    if problem:
        raise ValueError(problem)
    if hessian.shape != (k, k):
        raise ValueError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match the weight's {k} inputs")
    device = w.device
    W, H, perm = _prepared(w.detach().to(torch.float32), hessian, act_order, order)
    hinv = _inverse_hessian_factor(H, damp).to(torch.float32)
    del H

    G = group_size
    codes = torch.zeros(n, k, dtype=torch.uint8, device=device)
    scales = torch.empty(n, k // G, dtype=torch.float32, device=device)
    zeros = torch.empty_like(scales)
    mins = torch.empty_like(scales)
    params = [None, None, None]  # the current group's scale, zero, min

    def column(col, wcol, group):
        if col % G == 0:
            params[:] = group_params(group(G), bits, sym)
            g = col // G
            scales[:, g], zeros[:, g], mins[:, g] = params
        q, value = quantize_column(wcol, *params, bits)
        codes[:, col] = q.to(torch.uint8)
        return value

    _sweep(W, hinv, block_size, column)
    return _result(codes, scales, zeros, mins, bits, sym, G, perm)


def gptq_quantize_fp8(w: torch.Tensor, hessian: torch.Tensor, *, damp: float = 0.01, block_size: int = 128,
                      act_order: bool = False, order: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ of ``w`` [N, K] onto float8 e4m3 with ``rtn.quantize_fp8``'s per-output-row
    float32 scales (``absmax(row) / 448``, from the weight before any update): the result
    is a ``QuantizedWeight`` of that layout (``fmt="e4m3"``, one group of K), readable by
    everything that reads ``--quant fp8``'s weights. A column pushed past its row's range
    by earlier errors saturates at +-448 (e4m3fn has no infinity: an unclamped cast gives
    NaN). With a diagonal Hessian it is ``rtn.quantize_fp8`` bit for bit. ``act_order``
    and ``order`` as ``gptq_quantize`` (no groups to keep together, so the stored columns
    are put back in input order: ``perm`` is None)."""
    from engine.quant.rtn import FP8_MAX

    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match the weight's {k} inputs")
    device = w.device
    x = w.detach().float()
    scale = (x.abs().amax(dim=1, keepdim=True) * (1.0 / FP8_MAX)).clamp_min(2.0 ** -126)  # as rtn.quantize_fp8
    W, H, perm = _prepared(x, hessian, act_order, order)
    hinv = _inverse_hessian_factor(H, damp).to(torch.float32)
    del H
    codes = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device)

    def column(col, wcol, _group):
        q = (wcol / scale[:, 0]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        codes[:, col] = q
        return q.float() * scale[:, 0]

    _sweep(W, hinv, block_size, column)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(8, k, codes.contiguous(), scale, fmt="e4m3")


def _prepared(W: torch.Tensor, hessian: torch.Tensor, act_order: bool, order: torch.Tensor | None):
    """(W, H, perm): a float32 copy of W with dead inputs zeroed, float64 H with their
    diagonal 1, both in the column order ``perm`` (None: input order)."""
    k = W.shape[1]
    device = W.device
    W = W.clone()
    H = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if order is not None:
        perm = torch.as_tensor(order, dtype=torch.long, device=device)
        if not torch.equal(torch.sort(perm).values, torch.arange(k, device=device)):
            raise ValueError(f"GPTQ: order must be a permutation of the weight's {k} inputs")
    elif act_order:
        perm = act_order_of(H)
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    return W, H, perm


def _sweep(W: torch.Tensor, hinv: torch.Tensor, block_size: int, column) -> None:
    """GPTQ's column sweep over ``W`` [N, K] (float32, updated in place) with the upper
    Cholesky factor ``hinv`` of the inverse Hessian, in lazy blocks of ``block_size``.
    ``column(col, w_col, group)`` rounds column ``col`` (its current values ``w_col``) and
    returns the values stored; ``group(G)`` gives columns ``col .. col+G`` with every update
    so far (for a grid whose parameters are set per group)."""
    k = W.shape[1]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            wcol = W1[:, i]
            value = column(col, wcol, lambda G, i=i: _current_group(W, W1, err, hinv, i1, i2, i, G))
            e = (wcol - value) / hinv1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, i2:] -= err @ hinv[i1:i2, i2:]


def _current_group(W, W1, err, hinv, i1, i2, i, G) -> torch.Tensor:
    """Columns ``i1+i .. i1+i+G`` with every update from the columns before ``i1+i``: those
    inside the block are in ``W1``; those past it still lack this block's pending errors."""
    inside = W1[:, i:i + G]
    end = i1 + i + G
    if end <= i2:
        return inside
    outside = W[:, i2:end] - err[:, :i] @ hinv[i1:i1 + i, i2:end]
    return torch.cat((inside, outside), dim=1)


def _result(codes, scales, zeros, mins, bits, sym, G, perm) -> QuantizedWeight:
    scales16 = scales.to(SCALE_DTYPE)
    if bits == 4:
        return QuantizedWeight(4, G, pack_int4(codes), scales16, mins.to(SCALE_DTYPE), perm)
    signed = (codes.to(torch.int16) - 128).to(torch.int8)
    return QuantizedWeight(8, G, signed, scales16, None if sym else mins.to(SCALE_DTYPE), perm)
