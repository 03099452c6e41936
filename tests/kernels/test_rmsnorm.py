"""RMSNorm kernels vs engine.layers.norm.RMSNorm (the eager reference) and float64 maths."""

from __future__ import annotations

import pytest
import torch

from engine.layers.norm import RMSNorm
from hearth_kernels.rmsnorm import fused_add_rms_norm, rms_norm
from tests.kernels.reference import DEVICE, ulp_distance

EPS = 1e-5


def eager_norm(weight: torch.Tensor) -> RMSNorm:
    norm = RMSNorm(weight.shape[0], EPS, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def float64_norm(x, weight):
    h = x.double()
    return weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (5, 1000), (3, 4, 32)],
                         ids=["1x64", "7x96", "5x1000", "qk-norm-3x4x32"])
def test_float32_matches_float64(shape):
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(*shape, generator=g)).to(DEVICE)
    w = torch.randn(shape[-1], generator=g).to(DEVICE)
    torch.testing.assert_close(rms_norm(x, w, EPS).double(), float64_norm(x, w), atol=1e-5, rtol=1e-5)


def test_fused_add_float32():
    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(6, 200, generator=g).to(DEVICE) for _ in range(2))
    w = torch.randn(200, generator=g).to(DEVICE)
    out, new_res = fused_add_rms_norm(x, res, w, EPS)
    assert torch.equal(new_res, x + res)
    torch.testing.assert_close(out.double(), float64_norm(x + res, w), atol=1e-5, rtol=1e-5)


def test_float16_rounding_order_matches_eager():
    g = torch.Generator().manual_seed(2)
    x, res = ((3 * torch.randn(9, 320, generator=g)).half().to(DEVICE) for _ in range(2))
    w = (1 + 0.3 * torch.randn(320, generator=g)).half().to(DEVICE)
    norm = eager_norm(w)
    with torch.no_grad():
        assert ulp_distance(rms_norm(x, w, EPS), norm(x)) <= 2
        out, new_res = fused_add_rms_norm(x, res, w, EPS)
        ref_out, ref_res = norm(x, res)
    assert torch.equal(new_res, ref_res)  # the sum is rounded to fp16 first, like eager
    assert ulp_distance(out, ref_out) <= 2


def test_strided_head_view_and_in_place():
    # Qwen3 q-norm: q is a [T, H, D] view into the fused qkv output (not one row stride).
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 8 * 32, generator=g).to(DEVICE)
    q = qkv[:, : 4 * 32].view(5, 4, 32)
    w = torch.randn(32, generator=g).to(DEVICE)
    expected = float64_norm(q, w)
    torch.testing.assert_close(rms_norm(q, w, EPS).double(), expected, atol=1e-5, rtol=1e-5)
    untouched = qkv[:, 4 * 32:].clone()
    rms_norm(q, w, EPS, out=q)  # in place on the view
    torch.testing.assert_close(q.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, 4 * 32:], untouched)
    x, res = torch.randn(4, 64, device=DEVICE), torch.randn(4, 64, device=DEVICE)
    want = float64_norm(x + res, torch.ones(64))
    summed = x + res
    out, new_res = fused_add_rms_norm(x, res, torch.ones(64, device=DEVICE), EPS, out=x, residual_out=res)
    assert out is x and new_res is res and torch.equal(res, summed)
    torch.testing.assert_close(x.double(), want.to(x.device), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_clear_errors():
    x = torch.randn(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(8, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="float16"):
        fused_add_rms_norm(x, x.half(), torch.ones(16, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="T, N"):
        rms_norm(torch.randn(2, 2, 2, 16, device=DEVICE), torch.ones(16, device=DEVICE), EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2048])
def test_gpu_llama8b_shapes(dtype, tokens):
    x, res = ((2 * torch.randn(tokens, 4096, device="cuda")).to(dtype) for _ in range(2))
    w = (1 + 0.2 * torch.randn(4096, device="cuda")).to(dtype)
    norm = eager_norm(w)
    with torch.no_grad():
        assert ulp_distance(rms_norm(x, w, EPS), norm(x)) <= 2
        out, new_res = fused_add_rms_norm(x, res, w, EPS)
        ref_out, ref_res = norm(x, res)
    assert torch.equal(new_res, ref_res)
    assert ulp_distance(out, ref_out) <= 2
    q = torch.randn(tokens, 32, 128, device="cuda").to(dtype)  # Qwen3-style q-norm
    with torch.no_grad():
        assert ulp_distance(rms_norm(q, w[:128], EPS), eager_norm(w[:128])(q)) <= 2
