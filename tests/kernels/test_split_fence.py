"""``hearth_kernels/split_fence.py``: the split-K launches' fences. Which ones run (the
writers' by default, none in the interpreter, ``HEARTH_SPLIT_FENCE`` for the A/B, anything else
refused), and in the sm_90 builds of the three Triton split-K kernels where each mode puts them:
the writers' after the partial's stores and before the barrier and the tile's atomic count, the
last program's after the count and before it reads the others' partials. (The races themselves
need a GPU: the split tests in test_quant_mma.py, test_quant_dp4a.py and test_quant_mma_gluon.py
poison the outputs and repeat the calls.)"""

from __future__ import annotations

import pytest

from hearth_kernels import split_fence as sf


def test_writers_fence_by_default_none_interpreted_switch_for_ab(monkeypatch):
    monkeypatch.delenv("HEARTH_SPLIT_FENCE", raising=False)
    monkeypatch.setattr(sf, "interpreting", lambda: False)
    assert sf.fence_mode() == sf.WRITER == 1
    for want, mode in (("0", 0), ("writer", sf.WRITER), ("reader", sf.READER), ("both", 3), ("1", 3),
                       (" Both ", 3), ("", sf.WRITER)):
        monkeypatch.setenv("HEARTH_SPLIT_FENCE", want)
        assert sf.fence_mode() == mode, want
    for bad in ("none", "off", "2"):
        monkeypatch.setenv("HEARTH_SPLIT_FENCE", bad)
        with pytest.raises(ValueError, match="use writer .*both, reader or 0"):
            sf.fence_mode()
    monkeypatch.setenv("HEARTH_SPLIT_FENCE", "both")
    monkeypatch.setattr(sf, "interpreting", lambda: True)
    assert sf.fence_mode() == 0


_FENCES = r"""
import json
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
    for fence in (None, 0, 1, 2, 3):  # None: left out (the kernel's default)
        c = consts if fence is None else dict(consts, FENCE=fence)
        ptx = build(fn, types, c, warps, stages).asm["ptx"]
        lines = [ln.strip() for ln in ptx.splitlines()]
        at = [i for i, ln in enumerate(lines) if "fence.acq_rel.gpu" in ln]
        atom = [i for i, ln in enumerate(lines) if "atom.global" in ln and ".add" in ln]
        bar = [i for i, ln in enumerate(lines) if ln.startswith("bar.sync")]
        print(json.dumps({"kernel": name, "fence": fence, "fences": at, "atom": atom,
                          "bar_before_atom": [i for i in bar if atom and i < atom[0]][-1:],
                          "params": ptx.count(".param")}), flush=True)
"""


@pytest.mark.slow
def test_each_mode_places_its_fences_in_the_three_split_kernels():
    """FENCE 0: none; 1 (the default launches pass): one, after the partial and before the
    barrier and the count; 2: one, after the count; 3: both. Left out, the kernel's default (0),
    compiled as a constant (no extra parameter, no branch around a fence)."""
    from tests.kernels.sm90_compile import compiled_rows

    rows = compiled_rows(_FENCES, 600)
    assert {(r["kernel"], r["fence"]) for r in rows} == {(k, f) for k in ("quant_mma", "fp8_mma", "dp4a")
                                                         for f in (None, 0, 1, 2, 3)}
    by = {(r["kernel"], r["fence"]): r for r in rows}
    for r in rows:
        assert len(r["atom"]) == 1, r  # the tile's count
        count, bar = r["atom"][0], r["bar_before_atom"][0]
        fences = r["fences"]
        if r["fence"] in (None, 0):
            assert fences == [], r
        elif r["fence"] == 1:
            assert len(fences) == 1 and fences[0] < bar < count, r
        elif r["fence"] == 2:
            assert len(fences) == 1 and fences[0] > count, r
        else:
            assert len(fences) == 2 and fences[0] < bar < count < fences[1], r
    for k in ("quant_mma", "fp8_mma", "dp4a"):  # the default is a constant: no parameter more
        assert by[(k, None)]["params"] == by[(k, 0)]["params"] == by[(k, 1)]["params"], k
