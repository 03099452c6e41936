"""KV-cache scatter vs plain indexing; negative slots (graph padding) must write nothing."""

from __future__ import annotations

import pytest
import torch

from hearth_kernels.kv_cache import write_kv_cache
from tests.kernels.reference import DEVICE


def reference_write(k, v, cache, slots):
    _, nb, bs, h, d = cache.shape
    flat = cache.view(2, nb * bs, h, d)
    keep = slots >= 0
    flat[0, slots[keep]] = k[keep].to(cache.dtype)
    flat[1, slots[keep]] = v[keep].to(cache.dtype)


@pytest.mark.parametrize("kv_heads,head_dim,block_size", [(2, 32, 16), (1, 64, 8), (3, 48, 8)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_matches_indexing_and_skips_padding(kv_heads, head_dim, block_size, slot_dtype):
    g = torch.Generator().manual_seed(0)
    num_blocks, t = 6, 11
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    expected = cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[[2, 7]] = -1  # padding rows of a CUDA-graph batch
    slots = slots.to(DEVICE, slot_dtype)
    # k, v as strided slices of a fused qkv output, the way the model produces them
    qkv = torch.randn(t, (4 + 2 * kv_heads) * head_dim, generator=g).to(DEVICE)
    k = qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    v = qkv[:, (4 + kv_heads) * head_dim:].view(t, kv_heads, head_dim)
    write_kv_cache(k, v, cache, slots)
    reference_write(k, v, expected, slots.long())
    assert torch.equal(cache, expected)


def test_casts_to_cache_dtype():
    cache = torch.zeros(2, 2, 8, 1, 32, dtype=torch.float16, device=DEVICE)
    k = torch.randn(3, 1, 32, device=DEVICE)
    v = torch.randn(3, 1, 32, device=DEVICE)
    slots = torch.tensor([0, 9, 15], device=DEVICE)
    write_kv_cache(k, v, cache, slots)
    flat = cache.view(2, 16, 1, 32)
    assert torch.equal(flat[0, slots], k.half()) and torch.equal(flat[1, slots], v.half())


def test_bad_arguments_are_clear_errors():
    cache = torch.zeros(2, 2, 8, 2, 32, device=DEVICE)
    k = torch.randn(3, 2, 32, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="kv_cache"):
        write_kv_cache(k[:, :1], k[:, :1], cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, k, cache, slots.float())
    with pytest.raises(ValueError, match="contiguous"):
        kt = torch.randn(3, 2, 64, device=DEVICE)[..., ::2]
        write_kv_cache(kt, kt, cache, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama8b_shapes(dtype):
    cache = torch.randn(2, 600, 16, 8, 128, device="cuda", dtype=dtype)
    expected = cache.clone()
    t = 8192
    slots = torch.randperm(600 * 16, device="cuda")[:t]
    slots[::97] = -1
    k = torch.randn(t, 8, 128, device="cuda", dtype=dtype)
    v = torch.randn(t, 8, 128, device="cuda", dtype=dtype)
    write_kv_cache(k, v, cache, slots)
    reference_write(k, v, expected, slots)
    assert torch.equal(cache, expected)
