"""Readers and writers of the published pre-quantized checkpoint layouts (AWQ GEMM,
GPTQ v1/v2, compressed-tensors pack-quantized and float-quantized, vLLM's fp8), converting one linear layer's tensors
to and from Hearth's canonical ``QuantizedWeight``. Pure tensor functions: the loaders
decide which tensors belong to which layer.
"""

from __future__ import annotations

import torch

from engine.quant.formats.awq import read_awq, write_awq
from engine.quant.formats.compressed_tensors import read_compressed_tensors, write_compressed_tensors
from engine.quant.formats.config import (
    SUPPORTED_METHODS,
    CheckpointQuant,
    parse_quantization_config,
    quantization_config,
)
from engine.quant.formats.fp8 import read_fp8, write_fp8
from engine.quant.formats.gptq import read_gptq, write_gptq
from engine.quant.formats.packing import is_symmetric
from engine.quant.qweight import QuantizedWeight

__all__ = [
    "SUPPORTED_METHODS", "CheckpointQuant", "is_symmetric", "parse_quantization_config",
    "quantization_config", "read_awq", "read_checkpoint_weight", "read_compressed_tensors",
    "read_fp8", "read_gptq", "write_awq", "write_checkpoint_weight", "write_compressed_tensors", "write_fp8",
    "write_gptq",
]

_READERS = {"awq": read_awq, "gptq": read_gptq, "compressed-tensors": read_compressed_tensors, "fp8": read_fp8}


def read_checkpoint_weight(tensors: dict[str, torch.Tensor], q: CheckpointQuant, *, name: str = "",
                           shape: tuple[int, int] | None = None) -> QuantizedWeight:
    """One linear's checkpoint tensors (suffixes as in ``q.tensor_names``) -> ``QuantizedWeight``,
    by ``q.method``; ``name`` labels errors, ``shape`` (out, in) is checked when given."""
    return _READERS[q.method](tensors, q, name=name, shape=shape)


def write_checkpoint_weight(qw: QuantizedWeight, method: str, *, sym: bool | None = None,
                            name: str = "") -> dict[str, torch.Tensor]:
    """``qw`` -> one linear's tensors in ``method``'s layout (GPTQ: v1), suffixes without the
    module prefix. ``sym`` matters for compressed-tensors only (see ``write_compressed_tensors``)."""
    if method == "awq":
        return write_awq(qw, name=name)
    if method == "gptq":
        return write_gptq(qw, name=name)
    if method == "compressed-tensors":
        if qw.fmt == "e4m3":
            return write_fp8(qw, name=name)
        return write_compressed_tensors(qw, sym=sym, name=name)
    raise ValueError(f"unknown method {method!r} ({', '.join(SUPPORTED_METHODS)})")
