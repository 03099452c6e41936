"""In-place rotary kernel vs engine.layers.rotary.RotaryEmbedding (the eager reference)."""

from __future__ import annotations

import pytest
import torch

from engine.layers.rope_spec import RopeSpec
from engine.layers.rotary import RotaryEmbedding
from hearth_kernels.rotary import apply_rotary
from tests.kernels.reference import DEVICE, ulp_distance


def rotary(head_dim, dtype, rope=None, max_pos=128):
    emb = RotaryEmbedding(head_dim, rope or RopeSpec(theta=10000.0), max_pos)
    emb.build(torch.device(DEVICE), dtype)
    return emb


def qk(tokens, heads, kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, heads, head_dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    return q, k


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (4, 1, 64), (6, 2, 48)])
def test_float32_matches_eager(heads, kv_heads, head_dim):
    emb = rotary(head_dim, torch.float32)
    q, k = qk(9, heads, kv_heads, head_dim, torch.float32)
    pos = torch.tensor([0, 1, 2, 17, 5, 127, 64, 3, 3], device=DEVICE)
    ref_q, ref_k = emb(pos, q, k)
    got_q, got_k = apply_rotary(q, k, pos, emb.cos, emb.sin)
    assert got_q is q and got_k is k  # in place
    torch.testing.assert_close(q, ref_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, ref_k, atol=1e-6, rtol=1e-6)


def test_float16_llama3_scaling_matches_eager_rounding():
    rope = RopeSpec(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position=64)
    emb = rotary(64, torch.float16, rope, max_pos=256)
    q, k = qk(7, 4, 2, 64, torch.float16, seed=1)
    pos = torch.tensor([0, 255, 100, 1, 64, 63, 9], device=DEVICE)
    ref_q, ref_k = emb(pos, q, k)
    apply_rotary(q, k, pos, emb.cos, emb.sin)
    if DEVICE == "cuda":  # a product may round an ulp of its operands apart there (test_gpu_llama8b_shapes)
        ulp = torch.finfo(torch.float16).eps * 4
        torch.testing.assert_close(q, ref_q, rtol=0, atol=2 * ulp)
        torch.testing.assert_close(k, ref_k, rtol=0, atol=2 * ulp)
    else:
        assert ulp_distance(q, ref_q) <= 1 and ulp_distance(k, ref_k) <= 1


def test_strided_views_of_fused_qkv():
    emb = rotary(32, torch.float32)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(5, (4 + 2 + 2) * 32, generator=g).to(DEVICE)
    q = qkv[:, : 4 * 32].view(5, 4, 32)
    k = qkv[:, 4 * 32: 6 * 32].view(5, 2, 32)
    v_before = qkv[:, 6 * 32:].clone()
    pos = torch.arange(5, device=DEVICE) * 7
    ref_q, ref_k = emb(pos, q.clone(), k.clone())
    apply_rotary(q, k, pos, emb.cos, emb.sin)
    torch.testing.assert_close(q, ref_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, ref_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv[:, 6 * 32:], v_before)


def test_bad_arguments_are_clear_errors():
    emb = rotary(32, torch.float32)
    q, k = qk(3, 4, 2, 32, torch.float32)
    pos = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(q, k, pos.float(), emb.cos, emb.sin)
    with pytest.raises(ValueError, match="cos"):
        apply_rotary(q, k, pos, emb.cos[:, :16], emb.sin)
    with pytest.raises(ValueError, match="k \\[T, KVH, D\\]"):
        apply_rotary(q, k[:2], pos, emb.cos, emb.sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2048])
def test_gpu_llama8b_shapes(dtype, tokens):
    rope = RopeSpec(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position=8192)
    emb = rotary(128, dtype, rope, max_pos=8192)
    q, k = qk(tokens, 32, 8, 128, dtype)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    ref_q, ref_k = emb(pos, q, k)
    apply_rotary(q, k, pos, emb.cos, emb.sin)
    # Eager rounds x*cos and rotate(x)*sin separately and the kernel does too, but on the
    # GPU a product may round differently by one ulp *of the operands*; where the two
    # products nearly cancel that is a large relative error of a tiny result, so bound the
    # absolute error by two ulps of the inputs' magnitude instead of ulps of the result.
    ulp = torch.finfo(dtype).eps * 4  # inputs are randn: |x| < 8, so 1 ulp <= eps * 4
    torch.testing.assert_close(q, ref_q, rtol=0, atol=2 * ulp)
    torch.testing.assert_close(k, ref_k, rtol=0, atol=2 * ulp)
