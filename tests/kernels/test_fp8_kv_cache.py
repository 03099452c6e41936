"""An fp8 (e4m3) KV cache: the Triton write saturates and narrows exactly as the torch
reference does, and both attention kernels read the narrowed values exactly (checked
against the float64 reference over the same fp8 cache).

The write rounds by hand before its cast (the interpreter's own fp8 cast mis-rounds when
the rounding carries into the next power of two), so it is checked on CPU at every e4m3
rounding midpoint. bf16 queries over an fp8 cache compute in fp16, which the interpreter
emulates correctly (its bf16 dots are wrong); real shapes run on the GPU (``-m gpu``)."""

from __future__ import annotations

import pytest
import torch

from engine.layers.attention import write_kv
from hearth_kernels.kv_cache import write_kv_cache
from hearth_kernels.paged_decode import paged_decode_attention
from hearth_kernels.paged_prefill import paged_prefill_attention
from tests.kernels.reference import DEVICE, make_paged_cache, reference_attention

FP8 = torch.float8_e4m3fn


def _write_case(values, seed=0):
    g = torch.Generator().manual_seed(seed)
    t, kvh, d, bs, nb = 13, 2, 32, 8, 5
    k, v = values(t, kvh, d, g), values(t, kvh, d, g)
    k[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, -449.0])  # beyond e4m3's range
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[[3, 9]] = -1  # graph padding rows write nothing
    k, v, slots = k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE)
    a = torch.zeros(2, nb, bs, kvh, d, dtype=FP8, device=DEVICE)
    b = a.clone()
    write_kv_cache(k, v, a, slots)
    keep = (slots >= 0).nonzero().flatten()
    write_kv(k[keep], v[keep], b, slots[keep])
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    flat = a.view(2, nb * bs, kvh, d).float()
    assert torch.equal(flat[0, slots[keep]], k[keep].float().clamp(-448, 448).to(FP8).float())
    assert torch.equal(flat[1, slots[keep]], v[keep].float().clamp(-448, 448).to(FP8).float())
    assert flat[0, slots[0], 0, :4].tolist() == [448.0, -448.0, 448.0, -448.0]
    assert not flat.isnan().any()
    assert torch.count_nonzero(flat.view(2, -1, kvh * d).abs().sum(-1)) == 2 * (t - 2)


def test_write_saturates_and_matches_the_torch_write_byte_for_byte():
    _write_case(lambda t, kvh, d, g: 4 * torch.randn(t, kvh, d, generator=g))
    _write_case(lambda t, kvh, d, g: 0.05 * torch.randn(t, kvh, d, generator=g), seed=1)  # subnormals


def test_write_rounds_every_midpoint_to_nearest_even_like_torch():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    vals = codes[~codes.isnan()].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    up, down = torch.tensor(1e9), torch.tensor(-1e9)
    x = torch.cat([vals, mids, torch.nextafter(mids, up), torch.nextafter(mids, down),
                   torch.tensor([460.0, 464.0, 470.0, -465.0, 1e30, -1e30, -1e-30])])
    x = x.view(-1, 1, 1).to(DEVICE)
    a = torch.zeros(2, 1, len(x), 1, 1, dtype=FP8, device=DEVICE)
    b = a.clone()
    slots = torch.arange(len(x), device=DEVICE)
    write_kv_cache(x, x, a, slots)
    write_kv(x, x, b, slots)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if DEVICE == "cuda":  # the interpreter's own fp8 cast turns NaN into 384
        nan = torch.full((1, 1, 1), float("nan"), device=DEVICE)
        write_kv_cache(nan, nan, a, slots[:1])  # a NaN activation stays visible, not a number
        assert a[:, 0, 0].float().isnan().all()


