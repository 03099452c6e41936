"""Split-K paged decode attention vs a float64 reference (CPU: Triton interpreter, fp32)."""

from __future__ import annotations

import pytest
import torch

from hearth_kernels.paged_decode import paged_decode_attention
from tests.kernels.reference import DEVICE, make_paged_cache, reference_attention


def run_case(seq_lens, heads, kv_heads, head_dim, block_size, *, window=None, dtype=torch.float32,
             bound=None, seed=0, q_scale=2.0, **kw):
    cache, tables = make_paged_cache(seq_lens, kv_heads, head_dim, block_size, dtype=dtype, seed=seed)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    # Scaled-up queries make softmax peaked, so a wrongly masked key changes the output.
    q = (q_scale * torch.randn(len(seq_lens), heads, head_dim, generator=g, device=DEVICE)).to(dtype)
    scale = head_dim ** -0.5
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, cache, tables, lens, scale, sliding_window=window,
                                 max_seq_len=bound or max(seq_lens), **kw)
    ref = reference_attention(q, cache, tables, list(range(len(seq_lens) + 1)), seq_lens, scale, window)
    return out, ref


LENS = [1, 15, 16, 17, 40]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1), (6, 2)],
                         ids=["mha", "gqa2", "gqa4", "mqa", "gqa3"])
def test_group_sizes(heads, kv_heads):
    out, ref = run_case(LENS, heads, kv_heads, 32, 16, num_splits=3, block_n=16)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("head_dim", [32, 64, 48], ids=["d32", "d64", "d48-padded"])
@pytest.mark.parametrize("block_size", [16, 8])
def test_head_dims_and_block_sizes(head_dim, block_size):
    out, ref = run_case(LENS, 4, 2, head_dim, block_size)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("splits,block_n", [(2, 16), (3, 16), (8, 16), (2, 32)])
def test_split_and_merge(splits, block_n):
    # 40 tokens in 3 splits of 16-key tiles: slices of 16, the last one partial; with 2
    # splits, slices of two tiles; with 8, five splits have nothing to do (they must exit
    # and be ignored by the merge), as do the later splits of the short sequences.
    out, ref = run_case(LENS, 8, 2, 32, 8, num_splits=splits, block_n=block_n)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("seq_lens,bound", [([300], 300), ([300, 5, 130], 1000)])
def test_default_split_choice(seq_lens, bound):
    # No overrides: the launcher picks the split from B, the heads and the static bound.
    out, ref = run_case(seq_lens, 4, 2, 32, 16, bound=bound)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [1, 5, 16, 17])
def test_sliding_window(window):
    # Only the window is sliced: splits start at the tile holding the first visible key.
    out, ref = run_case(LENS + [70], 4, 1, 32, 8, window=window, num_splits=3, block_n=16)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window,splits", [(None, 1), (None, 3), (17, 2)])
