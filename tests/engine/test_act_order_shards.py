"""A fused projection (q/k/v) of an act-order GPTQ checkpoint: its shards share one input,
so one act-order permutation, whichever shard's tensors arrive first (safetensors stores
k_proj before q_proj); shards whose permutations differ are refused naming both."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from engine.layers.quant_linear import QuantizedLinear
from engine.quant.qweight import QuantizedWeight
from engine.quant.rtn import quantize_int4
from engine.quant.sources import QuantSource

K, G = 64, 32
SHARDS = {"q": (0, 16), "k": (16, 8), "v": (24, 8)}


@dataclass(frozen=True, slots=True)
class WithPerm(QuantSource):
    """Canonical int4 tensors plus the act-order permutation as a part."""

    parts: tuple[str, ...] = ("weight", "perm")

    def to_weight(self, parts, out_features, in_features):
        qw = quantize_int4(parts["weight"], G)
        return QuantizedWeight(qw.bits, qw.group_size, qw.qweight, qw.scales, qw.mins, parts["perm"])


def _layer():
    with torch.device("meta"):
        layer = QuantizedLinear(K, 32, WithPerm(4, G, act_order=True), shard_offsets=SHARDS, dtype=torch.float32)
    layer.to_empty(device="cpu")
    return layer


@pytest.mark.parametrize("order", [("q", "k", "v"), ("k", "q", "v"), ("v", "k", "q")])
def test_the_shards_share_one_permutation_in_any_order(order):
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    weights = {s: torch.randn(rows, K) for s, (_, rows) in SHARDS.items()}
    layer = _layer()
    for shard in order:
        layer.load_part("weight", weights[shard], shard)
        layer.load_part("perm", perm, shard)
    assert not layer._pending and torch.equal(layer.perm, perm)
    x = torch.randn(3, K)
    stored = torch.cat([quantize_int4(weights[s], G).dequantize() for s in SHARDS])  # columns in perm's order
    torch.testing.assert_close(layer(x), x[:, perm] @ stored.T, rtol=1e-4, atol=1e-4)


def test_shards_with_different_permutations_are_refused_naming_them():
    layer = _layer()
    layer.load_part("weight", torch.randn(8, K), "k")
    layer.load_part("perm", torch.randperm(K), "k")
    layer.load_part("weight", torch.randn(16, K), "q")
    with pytest.raises(ValueError, match=r"shard 'q''s differs from shard 'k''s"):
        layer.load_part("perm", torch.arange(K), "q")
