"""``hearth_kernels/counters.py``: the split-K launches' shared counters. One tensor per
device, the same one every time (CUDA graphs keep its address), zeroed when made; a launch
with more output tiles than slots, or a first use inside graph capture, is refused with what
to do instead."""

from __future__ import annotations

import pytest
import torch

from hearth_kernels import counters as cn


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(cn, "_COUNTERS", {})


def test_one_zeroed_tensor_per_device_never_replaced(fresh):
    cpu = torch.device("cpu")
    cn.make_counters(cpu)
    a = cn.counters(cpu, 10)
    assert a.dtype == torch.int32 and a.numel() == cn._COUNTER_SLOTS and not a.any()
    a[3] = 7  # what a launch leaves is its own business: the tensor itself stays
    assert cn.counters(cpu, cn._COUNTER_SLOTS) is a


def test_too_many_tiles_is_refused_with_what_to_do(fresh):
    with pytest.raises(ValueError, match="at most 65536.*wider tiles or no split"):
        cn.counters(torch.device("cpu"), cn._COUNTER_SLOTS + 1)
    assert not cn._COUNTERS  # nothing made on the way


def test_first_use_inside_graph_capture_is_refused(fresh, monkeypatch):
    """Made inside a capture, the tensor would live in the graph's private pool; the error
    names make_counters. (The capture is stood in for: this runs without a GPU.)"""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before CUDA graph capture.*make_counters"):
        cn.counters(torch.device("cuda", 0), 1)
    assert not cn._COUNTERS


@pytest.mark.gpu
def test_gpu_counters_made_before_capture_serve_inside_it(fresh):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda", torch.cuda.current_device())
    cn.make_counters(dev)
    have = cn.counters(dev, 1)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        assert cn.counters(dev, 1) is have
