"""float8 checkpoints: compressed-tensors ``float-quantized`` (llm-compressor's FP8 and
FP8_DYNAMIC schemes, what ``hearth quantize --quant fp8`` writes) and ``quant_method:
"fp8"`` (vLLM's and AutoFP8's), both with e4m3 weights and one scale per tensor or per
output channel.

For a linear layer with N outputs and K inputs:

- ``weight``: float8 e4m3 [N, K], nn.Linear's layout;
- ``weight_scale``: per tensor (``[]`` or ``[1]``) or per output channel (``[N, 1]`` or
  ``[N]``), float32, bf16 or fp16: ``w = float(weight) * weight_scale``;
- ``input_scale`` (a static activation scheme): one scale for every token's input. Hearth
  reads and ignores it: its kernels scale each token's activations by their own maximum
  (dynamic per token), which rounds no worse than one scale calibrated for all tokens.

A per-tensor scale is repeated for each of the layer's rows: the canonical e4m3 weight
(``engine.quant.qweight``) keeps one float32 scale per row, which holds both exactly.
"""

from __future__ import annotations

import torch

from engine.errors import UnsupportedModelError
from engine.quant.qweight import QuantizedWeight


def read_fp8(tensors: dict[str, torch.Tensor], q, *, name: str = "",
             shape: tuple[int, int] | None = None) -> QuantizedWeight:
    """One layer's ``weight`` and ``weight_scale`` (names without the module prefix) ->
    an e4m3 ``QuantizedWeight``; ``shape`` (out, in), when given, must match."""
    what = name or "an fp8 layer"
    for key in ("weight", "weight_scale"):
        if key not in tensors:
            raise UnsupportedModelError(f"{what}: the checkpoint has no {key} tensor for it")
    w, scale = tensors["weight"], tensors["weight_scale"]
    if w.dtype != torch.float8_e4m3fn:
        raise UnsupportedModelError(
            f"{what}: its weight is {w.dtype}, expected float8 e4m3 (F8_E4M3); e5m2 and other fp8 "
            "encodings are not supported")
    if w.dim() != 2:
        raise UnsupportedModelError(f"{what}: its weight has shape {tuple(w.shape)}, expected [out, in]")
    n, k = w.shape
    if shape is not None and (n, k) != tuple(shape):
        raise UnsupportedModelError(f"{what}: the checkpoint's weight is [{n}, {k}] (out, in), the model expects "
                                    f"{list(shape)}")
    if scale.numel() == 1:
        s = scale.reshape(1, 1).float().expand(n, 1)
    elif scale.numel() == n and (scale.dim() == 1 or tuple(scale.shape) == (n, 1)):
        s = scale.reshape(n, 1).float()
    else:
        raise UnsupportedModelError(
            f"{what}: weight_scale has shape {tuple(scale.shape)}; Hearth reads one scale per tensor or per "
            f"output channel ([{n}, 1]), not per block")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise UnsupportedModelError(f"{what}: weight_scale holds a value that is not a positive finite number")
    return QuantizedWeight(8, k, w.contiguous(), s.contiguous(), fmt="e4m3")


def write_fp8(qw: QuantizedWeight, *, name: str = "") -> dict[str, torch.Tensor]:
    """An e4m3 ``QuantizedWeight`` -> ``weight`` and ``weight_scale`` [N, 1] float32
    (compressed-tensors ``float-quantized``, channel strategy)."""
    if qw.fmt != "e4m3":
        raise ValueError(f"{name or 'this weight'}: an fp8 checkpoint holds e4m3 weights, this one is {qw.fmt}")
    return {"weight": qw.qweight.contiguous(),
            "weight_scale": qw.scales.float().reshape(qw.out_features, 1).contiguous()}
