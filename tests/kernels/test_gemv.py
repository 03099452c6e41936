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
