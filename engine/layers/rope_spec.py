"""RopeSpec: the rotary embedding's settings, as plain data (no torch).

It belongs to the layer that uses it (``engine.layers.rotary``); the model spec reads it
from config.json (``engine.models.spec``). Layers never import models: model code builds
on layers, not the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass

# The frequency schemes RotaryEmbedding implements (``inv_frequencies``).
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """Base frequency and scaling of a model's rotary position embedding (config.json's
    ``rope_theta`` and ``rope_scaling`` / ``rope_parameters``)."""

    theta: float = 10000.0
    type: str = "default"  # default | llama3 | linear
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    partial_rotary_factor: float = 1.0
