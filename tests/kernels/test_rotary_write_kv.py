"""RoPE and the KV-cache write in one kernel (``apply_rotary_and_write_kv``) against the two
kernels it replaces, run one after the other: the same bits in q, k and the cache."""

from __future__ import annotations

import pytest
import torch

from engine.layers.rope_spec import RopeSpec
from engine.layers.rotary import RotaryEmbedding
from hearth_kernels.kv_cache import write_kv_cache
from hearth_kernels.rotary import apply_rotary, apply_rotary_and_write_kv
from tests.kernels.reference import DEVICE


def _step(heads, kv_heads, head_dim, dtype, t, seed):
    """A fused qkv output of ``t`` tokens as the model splits it, positions, slots (two of
    them padding when there are three or more), the rotary tables and the cache's size
    (blocks, block size)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q = qkv[:, :heads * head_dim].view(t, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(t, kv_heads, head_dim)
    pos = torch.randint(0, 128, (t,), generator=g).to(DEVICE)
    emb = RotaryEmbedding(head_dim, RopeSpec(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position=64), 128)
    emb.build(torch.device(DEVICE), dtype)
    block_size = 8
    blocks = max(5, -(-t // block_size) + 1)
    slots = torch.randperm(blocks * block_size, generator=g)[:t]
    if t >= 3:
        slots[[1, t - 2]] = -1  # padding rows of a CUDA-graph batch
    return qkv, (q, k, v), pos, emb, slots.to(DEVICE), (blocks, block_size)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (6, 2, 48), (8, 1, 64)])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32), (torch.bfloat16, torch.float8_e4m3fn)])
def test_one_kernel_gives_the_bits_of_the_two(heads, kv_heads, head_dim, dtype, cache_dtype):
    qkv, _, pos, emb, slots, (blocks, block_size) = _step(heads, kv_heads, head_dim, dtype, 9, heads + head_dim)
    g = torch.Generator().manual_seed(1)
    cache = (torch.randn(2, blocks, block_size, kv_heads, head_dim, generator=g) * 50).to(DEVICE, cache_dtype)
    want_qkv, want_cache = qkv.clone(), cache.clone()
    q, k, v = _views(want_qkv, heads, kv_heads, head_dim)
    apply_rotary(q, k, pos, emb.cos, emb.sin)
    write_kv_cache(k, v, want_cache, slots)
    q, k, v = _views(qkv, heads, kv_heads, head_dim)
    apply_rotary_and_write_kv(q, k, v, pos, emb.cos, emb.sin, cache, slots.int())
    assert torch.equal(qkv.view(torch.uint8 if dtype != torch.float32 else torch.int32),
                       want_qkv.view(torch.uint8 if dtype != torch.float32 else torch.int32))
    assert torch.equal(cache.view(torch.uint8), want_cache.view(torch.uint8))


def test_separate_q_and_k_beside_a_view_of_v_and_other_index_dtypes():
    """As after Qwen3's per-head q/k norms: q and k new contiguous tensors, v still a view of
    the qkv output (three different strides); int32 positions with int64 slots."""
    qkv, (q, k, v), pos, emb, slots, (blocks, block_size) = _step(6, 2, 32, torch.bfloat16, 7, 5)
    q, k = q.contiguous() * 1.5, k.contiguous() * 0.5
    cache = torch.zeros(2, blocks, block_size, 2, 32, dtype=torch.bfloat16, device=DEVICE)
    want_q, want_k, want_cache = q.clone(), k.clone(), cache.clone()
    apply_rotary(want_q, want_k, pos, emb.cos, emb.sin)
    write_kv_cache(want_k, v, want_cache, slots)
    apply_rotary_and_write_kv(q, k, v, pos.int(), emb.cos, emb.sin, cache, slots.long())
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(cache, want_cache)


def _views(qkv, heads, kv_heads, head_dim):
    t = qkv.shape[0]
    return (qkv[:, :heads * head_dim].view(t, heads, head_dim),
            qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(t, kv_heads, head_dim),
            qkv[:, (heads + kv_heads) * head_dim:].view(t, kv_heads, head_dim))


def test_bad_arguments_are_clear_errors():
    _, (q, k, v), pos, emb, slots, (blocks, block_size) = _step(4, 2, 32, torch.float32, 5, 0)
    cache = torch.zeros(2, blocks, block_size, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping must be int32/int64 of shape"):
        apply_rotary_and_write_kv(q, k, v, pos, emb.cos, emb.sin, cache, slots[:3])
    with pytest.raises(ValueError, match="kv_cache must be"):
        apply_rotary_and_write_kv(q, k, v, pos, emb.cos, emb.sin, cache[:, :, :, :1], slots)
    with pytest.raises(ValueError, match="share a dtype"):
        apply_rotary_and_write_kv(q, k, v.half(), pos, emb.cos, emb.sin, cache, slots)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 64, 3000])
def test_gpu_llama8b_shapes(tokens):
    qkv, _, pos, emb, slots, (blocks, block_size) = _step(32, 8, 128, torch.bfloat16, tokens, 3)
    cache = torch.randn(2, blocks, block_size, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    want_qkv, want_cache = qkv.clone(), cache.clone()
    q, k, v = _views(want_qkv, 32, 8, 128)
    apply_rotary(q, k, pos, emb.cos, emb.sin)
    write_kv_cache(k, v, want_cache, slots)
    apply_rotary_and_write_kv(*_views(qkv, 32, 8, 128), pos, emb.cos, emb.sin, cache, slots)
    assert torch.equal(qkv, want_qkv) and torch.equal(cache, want_cache)
