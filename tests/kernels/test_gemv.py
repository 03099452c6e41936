"""Batch-1 GEMV (optionally with the SwiGLU input fused) vs float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hearth_kernels.activation import silu_and_mul
from hearth_kernels.gemv import gemv
from tests.kernels.reference import DEVICE


@pytest.mark.parametrize("n,k,config", [
    (1, 16, None), (37, 100, None), (300, 1000, None), (130, 64, (4, 16, 1)), (9, 530, (8, 128, 2)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_float64(n, k, config, bias):
    g = torch.Generator(device=DEVICE).manual_seed(n * 1000 + k)
    x = torch.randn(1, k, device=DEVICE, generator=g)
    w = torch.randn(n, k, device=DEVICE, generator=g)
    b = torch.randn(n, device=DEVICE, generator=g) if bias else None
    y = gemv(x, w, b, config=config)
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    assert y.shape == (1, n) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, atol=1e-4 * k ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("n,inter", [(5, 48), (64, 300)])
def test_swiglu_input_matches_silu_and_mul_then_linear(n, inter):
    g = torch.Generator(device=DEVICE).manual_seed(inter)
    gate_up = 3 * torch.randn(1, 2 * inter, device=DEVICE, generator=g)
    w = torch.randn(n, inter, device=DEVICE, generator=g)
    y = gemv(gate_up, w, swiglu=True)
    gate, up = gate_up.double().chunk(2, dim=-1)
    ref = F.linear(F.silu(gate) * up, w.double())
    torch.testing.assert_close(y.double(), ref, atol=1e-4 * inter ** 0.5, rtol=1e-5)
    # same rounding of the activation as the unfused kernel
    torch.testing.assert_close(y, F.linear(silu_and_mul(gate_up), w), atol=1e-4, rtol=1e-5)


def test_strided_weight_rows_and_out_buffer():
    big = torch.randn(40, 96, device=DEVICE)
    w = big[:, :64]  # row stride 96
    x = torch.randn(1, 64, device=DEVICE)
    out = torch.empty(1, 40, device=DEVICE)
    assert gemv(x, w, out=out) is out
    torch.testing.assert_close(out.double(), F.linear(x.double(), w.double()), atol=1e-4, rtol=1e-5)


def test_bad_arguments_are_clear_errors():
    w = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match="columns"):
        gemv(torch.randn(1, 15, device=DEVICE), w)
    with pytest.raises(ValueError, match="gate"):
        gemv(torch.randn(1, 16, device=DEVICE), w, swiglu=True)
    with pytest.raises(ValueError, match="contiguous last axis"):
        gemv(torch.randn(1, 8, device=DEVICE), w.t())
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 16, device=DEVICE), w, torch.randn(7, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,swiglu", [(6144, 4096, False), (4096, 4096, False), (28672, 4096, False),
                                        (4096, 14336, True), (128256, 4096, False), (2560, 2048, False)])
def test_gpu_llama_shapes_match_cublas(dtype, n, k, swiglu):
    torch.manual_seed(0)
    x = torch.randn(1, 2 * k if swiglu else k, device="cuda", dtype=dtype)
    w = (0.02 * torch.randn(n, k, device="cuda")).to(dtype)
    y = gemv(x, w, swiglu=swiglu)
    xin = silu_and_mul(x) if swiglu else x
    ref = F.linear(xin.double(), w.double())
    # fp32 accumulation in both: differences are one output rounding plus summation order
    err = (y.double() - ref).abs().max().item()
    cublas = (F.linear(xin, w).double() - ref).abs().max().item()
    assert err <= 2 * cublas + 1e-3, (err, cublas)


@pytest.mark.parametrize("n,k,config,scaled", [(40, 192, (8, 64, 2), False), (37, 160, (4, 64, 1), True)])
def test_x_in_the_weight_layout_is_the_same_product(monkeypatch, n, k, config, scaled):
    """x loaded per weight row in the tile's layout (the default without SwiGLU) and as one
    vector (``HEARTH_GEMV_XROWS=0``): the same sums in the same order, so the same bits; an
    fp8 weight with row scales too, and a K that the steps don't divide."""
    g = torch.Generator(device=DEVICE).manual_seed(n)
    x = torch.randn(1, k, generator=g, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g, device=DEVICE)
    scale = None
    if scaled:
        w, scale = w.to(torch.float8_e4m3fn), torch.rand(n, generator=g, device=DEVICE) + 0.5
    else:
        w = w.to(torch.bfloat16)
    ys = []
    for on in ("1", "0"):
        monkeypatch.setenv("HEARTH_GEMV_XROWS", on)
        ys.append(gemv(x, w, config=config, scale=scale))
    assert torch.equal(ys[0], ys[1])
    ref = F.linear(x.double(), w.double()) * (1 if scale is None else scale.double())
    assert (ys[0].double() - ref).abs().max().item() <= 2.0 ** -7 * ref.abs().max().item() + 1e-2


@pytest.mark.slow
def test_the_fp8_kloop_step_has_no_barrier():
    """sm_90 build (offline, no GPU): with x in the weight tile's layout the fp8 K-loop has no
    shared-memory trip, so no barrier; loaded as one vector it had two to four a step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not triton.__version__.startswith("3.6."):
        pytest.skip("calibrated on Triton 3.6's code generation")
    code = r"""
import json
from tests.kernels import sm90_compile as sc
from hearth_kernels import gemv as g
types = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16"}
out = {}
for xr in (True, False):
    for bn, bk, w in ((8, 512, 4), (16, 1024, 8)):
        consts = dict(HAS_SCALE=True, HAS_BIAS=False, SWIGLU=False, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, PDL=True,
                      XROWS=xr)
        li = sc.loop_instructions(sc.build(g._gemv_kernel, types, consts, w, 1))
        out[f"{xr}-{bn}"] = li["by_opcode"].get("BAR", 0)
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    bars = json.loads(res.stdout.strip().splitlines()[-1])
    assert bars["True-8"] == 0 and bars["True-16"] == 0, bars
    assert bars["False-8"] > 0 and bars["False-16"] > 0, bars  # the check can tell the two apart
