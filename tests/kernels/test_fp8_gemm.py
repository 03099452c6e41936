"""fp8 (e4m3) products: the per-token activation rounding kernel against the torch
reference, the row-scaled fp8-weight GEMV against float64, and ``torch._scaled_mm`` on the
GPU against float64 of the rounded operands (on the CPU through Triton's interpreter where a
kernel is Triton's, at small odd shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quant.rtn import quantize_fp8
from hearth_kernels.fp8 import quantize_rows, quantize_rows_reference, scaled_mm
from hearth_kernels.gemv import gemv
from tests.kernels.reference import DEVICE


@pytest.mark.parametrize("m,k,swiglu", [(1, 48, False), (3, 300, False), (4, 5000, False), (2, 96, True),
                                        (3, 4100, True), (2, 17000, True)])  # the last: two passes
def test_the_rounding_kernel_matches_the_reference(m, k, swiglu):
    g = torch.Generator(device=DEVICE).manual_seed(k)
    x = torch.randn(m, 2 * k if swiglu else k, device=DEVICE, generator=g) * 3
    x[0, :] *= 1e-3  # rows of very different sizes
    q, s = quantize_rows(x, swiglu=swiglu)
    rq, rs = quantize_rows_reference(x, swiglu=swiglu)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (m, 1)
    if not swiglu:
        assert torch.equal(s, rs)
        assert torch.equal(q.float(), rq.float())  # the same values (a tiny negative may be +0 or -0)
    else:  # silu as x / (1 + exp(-x)) against torch's: a float32 ulp apart, so a tie may fall either way
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
        assert (q.float() == rq.float()).float().mean().item() > 0.999


def test_the_rounding_is_exact_at_ties_binade_edges_and_subnormals():
    """Every e4m3 value, every midpoint between neighbours (ties: to even), each nudged by a
    float32 ulp either way, and values below e4m3's subnormals: one row whose largest value
    is 448, so the scale is 1 and the kernel rounds them as they are."""
    grid = torch.tensor(sorted({float(v) for v in torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
                                .float().tolist() if abs(v) <= 448}), dtype=torch.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    probes = torch.cat([grid, mids, torch.nextafter(mids, torch.tensor(-1e9)), torch.nextafter(mids, torch.tensor(1e9)),
                        torch.tensor([2.0 ** -10, -(2.0 ** -10), 2.0 ** -12, 1e-30, 448.0])])
    x = probes.to(DEVICE).unsqueeze(0)
    q, s = quantize_rows(x)
    assert s.item() == 1.0
    assert torch.equal(q[0].float().cpu(), probes.to(torch.float8_e4m3fn).float())


def test_the_rounding_kernel_takes_bf16_and_a_strided_row():
    x = torch.randn(3, 200, device=DEVICE).to(torch.bfloat16)[:, :128]
    q, s = quantize_rows(x)
    rq, rs = quantize_rows_reference(x)
    torch.testing.assert_close(s, rs)
    assert (q.float() == rq.float()).float().mean() > 0.99  # (Triton's interpreter widens bf16 inexactly)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [True, False])
def test_the_norm_rounds_its_rows_like_the_norm_then_quantize_rows(dtype, residual):
    """``norm_quantize_rows``: the same bytes, scales and residual stream as the RMSNorm kernel
    (with its residual add) then ``quantize_rows``; a zero row stays zeros."""
    from hearth_kernels.fp8 import norm_quantize_rows
    from hearth_kernels.rmsnorm import fused_add_rms_norm, rms_norm

    g = torch.Generator(device=DEVICE).manual_seed(3)
    mags = torch.tensor([[1e-3], [1.0], [30.0], [0.0], [5.0]], device=DEVICE)
    x = (torch.randn(5, 200, device=DEVICE, generator=g) * mags).to(dtype)
    r = (torch.randn(5, 200, device=DEVICE, generator=g) * mags).to(dtype) if residual else None
    w = (1 + 0.1 * torch.randn(200, device=DEVICE, generator=g)).to(dtype)
    q, s, stream = norm_quantize_rows(x, w, 1e-5, r)
    h, want_stream = fused_add_rms_norm(x, r, w, 1e-5) if residual else (rms_norm(x, w, 1e-5), x)
    want_q, want_s = quantize_rows(h)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    assert torch.equal(stream, want_stream) and (residual or stream is x)
    assert torch.equal(q[3].float(), torch.zeros(200, device=DEVICE))  # (its residual row is zero too)
    with pytest.raises(ValueError, match="residual like x"):
        norm_quantize_rows(x, w, 1e-5, x[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_prompt_path_rounding_of_bf16_on_the_gpu():
    x = (3 * torch.randn(37, 2 * 14336, device="cuda")).to(torch.bfloat16)
    q, s = quantize_rows(x[:, :14336])
    rq, rs = quantize_rows_reference(x[:, :14336])
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())
    # SwiGLU fused: silu as g / (1 + exp(-g)) against torch's, rounded to bf16, may differ by a bf16 ulp
    q, s = quantize_rows(x, swiglu=True)
    rq, rs = quantize_rows_reference(x, swiglu=True)
    torch.testing.assert_close(s, rs, rtol=1e-2, atol=0)
    assert (q.float() == rq.float()).float().mean().item() > 0.99


@pytest.mark.parametrize("n,k,config", [(37, 100, None), (300, 1000, None), (9, 530, (8, 128, 2)),
                                        (64, 2048, (2, 2048, 8))])
@pytest.mark.parametrize("swiglu", [False, True])
def test_the_fp8_weight_gemv_matches_float64(n, k, config, swiglu):
    g = torch.Generator(device=DEVICE).manual_seed(n + k)
    x = torch.randn(1, 2 * k if swiglu else k, device=DEVICE, generator=g)
    qw = quantize_fp8(torch.randn(n, k, device=DEVICE, generator=g) * 0.02)
    bias = torch.randn(n, device=DEVICE, generator=g)
    y = gemv(x, qw.qweight, bias, swiglu=swiglu, config=config, scale=qw.scales)
    xin = x.double() if not swiglu else F.silu(x.double()[:, :k]) * x.double()[:, k:]
    ref = F.linear(xin, qw.dequantize(torch.float64), bias.double())
    torch.testing.assert_close(y.double(), ref, atol=1e-4 * k ** 0.5, rtol=1e-4)


def test_the_gemv_refuses_a_bad_scale():
    qw = quantize_fp8(torch.randn(8, 32, device=DEVICE))
    with pytest.raises(ValueError, match="row scales"):
        gemv(torch.randn(1, 32, device=DEVICE), qw.qweight, scale=qw.scales.half())
    with pytest.raises(ValueError, match="x is"):
        gemv(torch.randn(1, 32, device=DEVICE), qw.qweight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp8 tensor cores)")
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (7, 1024, 4096), (64, 4096, 4096), (300, 6144, 4096),
                                   (33, 4096, 14336)])
def test_scaled_mm_on_the_gpu_matches_float64_of_the_rounded_operands(m, n, k):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability 8.9+")
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    qw = quantize_fp8(torch.randn(n, k, device="cuda", generator=g) * 0.02)
    xq, xs = quantize_rows(x)
    y = scaled_mm(xq, xs, qw.qweight, qw.scales, torch.bfloat16)
    ref = (xq.double() * xs.double()) @ qw.dequantize(torch.float64).t()
    assert y.dtype == torch.bfloat16
    # fp32 accumulation in the tensor cores (their partial sums promoted to fp32), one bf16 rounding
    torch.testing.assert_close(y.double(), ref, atol=1e-3 * ref.abs().max().item(), rtol=8e-3)


@pytest.mark.parametrize("n,k,config", [(37, 100, (16, 2, 4, 3)), (300, 1000, (8, 4, 2, 2)), (64, 2048, (64, 8, 8, 1)),
                                        (9, 530, (4, 3, 1, 3))])
@pytest.mark.parametrize("swiglu", [False, True])
def test_the_x_stationary_fp8_gemv_matches_float64(n, k, config, swiglu):
    from hearth_kernels.fp8 import fp8_gemv_rows

    g = torch.Generator(device=DEVICE).manual_seed(3 * n + k)
    x = torch.randn(1, 2 * k if swiglu else k, device=DEVICE, generator=g)
    qw = quantize_fp8(torch.randn(n, k, device=DEVICE, generator=g) * 0.02)
    bias = torch.randn(n, device=DEVICE, generator=g)
    out = torch.full((1, n), float("nan"), device=DEVICE)
    y = fp8_gemv_rows(x, qw.qweight, qw.scales, bias, swiglu=swiglu, config=config, out=out)
    assert y is out
    xin = x.double() if not swiglu else F.silu(x.double()[:, :k]) * x.double()[:, k:]
    ref = F.linear(xin, qw.dequantize(torch.float64), bias.double())
    torch.testing.assert_close(y.double(), ref, atol=1e-4 * k ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("m,n,k,config", [(1, 72, 512, (16, 128, 1, 1, 1)), (3, 40, 256, (32, 128, 2, 2, 2)),
                                          (17, 24, 512, (16, 256, 1, 2, 2)), (40, 64, 256, (64, 128, 4, 2, 1))])
@pytest.mark.parametrize("swiglu", [False, True])
def test_the_weight_stationary_fp8_product_is_scaled_mms(m, n, k, config, swiglu):
    """``fp8_mma``: x rounded per token by ``quantize_rows``, then the e4m3 product on the
    tensor cores, scaled (the interpreter multiplies the same e4m3 values in fp32)."""
    from hearth_kernels.fp8 import fp8_mma

    g = torch.Generator(device=DEVICE).manual_seed(m + n + k)
    x = torch.randn(m, 2 * k if swiglu else k, device=DEVICE, generator=g).to(torch.bfloat16)
    qw = quantize_fp8(torch.randn(n, k, device=DEVICE, generator=g) * 0.02)
    bias = torch.randn(n, device=DEVICE, generator=g).to(torch.bfloat16)
    y = fp8_mma(x, qw.qweight, qw.scales, bias, swiglu=swiglu, config=config)
    xq, xs = quantize_rows(x, swiglu=swiglu)
    ref = (xq.double() * xs.double()) @ qw.dequantize(torch.float64).t() + bias.double()
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, atol=1e-3 * ref.abs().max().item(), rtol=8e-3)


def test_fp8_mma_refuses_what_it_cannot_run():
    from hearth_kernels.fp8 import FP8_MMA_CONFIGS, fp8_mma, fp8_mma_fits

    qw = quantize_fp8(torch.randn(16, 256, device=DEVICE) * 0.02)
    x = torch.randn(1, 256, device=DEVICE).to(torch.bfloat16)
    assert fp8_mma_fits(4096, FP8_MMA_CONFIGS[0]) and fp8_mma_fits(14336, FP8_MMA_CONFIGS[0])
    assert not fp8_mma_fits(4096 + 128, FP8_MMA_CONFIGS[0])  # 17 steps of 256: not even
    with pytest.raises(ValueError, match="step evenly"):
        fp8_mma(x, qw.qweight, qw.scales, config=(16, 256, 1, 1, 2))
    with pytest.raises(ValueError, match="1 to 64 rows"):
        fp8_mma(torch.zeros(65, 256, device=DEVICE).to(torch.bfloat16), qw.qweight, qw.scales)
    with pytest.raises(ValueError, match="float32 row scales"):
        fp8_mma(x, qw.qweight, qw.scales.half())


@pytest.mark.parametrize("config", [(8, 128, 2), (4, 3, 1, 3)], ids=["k-loop", "x-stationary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_act_first_is_the_fused_swiglu_product(config, dtype):
    """``Fp8Kernel(config, act_first=True)`` (the tuner's twin of a SwiGLU-down GEMV config):
    the layer's act once, then the GEMV without SwiGLU; the product of the same rounded
    activation as the fused kernel's, against float64 of that activation; a layer without
    SwiGLU runs as the plain config; the twins are offered for gated layers only."""
    from types import SimpleNamespace

    from engine.layers.linear_kernels import silu_and_mul_reference
    from engine.layers.quant_kernels import Fp8Kernel, kernel_candidates

    n, k = 40, 384
    g = torch.Generator(device=DEVICE).manual_seed(11)
    x = torch.randn(1, 2 * k, device=DEVICE, generator=g).to(dtype)
    qw = quantize_fp8(torch.randn(n, k, device=DEVICE, generator=g) * 0.02)
    bias = torch.randn(n, device=DEVICE, generator=g).to(dtype)
    layer = SimpleNamespace(qweight=qw.qweight, scales=qw.scales, bias=bias, act=silu_and_mul_reference,
                            in_features=k, out_features=n, fmt="e4m3")
    first = Fp8Kernel(config, act_first=True)
    assert first.name.endswith(" act first") and first.scratch_bytes(layer, 1, 2) == 2 * k
    y = first.one_row(x, layer)
    fused = Fp8Kernel(config).one_row(x, layer)
    xin = silu_and_mul_reference(x).double()  # rounded to dtype, like the fused kernel's activation
    ref = F.linear(xin, qw.dequantize(torch.float64), bias.double())
    tol = dict(atol=1e-4 * k ** 0.5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(y.double(), fused.double(), **tol)
    plain = SimpleNamespace(**{**vars(layer), "act": None})
    torch.testing.assert_close(first.one_row(x[:, :k], plain), Fp8Kernel(config).one_row(x[:, :k], plain))
    assert first.scratch_bytes(plain, 1, 2) == 0 and first.scratch_bytes(layer, 4, 2) == 2 * k
    assert Fp8Kernel(config).scratch_bytes(layer, 1, 2) == 0
    with pytest.raises(ValueError, match="GEMV config"):
        Fp8Kernel((64, 256, 4, 4, 4), act_first=True)
    # the candidates (a layer on a GPU: only its device is read to decide)
    on_gpu = SimpleNamespace(**{**vars(layer), "qweight": SimpleNamespace(device=torch.device("cuda"))})
    names = [c.name for c in kernel_candidates(on_gpu)]
    twins = [c for c in names if c.endswith(" act first")]
    assert twins and all(c.removesuffix(" act first") in names and " mma " not in c for c in twins)
    on_gpu.act = None
    assert not [c for c in (c.name for c in kernel_candidates(on_gpu)) if c.endswith(" act first")]
