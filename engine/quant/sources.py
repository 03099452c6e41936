"""Where a quantized layer's weight comes from: one ``QuantSource`` per checkpoint form.

A quantized linear module (``engine.layers.quant_linear``) receives, through the
per-parameter loading of ``engine.layers.weight_loader``, the checkpoint tensors of each of
its shards (``q_proj.weight``; or ``q_proj.qweight``, ``q_proj.scales``, ...). Its source
says which tensors (``parts``) make one shard's weight and turns them into Hearth's
canonical ``QuantizedWeight``:

- ``RoundToNearest``: a float checkpoint, quantized as each tensor streams in (``int8``,
  ``int4``, ``fp8``): the full-precision model never exists whole anywhere.
- ``Canonical``: tensors already in Hearth's layout (``qweight``, ``scales``, ``mins``):
  a GGUF file's Q4_0/Q4_1/Q8_0 blocks repacked without loss (``engine.loader.gguf``).
- AWQ, GPTQ, compressed-tensors and fp8 checkpoints (``engine.quant.formats``) plug in the
  same way.

Sources are plain data (no reference to a module), so a model's modules can hold them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quant.qweight import QuantizedWeight
from engine.quant.rtn import quantize_fp8, quantize_int4, quantize_int8


@dataclass(frozen=True, slots=True)
class QuantSource:
    """``bits`` and ``group_size`` of the weights it yields; ``parts``: the checkpoint
    tensor names (per shard) that must all arrive; ``optional``: ones that may."""

    bits: int
    group_size: int
    parts: tuple[str, ...]
    optional: tuple[str, ...] = ()
    has_mins: bool = True
    label: str = ""
    act_order: bool = False  # the weights may come with an act-order input permutation
    fmt: str = "int"  # the QuantizedWeight's: "int" codes, or "e4m3" float8 weights (fp8)

    def to_weight(self, parts: dict[str, torch.Tensor], out_features: int, in_features: int) -> QuantizedWeight:
        raise NotImplementedError

    def group_for(self, in_features: int) -> int:
        """The group size of a layer with ``in_features`` inputs (0 means per channel)."""
        return self.group_size or in_features


@dataclass(frozen=True, slots=True)
class RoundToNearest(QuantSource):
    """A float checkpoint's ``weight``, quantized by round-to-nearest as it loads."""

    parts: tuple[str, ...] = ("weight",)

    def to_weight(self, parts, out_features, in_features):
        w = parts["weight"]
        if self.fmt == "e4m3":
            return quantize_fp8(w)
        if self.bits == 8:
            return quantize_int8(w, self.group_size or None)
        return quantize_int4(w, self.group_for(in_features))


@dataclass(frozen=True, slots=True)
class Canonical(QuantSource):
    """Tensors already in Hearth's layout (``engine.quant.qweight``)."""

    parts: tuple[str, ...] = ("qweight", "scales")
    optional: tuple[str, ...] = ("mins",)

    def to_weight(self, parts, out_features, in_features):
        return QuantizedWeight(self.bits, self.group_for(in_features), parts["qweight"], parts["scales"],
                               parts.get("mins"))


def rtn(method: str, group_size: int | None = None) -> RoundToNearest:
    """The round-to-nearest source of ``int8`` (per channel), ``int4`` (``group_size``) or
    ``fp8`` (e4m3 per channel)."""
    if method == "fp8":
        return RoundToNearest(8, 0, has_mins=False, fmt="e4m3", label="fp8 e4m3")
    if method == "int8":
        return RoundToNearest(8, 0, has_mins=False, label="int8")
    return RoundToNearest(4, group_size or 128, label=f"int4 g{group_size or 128}")


@dataclass(frozen=True, slots=True)
class Published(QuantSource):
    """A pre-quantized checkpoint's own tensors (AWQ, GPTQ, compressed-tensors:
    ``engine.quant.formats``), converted to the canonical layout without dequantizing."""

    checkpoint: object = None  # the CheckpointQuant

    def to_weight(self, parts, out_features, in_features):
        from engine.quant.formats import read_checkpoint_weight

        return read_checkpoint_weight(parts, self.checkpoint, shape=(out_features, in_features))


def published(q) -> Published:
    """The source of a checkpoint quantized as ``q`` (a ``CheckpointQuant``)."""
    if q.method == "fp8":
        return Published(8, 0, tuple(q.tensor_names), tuple(q.optional_tensor_names), has_mins=False,
                         label=f"fp8 e4m3 ({q.checkpoint_format})", fmt="e4m3", checkpoint=q)
    return Published(q.bits, q.group_size or 0, tuple(q.tensor_names), tuple(q.optional_tensor_names),
                     has_mins=q.bits == 4 or not q.sym,
                     label=f"{q.method} {q.bits}-bit g{q.group_size or 'channel'}",
                     act_order=bool(q.desc_act), checkpoint=q)
