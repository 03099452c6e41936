"""The torch backend's prompt attention on the CPU gives a token the same bits however its
prompt is split into chunks (engine.layers.attention.PROMPT_TILE): one chunk, a step
budget's chunks, the tail after a prefix-cache hit, beside another sequence. And it is
attention: float64's to float32 rounding."""

from __future__ import annotations

import math

import pytest
import torch

from engine.layers.attention import TorchAttention
from tests.kernels.test_triton_backend import metadata

HEADS, KV_HEADS, DIM, BS = 6, 2, 16, 16
N = 300  # a whole chunk of 192-399 queries is where torch's CPU SDPA blocks rows otherwise


def qkv(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HEADS, DIM, generator=g), torch.randn(n, KV_HEADS, DIM, generator=g),
            torch.randn(n, KV_HEADS, DIM, generator=g))


def run_chunks(backend, q, k, v, bounds, other=None) -> torch.Tensor:
    """Attention of every position, reading the prompt in chunks [bounds[i], bounds[i+1]):
    a fresh cache, one sequence (blocks 1..), and ``other`` = (q, k, v) of a second
    sequence of 5 tokens read beside each chunk (blocks after it)."""
    nblk = -(-N // BS)
    cache = torch.full((2, 2 * nblk + 4, BS, KV_HEADS, DIM), 7.0)  # stale values in unused slots
    table = list(range(1, nblk + 1))
    out = torch.empty_like(q)
    for a, b in zip(bounds, bounds[1:]):
        if other is None:
            meta = metadata([table], [a], [b - a], BS)
            out[a:b] = backend.forward(q[a:b], k[a:b], v[a:b], cache, meta)
        else:
            oq, ok, ov = other
            meta = metadata([table, [nblk + 1]], [a, 0], [b - a, 5], BS)
            cat = (torch.cat((q[a:b], oq)), torch.cat((k[a:b], ok)), torch.cat((v[a:b], ov)))
            out[a:b] = backend.forward(*cat, cache, meta)[:b - a]
    return out


def reference(q, k, v, window=None) -> torch.Tensor:
    """Causal attention in float64, GQA by repeating each KV head for its group."""
    group = HEADS // KV_HEADS
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(DIM)
    pos = torch.arange(len(q))
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 40], ids=["full", "window40"])
def test_prompt_attention_same_bits_whatever_the_chunks(window):
    backend = TorchAttention(HEADS, KV_HEADS, DIM, 1 / math.sqrt(DIM), sliding_window=window)
    q, k, v = qkv(N, 0)
    whole = run_chunks(backend, q, k, v, [0, N])
    ref = reference(q, k, v, window)
    assert torch.allclose(whole.double(), ref, atol=2e-5, rtol=0), (whole.double() - ref).abs().max()
    chunkings = {
        "budget 256": [0, 256, N],
        "budget 100": [0, 100, 200, N],
        "cache hit, 1 left": [0, N - 1, N],  # (the chunk before it stands for the cached prefix)
        "cache hit at 288": [0, 288, N],
        "hit at 37, then 199": [0, 37, 236, N],
        "one at a time at the end": [0, 290] + list(range(291, N + 1)),
    }
    for name, bounds in chunkings.items():
        got = run_chunks(backend, q, k, v, bounds)
        differ = (got != whole).flatten(1).any(1).nonzero().flatten().tolist()
        assert not differ, f"{name}: positions {differ[:8]}... differ from the one-chunk read"
    beside = run_chunks(backend, q, k, v, [0, 256, N], other=qkv(5, 1))
    assert torch.equal(beside, whole), "another sequence in the step changed the bits"


def test_a_mixed_step_decodes_its_leading_rows_and_reads_the_rest_as_prompts():
    """meta.num_decode rows first (batched, the decode path) beside a prompt's single-token
    chunk and a 20-token chunk (the tiles), all against float64 attention over each
    sequence's cache."""
    backend = TorchAttention(HEADS, KV_HEADS, DIM, 1 / math.sqrt(DIM), sliding_window=None)
    lens = [37, 70, 50, 44]  # tokens each sequence has after this step
    qlens = [1, 1, 1, 20]  # two decodes, a prompt's last token alone, a prompt chunk
    tables = [list(range(1 + 8 * i, 1 + 8 * i + -(-n // BS))) for i, n in enumerate(lens)]
    cache = torch.zeros(2, 40, BS, KV_HEADS, DIM)
    seqs = [qkv(n, 10 + i) for i, n in enumerate(lens)]
    for (q, k, v), table, n, m in zip(seqs, tables, lens, qlens):  # what earlier steps wrote
        earlier = metadata([table], [0], [n - m], BS)
        backend.forward(q[:n - m], k[:n - m], v[:n - m], cache, earlier)
    meta = metadata(tables, [n - m for n, m in zip(lens, qlens)], qlens, BS)
    meta.num_decode = 2
    step = [torch.cat([s[j][n - m:] for s, n, m in zip(seqs, lens, qlens)]) for j in range(3)]
    out = backend.forward(*step, cache, meta)
    start = 0
    for (q, k, v), n, m in zip(seqs, lens, qlens):
        want = reference(q, k, v)[n - m:]
        assert torch.allclose(out[start:start + m].double(), want, atol=2e-5, rtol=0), (n, m)
        start += m
