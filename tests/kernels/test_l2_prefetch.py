"""hearth_kernels/l2_prefetch.py: the byte ranges a projection's tensors make, and how the
kernel cuts them into one bulk prefetch per lane (read back from the kernel itself, which
records instead of prefetching: the interpreter has no inline PTX); on a Hopper GPU, the
real launch inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from hearth_kernels.l2_prefetch import CHUNK, LANES, MAX_RANGES, L2Prefetch, byte_ranges
from tests.conftest import needs_triton_on_cpu
from tests.kernels.reference import DEVICE


def test_byte_ranges_are_aligned_and_take_shared_memory_once():
    base = torch.zeros(10_000, dtype=torch.uint8)
    a = base[3:1003]  # starts 3 bytes into a 512-aligned allocation, 1000 bytes
    b = base[500:700]  # inside a: merged with it
    c = torch.zeros(77, dtype=torch.float16)  # another allocation, 154 bytes
    got = byte_ranges([a, b, c, a])
    p0, pc = base.data_ptr(), c.data_ptr()
    assert p0 % 16 == 0 and pc % 16 == 0
    want = sorted([(p0, 1003 // 16 * 16), (pc, 154 // 16 * 16)])  # widened to p0, cut to 16s
    assert got == want
    assert all(x % 16 == 0 and n % 16 == 0 for x, n in got)


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="1 to 4"):
        L2Prefetch([], torch.device("cpu"))
    with pytest.raises(ValueError, match="1 to 4"):
        L2Prefetch([(16 * i, 16) for i in range(MAX_RANGES + 1)], torch.device("cpu"))
    with pytest.raises(ValueError, match="aligned"):
        L2Prefetch([(8, 32)], torch.device("cpu"))
    with pytest.raises(ValueError, match="aligned"):
        L2Prefetch([(16, 40)], torch.device("cpu"))


@needs_triton_on_cpu
@pytest.mark.parametrize("sizes", [[16], [CHUNK], [CHUNK + 16, 48], [5 * CHUNK - 32, 16, 3 * CHUNK, 40 * CHUNK + 80],
                                   [LANES * CHUNK, 2 * CHUNK]])
def test_the_lanes_prefetch_each_range_once_in_chunks(sizes):
    ranges, at = [], 1 << 40  # addresses are only numbers here: nothing is read
    for n in sizes:
        ranges.append((at, n))
        at += n + 4096 * 16
    lanes = L2Prefetch(ranges, torch.device("cpu")).lanes()
    assert lanes.shape[0] % LANES == 0
    used = [(int(a), int(n)) for a, n in lanes.tolist() if n > 0]
    assert all(0 < n <= CHUNK and n % 16 == 0 and a % 16 == 0 for a, n in used)
    assert len(used) == sum(-(-n // CHUNK) for n in sizes)  # one lane per chunk, the rest idle
    covered = sorted(used)
    for a, n in ranges:  # the chunks inside each range tile it exactly
        inside = [(x, m) for x, m in covered if a <= x < a + n]
        assert inside[0][0] == a and sum(m for _, m in inside) == n
        assert all(x + m == y for (x, m), (y, _) in zip(inside, inside[1:]))
    assert sum(m for _, m in used) == sum(sizes)  # and nothing outside them


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (9, 0),
                    reason="the bulk L2 prefetch needs a Hopper (sm_90) or newer GPU")
def test_the_prefetch_runs_in_a_cuda_graph_and_changes_nothing():
    from hearth_kernels.l2_prefetch import l2_prefetch_on
    from hearth_kernels.rmsnorm import rms_norm

    dev = torch.device("cuda")
    assert l2_prefetch_on(dev)
    w = torch.randn(4096, 1024, device=dev, dtype=torch.bfloat16)
    s = torch.rand(4096, 8, device=dev, dtype=torch.float16)
    x = torch.randn(1, 1024, device=dev, dtype=torch.bfloat16)
    g = torch.rand(1024, device=dev, dtype=torch.bfloat16)
    before = (w.clone(), s.clone())
    pf = L2Prefetch(byte_ranges([w, s]), dev)
    pf()  # eager: compiles
    want = rms_norm(x, g, 1e-5) @ w.T
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pf()
        y = rms_norm(x, g, 1e-5) @ w.T
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want) and torch.equal(w, before[0]) and torch.equal(s, before[1])
