"""Decode attention that rotates and writes this step's token itself (``paged_decode_attention``'s
``rope``): the same bits, in the output and in the whole cache, as the two kernels it replaces
(``apply_rotary_and_write_kv``, then the decode kernel), which are themselves checked against
float64 references in test_rotary.py and test_paged_decode.py. Split and unsplit, GQA, a
sliding window, padding rows (seq_len 0, slot -1), bf16/fp16/fp32 and an e4m3 cache (V read
as pairs). CPU: Triton's interpreter at small shapes; GPU: the 8B shape, and in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from hearth_kernels.paged_decode import paged_decode_attention, rope_fusable
from hearth_kernels.rotary import apply_rotary_and_write_kv
from tests.kernels.reference import DEVICE, make_paged_cache


def rope_tables(head_dim: int, max_pos: int, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def both_ways(seq_lens, heads, kv_heads, head_dim, block_size, dtype, *, cache_dtype=None, **kw):
    """(output, cache) of the two kernels, then of the fused one, from the same inputs."""
    cache, tables = make_paged_cache(seq_lens, kv_heads, head_dim, block_size, dtype=dtype, seed=3)
    if cache_dtype is not None:
        cache = cache.to(cache_dtype)
    g = torch.Generator(device=DEVICE).manual_seed(4)
    b = len(seq_lens)
    q = (2 * torch.randn(b, heads, head_dim, generator=g, device=DEVICE)).to(dtype)
    k = torch.randn(b, kv_heads, head_dim, generator=g, device=DEVICE).to(dtype)
    v = torch.randn(b, kv_heads, head_dim, generator=g, device=DEVICE).to(dtype)
    cos, sin = rope_tables(head_dim, max(seq_lens) + 1, dtype)
    pos = torch.tensor([max(n - 1, 0) for n in seq_lens], dtype=torch.int64, device=DEVICE)
    tab = tables.cpu()
    slots = torch.tensor([-1 if n == 0 else int(tab[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for i, n in enumerate(seq_lens)], dtype=torch.int64, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    args = dict(sliding_window=kw.pop("window", None), max_seq_len=kw.pop("bound", max(seq_lens)), **kw)
    two_cache, q2, k2 = cache.clone(), q.clone(), k.clone()
    apply_rotary_and_write_kv(q2, k2, v, pos, cos, sin, two_cache, slots)
    two = paged_decode_attention(q2, two_cache, tables, lens, head_dim ** -0.5, **args)
    one_cache, q1, k1 = cache.clone(), q.clone(), k.clone()
    one = paged_decode_attention(q1, one_cache, tables, lens, head_dim ** -0.5,
                                 rope=(k1, v, pos, cos, sin, slots), **args)
    assert torch.equal(q1, q) and torch.equal(k1, k)  # left as they came
    return two, two_cache, one, one_cache


def assert_same_bits(two, two_cache, one, one_cache):
    assert torch.equal(two, one), (two.double() - one.double()).abs().max()
    # bytes, so the cache's NaN poison compares too
    assert torch.equal(two_cache.view(torch.uint8), one_cache.view(torch.uint8))


LENS = [1, 15, 16, 17, 40, 0]  # a padding row last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("splits", [1, 3], ids=["unsplit", "split3"])
def test_same_bits_as_rotary_then_decode(dtype, splits):
    assert_same_bits(*both_ways(LENS, 8, 2, 32, 8, dtype, num_splits=splits, block_n=16))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (4, 1, 64), (6, 2, 16)], ids=["mha", "mqa-d64", "gqa3-d16"])
def test_groups_and_head_sizes(heads, kv_heads, head_dim):
    assert_same_bits(*both_ways([3, 33, 0, 9], heads, kv_heads, head_dim, 16, torch.bfloat16, num_splits=2, block_n=16))


def test_sliding_window_and_a_bound_above_the_lengths():
    assert_same_bits(*both_ways(LENS, 4, 2, 32, 8, torch.float16, window=7, bound=96, num_splits=4, block_n=16))


def test_an_fp8_cache():
    assert_same_bits(*both_ways(LENS, 8, 2, 32, 8, torch.bfloat16, cache_dtype=torch.float8_e4m3fn,
                                num_splits=2, block_n=16))


def test_who_can_and_bad_arguments(monkeypatch):
    assert rope_fusable(128) and rope_fusable(64) and not rope_fusable(96) and not rope_fusable(80)
    monkeypatch.setenv("HEARTH_DECODE_ROPE", "0")
    assert not rope_fusable(128)
    cache, tables = make_paged_cache([5], 2, 32, 8)
    lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    q, k = torch.randn(1, 4, 32, device=DEVICE), torch.randn(1, 2, 32, device=DEVICE)
    cos, sin = rope_tables(32, 8, torch.float32)
    pos, slots = torch.tensor([4], device=DEVICE), torch.tensor([4], device=DEVICE)
    with pytest.raises(ValueError, match="rope's k and v"):
        paged_decode_attention(q, cache, tables, lens, 1.0, max_seq_len=5, rope=(k[:, :1], k, pos, cos, sin, slots))
    with pytest.raises(ValueError, match="positions"):
        paged_decode_attention(q, cache, tables, lens, 1.0, max_seq_len=5, rope=(k, k, pos.float(), cos, sin, slots))
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_decode_attention(q, cache, tables, lens, 1.0, max_seq_len=5, rope=(k, k, pos, cos, sin, slots[:0]))


# -- GPU: the 8B shape (32 q heads, 8 kv heads, d=128) -------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["bf16-cache", "fp8-cache"])
@pytest.mark.parametrize("seq_lens", [[1], [17], [1000], [1, 16, 17, 1000, 4097, 300, 0, 64]],
                         ids=["1", "17", "1000", "batch8"])
def test_gpu_llama8b(cache_dtype, seq_lens):
    assert_same_bits(*both_ways(seq_lens, 32, 8, 128, 16, torch.bfloat16, cache_dtype=cache_dtype, bound=8192))


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_writes_and_attends():
    """Captured once, replayed for two steps of lengths that changed on the device: each
    replay writes its token and attends to it, as the two kernels do eagerly."""
    seq_lens, block = [900, 40], 16
    cache, tables = make_paged_cache([n + 2 for n in seq_lens], 8, 128, block, dtype=torch.bfloat16, seed=5)
    ref_cache = cache.clone()
    cos, sin = rope_tables(128, 1024, torch.bfloat16)
    q = torch.empty(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.empty(2, 8, 128, device="cuda", dtype=torch.bfloat16), torch.empty(2, 8, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.empty(2, dtype=torch.int32, device="cuda")
    pos, slots = torch.empty(2, dtype=torch.int64, device="cuda"), torch.empty(2, dtype=torch.int64, device="cuda")
    out = torch.empty_like(q)
    tab = tables.cpu()

    def step_inputs(n):
        g = torch.Generator(device="cuda").manual_seed(n[0])
        q.copy_(torch.randn(q.shape, generator=g, device="cuda"))
        k.copy_(torch.randn(k.shape, generator=g, device="cuda"))
        v.copy_(torch.randn(v.shape, generator=g, device="cuda"))
        lens.copy_(torch.tensor(n))
        pos.copy_(torch.tensor([x - 1 for x in n]))
        slots.copy_(torch.tensor([int(tab[i, (x - 1) // block]) * block + (x - 1) % block for i, x in enumerate(n)]))

    def fused():
        paged_decode_attention(q, cache, tables, lens, 0.088, max_seq_len=4096, out=out,
                               rope=(k, v, pos, cos, sin, slots))

    step_inputs([n + 1 for n in seq_lens])
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fused()  # compile, off the capture
    torch.cuda.current_stream().wait_stream(s)
    cache.copy_(ref_cache)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused()
    for step in (1, 2):
        n = [x + step for x in seq_lens]
        step_inputs(n)
        graph.replay()
        q2, k2 = q.clone(), k.clone()
        apply_rotary_and_write_kv(q2, k2, v, pos, cos, sin, ref_cache, slots)
        ref = paged_decode_attention(q2, ref_cache, tables, lens, 0.088, max_seq_len=4096)
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
