"""Variable-length paged prefill attention vs a float64 reference (CPU: interpreter, fp32)."""

from __future__ import annotations

import pytest
import torch

from hearth_kernels.paged_prefill import paged_prefill_attention
from tests.kernels.reference import DEVICE, make_paged_cache, reference_attention


def run_case(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, *, window=None,
             dtype=torch.float32, seed=0, q_scale=2.0, max_query_len=None, **kw):
    """seq_lens[i]: context after this step; query_lens[i]: this step's new tokens of it."""
    cache, tables = make_paged_cache(seq_lens, kv_heads, head_dim, block_size, dtype=dtype, seed=seed)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    # Scaled-up queries make softmax peaked, so a wrongly masked key changes the output.
    q = (q_scale * torch.randn(starts[-1], heads, head_dim, generator=g, device=DEVICE)).to(dtype)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(
        q, cache, tables, torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), scale,
        max_query_len=max_query_len or max(query_lens), sliding_window=window, **kw)
    ref = reference_attention(q, cache, tables, starts, seq_lens, scale, window)
    return out, ref


def close(out, ref, tol=2e-5):
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


# Whole prompts at block boundaries (15, 16, 17), a 1-token prompt, and a longer one.
PROMPTS = ([1, 15, 16, 17, 45], [1, 15, 16, 17, 45])
# Chunked prefill over a cached prefix, mixed with decode rows (1 new token each).
MIXED = ([40, 20, 33, 9, 1], [7, 1, 33, 1, 1])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1), (6, 2)],
                         ids=["mha", "gqa2", "gqa4", "mqa", "gqa3"])
def test_group_sizes(heads, kv_heads):
    close(*run_case(*MIXED, heads, kv_heads, 32, 16, block_m=16, block_n=16))


@pytest.mark.parametrize("head_dim", [32, 64, 48], ids=["d32", "d64", "d48-padded"])
@pytest.mark.parametrize("block_size", [16, 8])
def test_head_dims_and_block_sizes(head_dim, block_size):
    close(*run_case(*PROMPTS, 4, 2, head_dim, block_size))


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32), (64, 32)])
def test_tile_edges(block_m, block_n):
    # Small tiles put causal diagonals, tile-straddling prefixes and partial tiles everywhere.
    close(*run_case([60, 37, 18, 5], [29, 37, 2, 5], 4, 2, 32, 8, block_m=block_m, block_n=block_n))


@pytest.mark.parametrize("window", [1, 4, 16, 21])
@pytest.mark.parametrize("tiles", [dict(block_m=16, block_n=16), dict()], ids=["small-tiles", "default"])
def test_sliding_window(window, tiles):
    close(*run_case([70, 40, 20, 9], [30, 1, 20, 4], 4, 1, 32, 8, window=window, **tiles))


def test_mixed_batch_default_tiles_and_short_tile_height():
    close(*run_case(*MIXED, 8, 2, 32, 16))
    # max_query_len only picks the tile height: an underestimate stays correct.
    close(*run_case(*MIXED, 8, 2, 32, 16, max_query_len=2))


def test_fp16():
    out, ref = run_case(*MIXED, 4, 2, 32, 16, dtype=torch.float16, block_m=16, block_n=16)
    assert out.dtype == torch.float16
    close(out, ref, tol=2e-3)


def test_strided_q_and_out_buffer():
    seq_lens, qlens = [12, 5], [4, 5]
    cache, tables = make_paged_cache(seq_lens, 2, 32, 8)
    fused = torch.randn(9, 3 * 4 * 32, device=DEVICE)  # one fused qkv row per token
    q = fused[:, : 4 * 32].view(9, 4, 32)
    out = torch.full((9, 4, 32), float("nan"), device=DEVICE)
    got = paged_prefill_attention(q, cache, tables, torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE),
                                  torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), 0.2,
                                  max_query_len=5, out=out)
    assert got is out
    close(out, reference_attention(q, cache, tables, [0, 4, 9], seq_lens, 0.2))


def test_bad_arguments_are_clear_errors():
    cache, tables = make_paged_cache([5], 2, 32, 8)
    lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    qs = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    q = torch.randn(5, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="H % KVH"):
        paged_prefill_attention(torch.randn(5, 3, 32, device=DEVICE), cache, tables, qs, lens, 1.0,
                                max_query_len=5)
    with pytest.raises(ValueError, match="query_start"):
        paged_prefill_attention(q, cache, tables, qs[:1], lens, 1.0, max_query_len=5)
    with pytest.raises(ValueError, match="block_tables"):
        paged_prefill_attention(q, cache, tables.long(), qs, lens, 1.0, max_query_len=5)
    with pytest.raises(ValueError, match="block_m"):
        paged_prefill_attention(q, cache, tables, qs, lens, 1.0, max_query_len=5, block_m=24)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_prefill_attention(q, cache, tables, qs, lens, 1.0, max_query_len=0)


# -- GPU, real shapes (Llama-3-8B attention: 32 q heads, 8 kv heads, d=128) ---------------

GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("seq_lens,query_lens", [
    ([1], [1]), ([16], [16]), ([17], [17]), ([1000], [1000]), ([2048], [2048]),
    ([8192], [8192]),
    ([8192, 1000, 17, 16, 1, 4000, 300, 2048], [512, 1000, 1, 1, 1, 1, 300, 48]),  # chunked + decodes
], ids=["1", "16", "17", "1000", "2048", "8192", "batch8-mixed"])
def test_gpu_llama8b_shapes(dtype, seq_lens, query_lens):
    out, ref = run_case(seq_lens, query_lens, 32, 8, 128, 16, dtype=dtype, q_scale=1.0)
    tol = GPU_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    assert (out.double() - ref).abs().mean() < tol / 8


@pytest.mark.gpu
def test_gpu_sliding_window_long():
    out, ref = run_case([8192, 3000], [2048, 3000], 32, 8, 128, 16, window=4096,
                        dtype=torch.bfloat16, q_scale=1.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
