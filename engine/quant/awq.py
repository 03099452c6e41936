"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware
Weight Quantization for LLM Compression and Acceleration"; Hearth's own code, written from
the paper's method).

A few input channels carry much larger activations than the rest, and their weights
matter most. Multiplying weight column ``k`` by ``s_k > 1`` (and the input by ``1/s_k``,
folded into the op that produces it, so the float model is unchanged) gives those weights
finer int4 steps relative to their size. ``s = mean|x|^alpha`` per input channel,
normalised so ``max(s) * min(s) = 1``, with ``alpha`` searched on a grid of ``[0, 1)``
for the smallest output error of round-to-nearest int4 on calibration inputs
(``awq_search``). ``alpha = 0`` is plain round-to-nearest, so on the calibration inputs the
search is never worse than RTN.

Where the inverse scale goes (``fold_layer_scales``, the rules for Hearth's Llama layer):
- qkv_proj's input is input_layernorm's output: divide the norm's weight by ``s``;
- gate_up_proj's input is post_attention_layernorm's output: the same;
- down_proj's input is ``silu(gate) * up``: divide the *up* rows of gate_up_proj (and
  their bias) by ``s``;
- o_proj's input is the attention output, linear in v: divide v's rows of qkv_proj by ``s``.
  Only when every query head has its own v head (``num_heads == num_kv_heads``); with GQA
  one v channel feeds several o_proj inputs that would want different scales, so o_proj
  is left unscaled (``o_proj_scalable``), as AutoAWQ does.

