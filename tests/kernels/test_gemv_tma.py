"""The K-loop GEMV whose weight tiles come by TMA (``hearth_kernels/gemv.gemv_tma``,
``TmaConfig``), offered to fp8 layers' batch-1 tuner: against float64 of the same weight and
x (the activation rounded like the fused kernel's), on CPU through Triton's interpreter (which
emulates the descriptors, fp8 included) at small odd shapes; its sm_90 build; the 8B shapes
on a Hopper GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers.linear_kernels import silu_and_mul_reference
from engine.quant.rtn import quantize_fp8
from hearth_kernels.gemv import TmaConfig, gemv, gemv_tma, tma_problem
from tests.kernels.reference import DEVICE


def _fp8_layer(n, k, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qw = quantize_fp8(torch.randn(n, k, device=DEVICE, generator=g) * 0.02)
    bias = torch.randn(n, device=DEVICE, generator=g)
    return qw, bias


@pytest.mark.parametrize("n,k,cfg", [
    (40, 384, TmaConfig(16, 128, 2, 3)),  # a partial program, 3 steps
    (24, 336, TmaConfig(8, 64, 1, 2)),  # K not a multiple of the step (masked x, zero-filled weights)
    (16, 256, TmaConfig(16, 256, 2, 1)),  # one step, one stage
])
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
def test_fp8_tma_gemv_matches_float64(n, k, cfg, swiglu):
    qw, bias = _fp8_layer(n, k, n + k)
    dtype = torch.float32  # an output exact enough that a 1% error in a scale or the bias shows
    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(1, 2 * k if swiglu else k, device=DEVICE, generator=g).to(dtype)
    b = 0.05 * bias.to(dtype)  # about a tenth of the product's size
    y = gemv_tma(x, qw.qweight, b, swiglu=swiglu, config=cfg, scale=qw.scales)
    xin = silu_and_mul_reference(x) if swiglu else x  # the activation rounded as the kernel's is
    ref = F.linear(xin.double(), qw.dequantize(torch.float64), b.double())
    assert y.dtype == dtype and y.shape == (1, n)
    # fp32 sums in another order than float64's (SwiGLU: its exp a float32 ulp from torch's)
    torch.testing.assert_close(y.double(), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
    # the register-pipelined K loop: the same products
    y0 = gemv(x, qw.qweight, b, swiglu=swiglu, config=(8, 64, 1), scale=qw.scales)
    torch.testing.assert_close(y, y0, atol=1e-5 * float(y0.abs().max()), rtol=1e-5)
    # bf16 activations: the output rounded once more
    xb = x.bfloat16()
    yb = gemv_tma(xb, qw.qweight, b.bfloat16(), swiglu=swiglu, config=cfg, scale=qw.scales)
    refb = F.linear((silu_and_mul_reference(xb) if swiglu else xb).double(), qw.dequantize(torch.float64),
                    b.bfloat16().double())
    torch.testing.assert_close(yb.double(), refb, atol=8e-3 * float(refb.abs().max()), rtol=8e-3)


def test_bf16_weights_and_float32():
    """Without a scale the weight is x's dtype: bf16 (16-byte rows need K a multiple of 8) and
    float32 (exact enough to compare tightly)."""
    g = torch.Generator(device=DEVICE).manual_seed(5)
    for dtype, tol in ((torch.bfloat16, dict(atol=2e-2, rtol=1e-2)), (torch.float32, dict(atol=1e-5, rtol=1e-5))):
        w = torch.randn(24, 200, device=DEVICE, generator=g).to(dtype)
        x = torch.randn(1, 200, device=DEVICE, generator=g).to(dtype)
        y = gemv_tma(x, w, config=TmaConfig(8, 64, 1, 3))
        torch.testing.assert_close(y.double(), F.linear(x.double(), w.double()), **tol)


def test_tma_gemv_refuses_what_it_cannot_run():
    qw, _ = _fp8_layer(16, 256, 1)
    x = torch.randn(1, 256, device=DEVICE).bfloat16()
    with pytest.raises(ValueError, match="power of 2"):
        gemv_tma(x, qw.qweight, config=TmaConfig(12, 128, 2, 2), scale=qw.scales)
    with pytest.raises(ValueError, match="power of 2"):
        gemv_tma(x, qw.qweight, config=TmaConfig(16, 2048, 2, 2), scale=qw.scales)  # 2 KB rows a step
    with pytest.raises(ValueError, match="in flight"):
        gemv_tma(x, qw.qweight, config=TmaConfig(256, 1024, 4, 8), scale=qw.scales)  # 7 x 256 KB
    with pytest.raises(ValueError, match="at least 1 stage"):
        gemv_tma(x, qw.qweight, config=TmaConfig(16, 128, 4, 0), scale=qw.scales)
    assert "multiple of 16 bytes" in tma_problem(100, 1, TmaConfig(16, 64, 2, 2))
    with pytest.raises(ValueError, match="x has"):  # gemv's own checks come first
        gemv_tma(x[:, :128], qw.qweight, config=TmaConfig(16, 128, 2, 2), scale=qw.scales)


def test_the_fp8_tuner_offers_it(monkeypatch):
    """fp8's batch-1 candidates include the TMA GEMV (``TmaConfig``s, named apart from the
    4-tuple x-stationary configs), each also as a SwiGLU-down layer's act-first twin; off
    with ``HEARTH_QUANT_TMA=0``."""
    from types import SimpleNamespace

    from engine.layers.linear_kernels import fp8_gemv_configs
    from engine.layers.quant_kernels import Fp8Kernel, kernel_candidates

    tma = [c for c in fp8_gemv_configs(4096, 14336) if isinstance(c, TmaConfig)]
    assert tma and all(tma_problem(14336, 1, c) is None for c in tma)
    assert Fp8Kernel(tma[0]).name == "fp8 gemv tma %dx%d/%dw s%d" % tuple(tma[0])
    assert Fp8Kernel((16, 2, 8, 3)).name.startswith("fp8 gemv x-stationary")
    short = [c for c in fp8_gemv_configs(64, 96) if isinstance(c, TmaConfig)]  # steps no wider than the row
    assert short and all(c.block_k == 128 for c in short)
    qw, bias = _fp8_layer(40, 384, 2)
    layer = SimpleNamespace(qweight=SimpleNamespace(device=torch.device("cuda")), scales=qw.scales, bias=None,
                            act=silu_and_mul_reference, in_features=384, out_features=40, fmt="e4m3")
    names = [c.name for c in kernel_candidates(layer)]
    assert [n for n in names if n.startswith("fp8 gemv tma") and n.endswith(" act first")]
    # a TmaConfig runs gemv_tma (not the x-stationary 4-tuple kernel), the act-first twin the
    # activation first and then gemv_tma without SwiGLU
    import hearth_kernels.gemv as gv

    calls = []
    real_gemv_tma = gv.gemv_tma
    monkeypatch.setattr(gv, "gemv_tma", lambda *a, **kw: calls.append(kw["swiglu"]) or real_gemv_tma(*a, **kw))
    real = SimpleNamespace(**{**vars(layer), "qweight": qw.qweight, "bias": bias.bfloat16()})
    x = torch.randn(1, 768, device=DEVICE).bfloat16()
    cfg = TmaConfig(16, 128, 2, 3)
    fused, twin = Fp8Kernel(cfg).one_row(x, real), Fp8Kernel(cfg, act_first=True).one_row(x, real)
    assert calls == [True, False]
    torch.testing.assert_close(twin, fused, atol=2e-2, rtol=1e-2)
    monkeypatch.setenv("HEARTH_QUANT_TMA", "0")
    assert not [c for c in fp8_gemv_configs(4096, 14336) if isinstance(c, TmaConfig)]


_COMPILE = r"""
import json, re
from tests.kernels.sm90_compile import build, compile_kernel
from hearth_kernels import gemv as gv
from engine.layers.linear_kernels import FP8_TMA_CONFIGS
for swiglu in (False, True):
    for bn, bk, warps, stages in FP8_TMA_CONFIGS:
        types = {"x_ptr": "*bf16", "w_desc": f"tensordesc<fp8e4nv[{bn}, {bk}]>", "s_ptr": "*fp32", "b_ptr": "*bf16",
                 "y_ptr": "*bf16"}
        consts = dict(HAS_SCALE=True, HAS_BIAS=False, SWIGLU=swiglu, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages,
                      EVEN_K=True, PDL=True)
        # K divisible by 16 (the 8B's 4,096 and 14,336: the launcher specialises on it), so the
        # up half of a SwiGLU input is as aligned as the gate half
        row = dict(compile_kernel(gv._gemv_tma_kernel, types, consts, warps, stages, divisible=("K",)), stages=stages)
        asm = build(gv._gemv_tma_kernel, types, consts, warps, stages, divisible=("K",)).asm
        loop = asm["ttgir"][asm["ttgir"].index("scf.for"):]
        loop = loop[:loop.index("scf.yield")]
        row.update(tma="cp.async.bulk.tensor" in asm["ptx"], loop_plain_loads=len(re.findall(r"= tt\.load ", loop)))
        print(json.dumps({"kernel": f"fp8-{bn}x{bk}-s{stages}" + ("-swiglu" if swiglu else ""), **row}), flush=True)