def test_block_numbers_read_a_tile_ahead_give_the_same_bits(monkeypatch, window, splits):
    """TABLE_AHEAD loads each tile's block numbers in the iteration before;
    the outputs are the ones the in-iteration load gives, bit for bit, across splits,
    a window and padding rows (seq_len 0)."""
    outs = []
    for ahead in ("1", "0"):
        monkeypatch.setenv("HEARTH_DECODE_TABLE_AHEAD", ahead)
        out, ref = run_case(LENS + [0], 4, 2, 32, 8, window=window, num_splits=splits, block_n=16)
        torch.testing.assert_close(out[:-1].double(), ref[:-1], atol=2e-5, rtol=2e-5)
        assert not out[-1].any()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_static_bound_above_lengths_and_padding_rows():
    # A CUDA-graph style call: a bound well above the lengths; batch rows with seq_len 0
    # (padding) must come out as zeros, not NaN, split or not.
    out, ref = run_case([0, 3, 33, 0], 4, 2, 32, 16, bound=96, num_splits=4, block_n=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    out, ref = run_case([0, 5], 4, 2, 32, 16, bound=64)  # unsplit path
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_fp16():
    out, ref = run_case(LENS, 4, 2, 32, 16, dtype=torch.float16, num_splits=3, block_n=16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


def test_strided_q_and_out_buffer():
    seq_lens = [7, 20]
    cache, tables = make_paged_cache(seq_lens, 2, 32, 8)
    fused = torch.randn(2, 3 * 4 * 32, device=DEVICE)  # a fused qkv row per token
    q = fused[:, : 4 * 32].view(2, 4, 32)
    out = torch.full((2, 4, 32), float("nan"), device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = paged_decode_attention(q, cache, tables, lens, 0.2, max_seq_len=20, out=out,
                                 num_splits=2, block_n=16)
    assert got is out
    ref = reference_attention(q, cache, tables, [0, 1, 2], seq_lens, 0.2)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_bad_arguments_are_clear_errors():
    cache, tables = make_paged_cache([5], 2, 32, 8)
    lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="H % KVH"):
        paged_decode_attention(torch.randn(1, 3, 32, device=DEVICE), cache, tables, lens, 1.0, max_seq_len=5)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.randn(1, 4, 16, device=DEVICE), cache, tables, lens, 1.0, max_seq_len=5)
    with pytest.raises(ValueError, match="float16"):
        paged_decode_attention(q.half(), cache, tables, lens, 1.0, max_seq_len=5)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, cache, tables.long(), lens, 1.0, max_seq_len=5)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, cache, tables, lens.long(), 1.0, max_seq_len=5)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, cache, tables, lens, 1.0, max_seq_len=5, num_splits=0)
    with pytest.raises(ValueError, match="block_n"):
        paged_decode_attention(q, cache, tables, lens, 1.0, max_seq_len=5, block_n=24)


# -- GPU, real shapes (Llama-3-8B attention: 32 q heads, 8 kv heads, d=128) ---------------

GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}

# each GPU case with the block numbers loaded in their tile's iteration and a tile ahead
AHEAD = pytest.mark.parametrize("ahead", ["0", "1"], ids=["table-in-step", "table-ahead"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("seq_lens", [[1], [16], [17], [1000], [8192],
                                      [1, 16, 17, 1000, 8192, 300, 4097, 64]],
                         ids=["1", "16", "17", "1000", "8192", "batch8"])
@AHEAD
def test_gpu_llama8b_shapes(dtype, seq_lens, ahead, monkeypatch):
    monkeypatch.setenv("HEARTH_DECODE_TABLE_AHEAD", ahead)
    out, ref = run_case(seq_lens, 32, 8, 128, 16, dtype=dtype, q_scale=1.0)
    tol = GPU_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    assert (out.double() - ref).abs().mean() < tol / 8


@pytest.mark.gpu
@pytest.mark.parametrize("window", [4096, 1000])
@AHEAD
def test_gpu_sliding_window_long(window, ahead, monkeypatch):
    monkeypatch.setenv("HEARTH_DECODE_TABLE_AHEAD", ahead)
    out, ref = run_case([8192, 5000, 700], 32, 8, 128, 16, window=window, dtype=torch.bfloat16, q_scale=1.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@AHEAD
def test_gpu_cuda_graph_capture_and_replay(ahead, monkeypatch):
    # Captured at a static bound, replayed after the lengths (device data) changed.
    monkeypatch.setenv("HEARTH_DECODE_TABLE_AHEAD", ahead)
    cache, tables = make_paged_cache([3000, 2000], 8, 128, 16, dtype=torch.bfloat16)
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([1000, 10], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    paged_decode_attention(q, cache, tables, lens, 0.088, max_seq_len=4096, out=out)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, cache, tables, lens, 0.088, max_seq_len=4096, out=out)
    for new in ([3000, 2000], [17, 1999], [1, 1]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_attention(q, cache, tables, [0, 1, 2], new, 0.088)
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
