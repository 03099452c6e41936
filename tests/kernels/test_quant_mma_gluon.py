"""The Gluon int4 kernel (hearth_kernels/quant_mma_gluon.py): on an sm_90 GPU against the float64
product of the dequantized weight (test_quant_gemv.py's ``check``) and bit for bit against the
Triton kernel's in-register dequantization without a K split; every output written (poisoned with
NaN first) and the same bits on every call with one; K ranges shorter than the copy ring, groups
wider than a program's K range; inside a CUDA graph. On any machine: the shape rules of which
calls it takes, its configs, and its sm_90 build (no spills, the operand's layout conversion free).
Its values can't be checked on the CPU: the interpreter doesn't run Gluon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hearth_kernels import quant_mma_gluon as qg
from hearth_kernels.quant_mma import MmaConfig, quant_mma
from tests.kernels.reference import DEVICE
from tests.kernels.test_quant_gemv import check, make_weight, rand_x


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


sm90 = pytest.mark.skipif(not _sm90() or qg.gluon is None, reason="needs an sm_90 GPU and Triton's Gluon")


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("rows", [1, 2, 16, 17, 33, 64])
@pytest.mark.parametrize("n,k,group", [(192, 512, 128), (128, 1024, 256), (4096, 4096, 128)])
def test_matches_reference_and_triton(rows, n, k, group):
    qw, prep = make_weight(4, n, k, group, seed=rows + n)
    x = rand_x(rows, k, torch.bfloat16)
    triton_y = quant_mma(x, prep, config=MmaConfig(64, 128, 4, 3, 1, True, True))  # the Triton kernel, no split
    for stages in (3, 4):
        for split in (1, 2, 4):
            y = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
            qg.quant_gluon(x, prep, y, config=qg.GluonConfig(stages, split))
            assert not y.isnan().any(), (stages, split)
            check(y, x, qw, weight_rounding=True)
            if split == 1:  # the same weights, rounded once, in the same K order
                assert torch.equal(y, triton_y), (stages, split)
            for _ in range(2):  # a split's partials meet in the same order on every call
                again = torch.full_like(y, float("nan"))
                qg.quant_gluon(x, prep, again, config=qg.GluonConfig(stages, split))
                assert torch.equal(again, y), (stages, split)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("n,k,group,split", [(64, 128, 128, 1), (64, 256, 128, 2), (128, 512, 512, 2),
                                             (64, 1024, 1024, 4), (64, 768, 256, 2)])
def test_short_ranges_and_wide_groups(n, k, group, split):
    """One or two steps a program (fewer than the copy ring's), and groups wider than a program's
    K range (a per-channel weight split 4: each program's steps all in its one group)."""
    qw, prep = make_weight(4, n, k, group, seed=k + split)
    x = rand_x(5, k, torch.bfloat16)
    y = torch.full((5, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    qg.quant_gluon(x, prep, y, config=qg.GluonConfig(4, split))
    assert not y.isnan().any()
    check(y, x, qw, weight_rounding=True)


@pytest.mark.gpu
@sm90
def test_bias_default_path_and_graph():
    """quant_mma without a config takes the Gluon kernel for a wide layer (bias too), also inside
    a CUDA graph."""
    n, k = 16384, 256
    qw, prep = make_weight(4, n, k, 128, seed=3)
    bias = (0.1 * torch.randn(n, generator=torch.Generator().manual_seed(4))).to(DEVICE, torch.bfloat16)
    x = rand_x(24, k, torch.bfloat16)
    assert qg.default_gluon_config(24, n, k).split == 1 and qg.fits(x, prep, bias)
    y = quant_mma(x, prep, bias=bias)
    check(y, x, qw, bias=bias, weight_rounding=True)
    out = torch.empty_like(y)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        quant_mma(x, prep, bias=bias, out=out)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("rows", [16, 64])
def test_down_shaped_default_path_splits_and_graph(rows, monkeypatch):
    """quant_mma without a config takes the Gluon kernel with a K split for a down-shaped layer
    (K at least 3N): every output written, right, the same bits on each call and inside a CUDA
    graph; ``HEARTH_QUANT_MMA_GLUON_SPLIT=0`` hands it back to the Triton kernel."""
    monkeypatch.delenv("HEARTH_QUANT_MMA_GLUON_SPLIT", raising=False)
    n, k = 512, 14336
    qw, prep = make_weight(4, n, k, 128, seed=rows)
    x = rand_x(rows, k, torch.bfloat16)
    assert qg.default_gluon_config(rows, n, k).split > 1 and qg.fits(x, prep)
    y = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    quant_mma(x, prep, out=y)
    assert not y.isnan().any()
    check(y, x, qw, weight_rounding=True)
    again = torch.full_like(y, float("nan"))
    assert torch.equal(quant_mma(x, prep, out=again), y)
    out = torch.empty_like(y)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        quant_mma(x, prep, out=out)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)
    monkeypatch.setenv("HEARTH_QUANT_MMA_GLUON_SPLIT", "0")
    assert not qg.fits(x, prep)
    check(quant_mma(x, prep), x, qw, weight_rounding=True)

def test_which_calls_it_takes(monkeypatch):
    """The shape rules (any machine), then the device's: a CPU tensor never, an sm_90 GPU's when
    Gluon is there; the knobs."""
    monkeypatch.delenv("HEARTH_QUANT_MMA_GLUON", raising=False)
    monkeypatch.delenv("HEARTH_QUANT_MMA_GLUON_SPLIT", raising=False)
    _, wide = make_weight(4, 16384, 256, 128)  # gate_up-like: no split by default
    assert qg.takes(wide, 1) and qg.takes(wide, 64) and qg.takes(wide, 8, torch.bfloat16)
    assert not qg.takes(wide, 65)  # one x tile of at most 64 rows
    assert not qg.takes(wide, 8, torch.float16)  # a bf16 bias or none
    _, narrow = make_weight(4, 16384, 256, 64)
    assert not qg.takes(narrow, 8)  # groups of 64: a step holds two
    _, per_channel = make_weight(4, 16384, 256, 256)
    assert not qg.takes(per_channel, 8)  # one group a row: the Triton kernel's unrounded path
    _, square = make_weight(4, 256, 256, 128)
    assert not qg.takes(square, 8)  # q/k/v- and o-shaped (split by default): the Triton kernel keeps them
    _, down = make_weight(4, 64, 256 * 3, 128)
    assert qg.takes(down, 8)  # down-shaped (K at least 3N), split
    monkeypatch.setenv("HEARTH_QUANT_MMA_GLUON_SPLIT", "0")
    assert not qg.takes(down, 8) and not qg.takes(square, 8) and qg.takes(wide, 8)
    monkeypatch.delenv("HEARTH_QUANT_MMA_GLUON_SPLIT")
    x = rand_x(4, 256, torch.bfloat16)
    if not x.is_cuda:
        assert not qg.fits(x, wide)  # a CPU tensor: the Triton kernel (the interpreter's)
        return
    assert qg.fits(x, wide) == (_sm90() and qg.gluon is not None)
    if not qg.fits(x, wide):
        return
    assert not qg.fits(x.half(), wide)  # bf16 x only
    assert not qg.fits(torch.empty(4, 260, dtype=torch.bfloat16, device=x.device)[:, :256], wide)  # rows unaligned
    monkeypatch.setenv("HEARTH_QUANT_MMA_GLUON", "0")
    assert not qg.fits(x, wide)


def test_default_configs():
    """The 8B projections: gate_up unsplit, the narrow ones split 4; 3 steps in flight from 33 rows."""
    assert qg.default_gluon_config(64, 28672, 4096) == qg.GluonConfig(3, 1)
    assert qg.default_gluon_config(16, 28672, 4096) == qg.GluonConfig(4, 1)
    for n, k in ((6144, 4096), (4096, 4096), (4096, 14336)):
        assert qg.default_gluon_config(64, n, k) == qg.GluonConfig(3, 4)
    assert qg.default_gluon_config(8, 64, 256).split == 2  # never more splits than steps


def test_sm90_build():
    """Compiled for an H100 on any machine (no TRITON_INTERPRET): no spills, the operand's layout
    conversion free (the kernel asserts it), no shared-memory stores in the K loop."""
    try:
        import triton
    except ImportError:
        pytest.skip("no Triton")
    if qg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((bin_dir / "ptxas").is_file() and (bin_dir / "nvdisasm").is_file()):
        pytest.skip("Triton's NVIDIA backend (bundled ptxas and nvdisasm) is not installed")
    if qg.gluon is None:
        pytest.skip(f"the Gluon kernel is written for Triton {qg.GLUON_TRITON}x, this is {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile", "gluon"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4
    for row in rows:
        assert row["spill_bytes"] == 0 and row["registers"] <= 255, row
        assert "STS" not in row["by_opcode"] and row["by_opcode"].get("BAR", 0) <= 2, row
        assert row["by_opcode"]["HGMMA"] == 8, row  # one 128-input step: eight k16 wgmmas