``awq_clip_search`` is AWQ's second step (the paper's weight clipping): per output row and
group, the largest magnitude is shrunk (up to half) where that lowers the group's output
error on calibration inputs; ``awq_quantize`` then clamps and rounds. Like AutoAWQ it is
not applied to q and k (their error shows only through the softmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.quant.gptq import group_params
from engine.quant.qweight import QuantizedWeight
from engine.quant.rtn import quantize_int4

_MIN_SCALE = 1e-4  # AWQ's floor for mean|x|^alpha (a channel that is always zero)


def fake_quant_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` [N, K] rounded to asymmetric int4 in groups of ``group_size`` and expanded back
    to float32, with ``rtn.quantize_int4``'s rule (fp16 scale and min), without packing."""
    n, k = w.shape
    g = w.float().reshape(-1, group_size)
    scale, zero, minv = group_params(g, 4, sym=False)
    q = (torch.round(g / scale[:, None]) + zero[:, None]).clamp_(0, 15)
    return (q * scale[:, None] + minv[:, None]).reshape(n, k)


def activation_scales(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scales for ``alpha``: ``mean|x|^alpha`` over the rows of ``x``
    [T, K], floored, divided by ``sqrt(max * min)``. float32 [K]."""
    return _scales(x.float().abs().mean(dim=0), alpha)


def _scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.pow(alpha).clamp_(min=_MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_search(weights: Sequence[torch.Tensor], x: torch.Tensor, *, group_size: int,
               grid: int = 20) -> torch.Tensor:
    """The AWQ scales [K] (float32) for linears ``weights`` (each [N_i, K]) that read the same
    input, from calibration inputs ``x`` [T, K]: of ``alpha = i / grid`` (i = 0..grid-1),
    the one whose scales give the smallest total squared error of the outputs of
    ``RTN_int4(W * s)`` applied to ``x / s`` against the float outputs ``x W^T``.
    Returns all ones when no scaling beats plain round-to-nearest."""
    x = x.float()
    ws = [w.float() for w in weights]
    refs = [x @ w.T for w in ws]
    mean_abs = x.abs().mean(dim=0)
    best_loss, best = float("inf"), None
    for i in range(grid):
        s = _scales(mean_abs, i / grid)
        xs = x / s
        loss = 0.0
        for w, ref in zip(ws, refs):
            loss += (xs @ fake_quant_int4(w * s, group_size).T - ref).pow(2).sum().item()
        if loss < best_loss:
            best_loss, best = loss, s
    return best


@torch.no_grad()
def awq_clip_search(w: torch.Tensor, x: torch.Tensor, *, group_size: int, grid: int = 20,
                    max_shrink: float = 0.5, rows_per_batch: int = 64) -> torch.Tensor:
    """AWQ's clipping: per output row and group of ``w`` [N, K], the clip value
    ``max|w_group| * (1 - i / grid)`` (``i / grid < max_shrink``) whose int4 rounding of the
    clamped group gives the smallest mean squared group output on ``x`` [T, K] (keep T
    small: a few hundred rows). Returns the clip values [N, K // G] (float32)."""
    n, k = w.shape
    G = group_size
    xg = x.float().reshape(-1, k // G, G)
    best_all = []
    for r0 in range(0, n, rows_per_batch):
        wb = w[r0:r0 + rows_per_batch].float().reshape(-1, k // G, G)
        ref = torch.einsum("tgj,ngj->ntg", xg, wb)
        org_max = wb.abs().amax(dim=-1, keepdim=True)
        best_max = org_max.clone()
        best_err = torch.full(org_max.shape[:2], float("inf"), device=wb.device)
        for i in range(int(max_shrink * grid)):
            max_val = org_max * (1 - i / grid)
            clamped = torch.maximum(torch.minimum(wb, max_val), -max_val)
            q = fake_quant_int4(clamped.reshape(wb.shape[0], k), G).reshape(wb.shape)
            err = (torch.einsum("tgj,ngj->ntg", xg, q) - ref).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
        best_all.append(best_max.squeeze(-1))
    return torch.cat(best_all)


def awq_quantize(w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> QuantizedWeight:
    """int4 round-to-nearest of the (already scaled) ``w`` [N, K], each group first clamped
    to ``+-clip`` [N, K // G] when given (``awq_clip_search``)."""
    if clip is None:
        return quantize_int4(w, group_size)
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    c = clip.float().unsqueeze(-1)
    return quantize_int4(torch.maximum(torch.minimum(g, c), -c).reshape(n, k), group_size)


# -- folding the scales into a Hearth Llama decoder layer ---------------------------------------------


def o_proj_scalable(attn) -> bool:
    """May o_proj's input be scaled through v's rows (one v head per query head)?"""
    return attn.num_heads == attn.num_kv_heads


def _scale_columns(linear, s: torch.Tensor) -> None:
    w = linear.weight
    w.copy_((w.float() * s.to(w.device)).to(w.dtype))


def _divide_rows(linear, start: int, rows: int, s: torch.Tensor) -> None:
    for p in (linear.weight, linear.bias):
        if p is None:
            continue
        block = p[start:start + rows]
        sv = s.to(p.device) if p.dim() == 1 else s.to(p.device).unsqueeze(1)
        block.copy_((block.float() / sv).to(p.dtype))


def _divide_norm(norm, s: torch.Tensor) -> None:
    w = norm.weight
    w.copy_((w.float() / s.to(w.device)).to(w.dtype))


@torch.no_grad()
def fold_layer_scales(layer, scales: dict[str, torch.Tensor]) -> None:
    """Apply AWQ scales to a ``LlamaDecoderLayer`` in place: each linear named in ``scales``
    ("qkv", "o", "gate_up", "down") has its input columns multiplied by its scales and the
    op before it divided (see the module docstring); the layer's float outputs are
    unchanged up to rounding. "o" needs ``o_proj_scalable``."""
    attn, mlp = layer.self_attn, layer.mlp
    if "qkv" in scales:
        _divide_norm(layer.input_layernorm, scales["qkv"])
        _scale_columns(attn.qkv_proj, scales["qkv"])
    if "o" in scales:
        if not o_proj_scalable(attn):
            raise ValueError("o_proj can't be AWQ-scaled with grouped-query attention")
        _divide_rows(attn.qkv_proj, attn.q_size + attn.kv_size, attn.kv_size, scales["o"])
        _scale_columns(attn.o_proj, scales["o"])
    if "gate_up" in scales:
        _divide_norm(layer.post_attention_layernorm, scales["gate_up"])
        _scale_columns(mlp.gate_up_proj, scales["gate_up"])
    if "down" in scales:
        inter = mlp.down_proj.in_features
        _divide_rows(mlp.gate_up_proj, inter, inter, scales["down"])
        _scale_columns(mlp.down_proj, scales["down"])
