"""Rotary position embedding (RoPE), with Llama-3 and linear frequency scaling.

Uses the "rotate half" layout of Hugging Face checkpoints: for a head vector split into
halves (x1, x2), rope(x) = (x1*cos - x2*sin, x2*cos + x1*sin) with angle pos * inv_freq_i,
inv_freq_i = theta^(-2i/d) (Su et al., 2021, RoFormer). Llama 3 rescales the low
frequencies by ``factor`` and blends smoothly between ``low_freq_factor`` and
``high_freq_factor`` wavelengths (Meta's Llama 3.1 release).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.errors import UnsupportedModelError
from engine.layers.rope_spec import RopeSpec


def inv_frequencies(rope: RopeSpec, rot_dim: int) -> torch.Tensor:
    inv = 1.0 / (rope.theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if rope.type == "linear":
        inv = inv / rope.factor
    elif rope.type == "llama3":
        old = rope.original_max_position
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    elif rope.type != "default":
        raise UnsupportedModelError(f"rope type {rope.type!r} is not supported natively")
    return inv


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (static shapes, no recompute)."""

    def __init__(self, head_dim: int, rope: RopeSpec, max_positions: int) -> None:
        super().__init__()
        if rope.partial_rotary_factor != 1.0:
            raise UnsupportedModelError("partial rotary embeddings are not supported natively")
        self.head_dim = head_dim
        self.rope = rope
        self.max_positions = max_positions
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        inv = inv_frequencies(self.rope, self.head_dim).to(device)
        pos = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv[None, :]  # fp32, one multiply per element like the reference
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    #: rotates q and k in place with Triton (then an attention backend that ``rotates`` may do
    #: it instead, in its cache write, from the same tables)
    in_place = False

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hkv, D]; positions: [T] int64. Returns the rotated (q, k)."""
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        return _apply(q, cos, sin), _apply(k, cos, sin)

    def choose_kernels(self, plan) -> nn.Module:
        """This embedding as the kernel plan runs it: itself, or the in-place Triton one
        on the same tables (build them first)."""
        return TritonRotaryEmbedding(self) if plan.fused else self


class TritonRotaryEmbedding(RotaryEmbedding):
    """Rotates q and k in place with ``hearth_kernels/rotary.py`` (they are views of this step's
    fresh qkv projection), reading the same cos/sin tables."""

    in_place = True

    def __init__(self, rotary: RotaryEmbedding) -> None:
        nn.Module.__init__(self)
        from hearth_kernels.rotary import apply_rotary

        self.head_dim, self.rope, self.max_positions = rotary.head_dim, rotary.rope, rotary.max_positions
        self.cos, self.sin = rotary.cos, rotary.sin
        self._apply_rotary = apply_rotary

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self._apply_rotary(q, k, positions, self.cos, self.sin)

    def choose_kernels(self, plan) -> nn.Module:
        return self


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
