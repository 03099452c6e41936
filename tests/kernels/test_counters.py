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


def test_split_launches_fence_unless_interpreted_or_switched_off(monkeypatch):
    """``fence_mode``: the split-K launches' writers fence on a GPU; not in the interpreter (no
    inline assembly there); ``HEARTH_SPLIT_FENCE`` picks none, the reader's or both (A/B only)."""
    monkeypatch.delenv("HEARTH_SPLIT_FENCE", raising=False)
    monkeypatch.setattr(cn, "interpreting", lambda: False)
    assert cn.fence_mode() == cn.WRITER == 1
    for want, mode in (("0", 0), ("writer", cn.WRITER), ("reader", cn.READER), ("both", 3), ("1", cn.WRITER)):
        monkeypatch.setenv("HEARTH_SPLIT_FENCE", want)
        assert cn.fence_mode() == mode
    monkeypatch.setattr(cn, "interpreting", lambda: True)
    assert cn.fence_mode() == 0


_FENCES = r"""
import json, re
from tests.kernels.sm90_compile import build
from hearth_kernels import fp8, quant_dp4a as qd, quant_mma as qm
mma = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16", "b_ptr": "*bf16", "y_ptr": "*bf16",
       "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
kernels = {
    "quant_mma": (qm._quant_mma_kernel, mma,
                  dict(GROUP=128, BITS=4, HAS_MIN=True, HAS_BIAS=False, SWIGLU=False, OFFSET=128, DOT_FP32=False,
                       BLOCK_N=64, BLOCK_K=128, BLOCK_M=64, PER_ROW=False, SPLIT_K=4, STAGES=3, ONE_ROW=False,
                       SCALE_W=True, AHEAD=True, DECODE32=True), 4, 3),
    "fp8_mma": (fp8._fp8_mma_kernel,
                {"xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": "*bf16",
                 "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"},
                dict(HAS_BIAS=False, DOT_FP32=False, BLOCK_N=64, BLOCK_K=128, BLOCK_M=16, SPLIT_K=4, STAGES=3), 4, 3),
    "dp4a": (qd._quant_gemv_dp4a_kernel,
             dict(mma, r_ptr="*bf16", nw_ptr="*bf16", ro_ptr="*bf16", eps="fp32", xf_ptr="*fp32"),
             dict(GROUP=128, BITS=4, HAS_MIN=True, HAS_BIAS=False, SWIGLU=False, ROWS=32, R=4, KP=4096, STAGES=2,
                  SPLIT=4, NORM=0, QX=False, ASM=True, PDL=False), 4, 1),
}
for name, (fn, types, consts, warps, stages) in kernels.items():
    for fence in (False, True):
        ptx = build(fn, types, dict(consts, FENCE=3 if fence else 0), warps, stages).asm["ptx"]
        lines = [ln.strip() for ln in ptx.splitlines()]
        at = [i for i, ln in enumerate(lines) if "fence.acq_rel.gpu" in ln]
        atom = [i for i, ln in enumerate(lines) if ln.startswith(("atom.", "@")) and "atom.global" in ln
                and ".add" in ln]
        bar = [i for i, ln in enumerate(lines) if ln.startswith("bar.sync")]
        print(json.dumps({"kernel": name, "fence": fence, "fences": at, "atom": atom[:1],
                          "bar_before_atom": [i for i in bar if atom and i < atom[0]][-1:],
                          "predicated": [lines[i] for i in at if lines[i].startswith("@")]}), flush=True)
"""


@pytest.mark.slow
def test_split_k_kernels_fence_in_every_thread_around_the_count():
    """The sm_90 builds of the three split-K kernels (quant_mma's, fp8_mma's, the dp4a GEMV's):
    with ``FENCE`` each thread fences after writing its partial, before the barrier and the
    tile's atomic count, and again before reading the others' partials (unpredicated: every
    thread); without it, none."""
    from tests.kernels.sm90_compile import compiled_rows

    rows = compiled_rows(_FENCES, 600)
    assert {(r["kernel"], r["fence"]) for r in rows} == {(k, f) for k in ("quant_mma", "fp8_mma", "dp4a")
                                                         for f in (False, True)}
    for r in rows:
        assert r["atom"], r
        if not r["fence"]:
            assert r["fences"] == [], r
            continue
        first, second = r["fences"]
        assert first < r["bar_before_atom"][0] < r["atom"][0] < second, r
        assert r["predicated"] == [], r
