"""silu(gate) * up vs the eager reference F.silu(gate) * up (same rounding order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hearth_kernels.activation import silu_and_mul
from tests.kernels.reference import DEVICE, ulp_distance


def reference(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("tokens,inter", [(1, 48), (7, 96), (3, 1500)])
def test_float32_matches_float64(tokens, inter):
    x = 3 * torch.randn(tokens, 2 * inter, device=DEVICE)
    out = silu_and_mul(x)
    assert out.shape == (tokens, inter)
    torch.testing.assert_close(out.double(), reference(x.double()), atol=1e-5, rtol=1e-5)


def test_float16_within_two_ulps_of_eager():
    x = (3 * torch.randn(300, 2 * 200, device=DEVICE)).half()
    assert ulp_distance(silu_and_mul(x), reference(x)) <= 2  # exp() may differ by an ulp


def test_strided_rows_and_out_buffer():
    big = torch.randn(4, 300, device=DEVICE)
    x = big[:, :200]  # row stride 300
    out = torch.empty(4, 100, device=DEVICE)
    assert silu_and_mul(x, out=out) is out
    torch.testing.assert_close(out.double(), reference(x.double()), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="2\\*I"):
        silu_and_mul(torch.randn(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        silu_and_mul(torch.randn(3, 8, device=DEVICE), out=torch.empty(3, 3, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2048])
def test_gpu_llama8b_shapes(dtype, tokens):
    x = (3 * torch.randn(tokens, 2 * 14336, device="cuda")).to(dtype)
    assert ulp_distance(silu_and_mul(x), reference(x)) <= 2  # exp() may differ by an ulp