"""


@pytest.mark.slow
def test_fp8_tma_gemv_compiles_for_sm90():
    """The GPU build of each fp8 TMA candidate (with and without SwiGLU): TMA copies, x copied
    ahead with the tiles (no plain load in the loop), no spills, an H100's shared memory."""
    from tests.kernels.sm90_compile import compiled_rows

    rows = {r.pop("kernel"): r for r in compiled_rows(_COMPILE, 900)}
    assert len(rows) == 8, rows
    for name, row in rows.items():
        assert row["tma"] and row["pipelined"], (name, row)
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, (name, row)
        assert row["shared"] <= 227 * 1024, (name, row)
        assert row["loop_plain_loads"] == 0, (name, row)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,swiglu", [(28672, 4096, False), (4096, 14336, True), (6144, 4096, False),
                                        (4104, 3600, True)])  # the last: N and K tails (TMA's zero fill)
def test_gpu_fp8_tma_gemv_llama_shapes(n, k, swiglu):
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA GPU")
    from engine.layers.linear_kernels import FP8_TMA_CONFIGS
    from hearth_kernels.gemv import tma_available

    if not tma_available(torch.device(DEVICE)):
        pytest.skip("needs TMA (Hopper or newer)")
    qw, bias = _fp8_layer(n, k, 7)
    b = (0.05 * bias).bfloat16()
    x = torch.randn(1, 2 * k if swiglu else k, device=DEVICE).bfloat16()
    xin = silu_and_mul_reference(x) if swiglu else x
    ref = F.linear(xin.double(), qw.dequantize(torch.float64), b.double())
    rms = ref.pow(2).mean().sqrt().item()
    for c in FP8_TMA_CONFIGS:
        y = gemv_tma(x, qw.qweight, b, swiglu=swiglu, config=TmaConfig(*c), scale=qw.scales)
        assert (y.double() - ref).abs().max().item() <= 1e-2 * rms + 1e-2 * ref.abs().max().item(), c