def test_kernel_and_torch_write_accept_bf16_inputs():
    k = torch.randn(3, 1, 16, device=DEVICE).bfloat16()
    a = torch.zeros(2, 1, 4, 1, 16, dtype=FP8, device=DEVICE)
    b = a.clone()
    slots = torch.tensor([0, 2, 3], device=DEVICE)
    write_kv_cache(k, k, a, slots)
    write_kv(k, k, b, slots)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _fp8_case(seq_lens, kv_heads, head_dim, block_size, seed=0, nan_block0=False):
    cache, tables = make_paged_cache(seq_lens, kv_heads, head_dim, block_size, seed=seed)
    if nan_block0:  # block 0 all NaN and in no table: where a masked key's block number points
        unused = sorted(set(range(cache.shape[1])) - set(tables.flatten().tolist()))[0]
        cache[:, [0, unused]] = cache[:, [unused, 0]]
        tables = torch.where(tables == 0, unused, tables).to(tables.dtype)
        assert cache[:, 0].isnan().all() and not (tables == 0).any()
    return (2 * cache).to(FP8), tables  # a scale of ~2 uses more of e4m3's range


@pytest.mark.parametrize("qdtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 3e-2)])
def test_decode_reads_the_fp8_cache_exactly(qdtype, tol):
    """bf16 queries run their dots in fp16 over an fp8 cache (hearth_kernels._checks.fp8_as_fp16);
    the tolerance is the bf16 output's rounding."""
    lens = [1, 15, 16, 17, 40]
    cache, tables = _fp8_case(lens, 2, 32, 8)
    q = (2 * torch.randn(len(lens), 4, 32, generator=torch.Generator(device=DEVICE).manual_seed(1),
                         device=DEVICE)).to(qdtype)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, cache, tables, seq, 32 ** -0.5, max_seq_len=40, num_splits=2,
                                 block_n=16)
    ref = reference_attention(q, cache, tables, list(range(len(lens) + 1)), lens, 32 ** -0.5)
    assert out.dtype == qdtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("qdtype", [torch.float16, torch.bfloat16])
def test_decode_reading_v_as_pairs_gives_the_same_bits(monkeypatch, qdtype):
    """V read as 16-bit pairs and widened a pair at a time (paged_decode's V_PAIRS, for an
    e4m3 cache under fp16 dots) gives exactly what the plain widening gives, also at a head
    size below its padding (24 of 32 lanes). (The NaN block where masked keys point bites on
    the GPU only: the interpreter widens e4m3's NaN to 480.)"""
    import hearth_kernels.paged_decode as pd

    lens = [1, 15, 16, 17, 40]
    for d in (32, 24):
        cache, tables = _fp8_case(lens, 2, d, 8, seed=d, nan_block0=True)
        q = (2 * torch.randn(len(lens), 4, d, generator=torch.Generator(device=DEVICE).manual_seed(2),
                             device=DEVICE)).to(qdtype)
        seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        outs = []
        for off in ("1", "0"):
            monkeypatch.setenv("HEARTH_DECODE_V_PAIRS", off)
            assert bool(pd._v_pairs(qdtype, cache)) == (off == "1")
            outs.append(paged_decode_attention(q, cache, tables, seq, d ** -0.5, max_seq_len=40, num_splits=2,
                                               block_n=16))
        assert torch.equal(outs[0], outs[1]), d


def test_v_pairs_only_where_the_pairs_are_whole_fp8_and_fp16(monkeypatch):
    import hearth_kernels.paged_decode as pd

    monkeypatch.setenv("HEARTH_DECODE_V_PAIRS", "1")
    cache = torch.zeros(2, 3, 8, 2, 32, dtype=FP8, device=DEVICE)
    assert pd._v_pairs(torch.float16, cache) in (1, 2) and pd._v_pairs(torch.bfloat16, cache) in (1, 2)
    assert pd._v_pairs(torch.float32, cache) == 0  # fp32 dots: V widens to float32
    assert pd._v_pairs(torch.float16, cache.float().half()) == 0  # not an fp8 cache
    assert pd._v_pairs(torch.float16, torch.zeros(2, 3, 8, 2, 31, dtype=FP8, device=DEVICE)) == 0  # odd head size
    odd_start = torch.zeros(2 * 3 * 8 * 2 * 32 + 1, dtype=FP8, device=DEVICE)[1:].view(2, 3, 8, 2, 32)
    assert pd._v_pairs(torch.float16, odd_start) == 0
    odd_strides = torch.zeros(2, 3, 8, 2, 33, dtype=FP8, device=DEVICE)[..., :32]  # strides (3168, 528, 66, 33, 1)
    assert pd._v_pairs(torch.float16, odd_strides) == 0
    monkeypatch.setenv("HEARTH_DECODE_V_PAIRS", "0")
    assert pd._v_pairs(torch.float16, cache) == 0
    monkeypatch.setenv("HEARTH_DECODE_V_PAIRS", "yes")
    with pytest.raises(ValueError, match="HEARTH_DECODE_V_PAIRS must be 0 or 1"):
        pd._v_pairs(torch.float16, cache)


def test_prefill_with_decode_rows_reads_the_fp8_cache_exactly():
    seq_lens, query_lens = [40, 20, 33, 9, 1], [7, 1, 33, 1, 1]
    cache, tables = _fp8_case(seq_lens, 2, 32, 8, seed=3)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = 2 * torch.randn(starts[-1], 4, 32, generator=torch.Generator(device=DEVICE).manual_seed(4),
                        device=DEVICE)
    out = paged_prefill_attention(q, cache, tables, torch.tensor(starts, dtype=torch.int32, device=DEVICE),
                                  torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), 32 ** -0.5,
                                  max_query_len=33, block_m=16, block_n=16)
    ref = reference_attention(q, cache, tables, starts, seq_lens, 32 ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_a_cache_of_another_dtype_is_refused():
    q = torch.randn(1, 2, 16, device=DEVICE)
    cache = torch.zeros(2, 1, 4, 1, 16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        paged_decode_attention(q, cache, torch.zeros(1, 1, dtype=torch.int32, device=DEVICE),
                               torch.ones(1, dtype=torch.int32, device=DEVICE), 1.0, max_seq_len=1)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="real shapes run on the GPU")
def test_real_shapes_bf16_queries_over_an_fp8_cache():
    """The 8B shape's attention (32 q heads, 8 kv heads, d 128, blocks of 16) with bf16
    queries: decode (1 token to 8k of context) and a prefill chunk over a cached prefix."""
    lens = [1, 16, 17, 1000, 8192]
    cache, tables = _fp8_case(lens, 8, 128, 16, seed=5, nan_block0=True)
    g = torch.Generator(device=DEVICE).manual_seed(6)
    q = torch.randn(len(lens), 32, 128, generator=g, device=DEVICE).bfloat16()
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, cache, tables, seq, 128 ** -0.5, max_seq_len=8192)
    ref = reference_attention(q, cache, tables, list(range(len(lens) + 1)), lens, 128 ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    import hearth_kernels.paged_decode as pd

    assert pd._v_pairs(q.dtype, cache) == 2 and pd._table_ahead(2)  # the default: both, 64-key tiles
    n = pd._config(128, q.dtype, cache.dtype, True)[0]
    for ahead in ("0", "1"):  # V as pairs (one cvt.rn.f16x2.e4m3x2 each) against the plain widening
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HEARTH_DECODE_TABLE_AHEAD", ahead)
            mp.setenv("HEARTH_DECODE_V_PAIRS", "1")
            pairs = paged_decode_attention(q, cache, tables, seq, 128 ** -0.5, max_seq_len=8192, block_n=n)
            mp.setenv("HEARTH_DECODE_V_PAIRS", "0")
            plain = paged_decode_attention(q, cache, tables, seq, 128 ** -0.5, max_seq_len=8192, block_n=n)
        assert torch.equal(pairs, plain) and torch.equal(pairs, out), ahead
    seq_lens, query_lens = [300, 1000, 17], [300, 257, 1]
    cache, tables = _fp8_case(seq_lens, 8, 128, 16, seed=7)
    starts = [0, 300, 557, 558]
    q = torch.randn(558, 32, 128, generator=g, device=DEVICE).bfloat16()
    out = paged_prefill_attention(q, cache, tables, torch.tensor(starts, dtype=torch.int32, device=DEVICE),
                                  torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), 128 ** -0.5,
                                  max_query_len=300)
    ref = reference_attention(q, cache, tables, starts, seq_lens, 128 ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
