"""The dp4a batch-1 GEMV (kernels/quant_dp4a.py), checked two ways:

- against ``dp4a_reference``: x quantized per block of 32 as the kernel does, integer dots
  exact, scaling in float64. The kernel sums each block's integer dot exactly, so the only
  differences are its fp32 scaling and block sums and one rounding to the output dtype:
  ``u * |y| + 2^-20 * S`` (S: the sum of the scaled terms' magnitudes);
- against the float64 product of the dequantized weights and the unquantized x: the
  activations' 8-bit rounding adds at most ``max|x_block| / 254`` per input, so the error is
  bounded by ``sum_k |w_k| * amax(block(k)) / 254`` (plus the output rounding).

On CPU it runs in the Triton interpreter, where dp4a is the same integer arithmetic in
Triton ops; the GPU test runs the inline PTX at a Llama shape.
"""

from __future__ import annotations

import pytest
import torch

from hearth_kernels.activation import silu_and_mul
from hearth_kernels.quant_dp4a import dp4a_launch, dp4a_reference
from hearth_kernels.quant_gemv import DP4A, GemvConfig, quant_gemv, quant_gemv_configs
from tests.kernels.reference import DEVICE
from tests.kernels.test_quant_gemv import UNIT, make_weight, poisoned_runs, rand_x

SMALL = GemvConfig(16, 2, 1, DP4A, 2)  # 16 rows per program in steps of 2 (N=40: a partial program)


def check_exact(y, x, prep, bias=None, swiglu=False, levels=0):
    """``levels``: activation levels each input may differ by (the GPU build's fp32 division
    and a fused multiply-add may put an input exactly on a rounding boundary one level away
    from the host's float32 arithmetic; the interpreter does the host's arithmetic)."""
    ref = dp4a_reference(x, prep, bias=bias, swiglu=swiglu)
    assert y.shape == ref.shape
    scale = _term_sizes(x, prep, bias, swiglu)
    tol = UNIT[y.dtype] * ref.abs() + 2.0 ** -20 * scale + 1e-30
    if levels:
        xe = (silu_and_mul(x) if swiglu else x).double()
        step = (xe.abs().reshape(-1, 32).amax(dim=1) / 127).repeat_interleave(32)[None]  # [1, K]
        centre = 8 if prep.bits == 4 else 0
        w = _dequantized(prep) - (0 if prep.mins is None else _mins(prep)) - centre * _scales(prep)
        tol = tol + levels * (w.abs() * step).sum(dim=1)[None]
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.3g}"
    return ref


def _term_sizes(x, prep, bias, swiglu):
    xe = silu_and_mul(x) if swiglu else x
    w = _dequantized(prep)
    s = xe.double().abs() @ w.abs().T
    return s + (0 if bias is None else bias.double().abs())


def _scales(prep) -> torch.Tensor:
    g = torch.arange(prep.in_features, device=prep.scales.device) // prep.group_size
    return prep.scales.double()[:, g]


def _mins(prep) -> torch.Tensor:
    g = torch.arange(prep.in_features, device=prep.mins.device) // prep.group_size
    return prep.mins.double()[:, g]


def _dequantized(prep) -> torch.Tensor:
    from hearth_kernels.quant_dp4a import _codes

    codes = _codes(prep).double()
    g = torch.arange(codes.shape[1], device=codes.device) // prep.group_size
    w = codes * prep.scales.double()[:, g]
    if prep.mins is not None:
        w += prep.mins.double()[:, g]
    return w


def check_against_float(y, x_eff, qw, typical=True):
    """Within the activation-rounding bound of the float64 product of the unquantized x and
    the canonical weight (``QuantizedWeight.dequantize``: independent of the kernels' code
    layout), and, with ``typical`` (x without outliers), the bound and the error are small."""
    w = qw.dequantize(torch.float64)
    xd = x_eff.double()
    ref = xd @ w.T
    amax = xd.abs().reshape(-1, 32).amax(dim=1).repeat_interleave(32)[None]  # [1, K]: each input's block max
    bound = (w.abs() * amax).sum(dim=1)[None] / 254 + UNIT[y.dtype] * ref.abs() + 2.0 ** -20 * (xd.abs() @ w.abs().T)
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"worst err/bound {(err / bound).max().item():.3g}"
    if not typical:
        return
    # not vacuous: the worst case is about 1% of the terms' magnitudes, and the typical
    # error (rounding errors of random sign) far below the result's size
    assert float(bound.mean()) < 0.02 * float((xd.abs() @ w.abs().T).mean())
    assert float(err.pow(2).mean().sqrt()) < 0.01 * float(ref.pow(2).mean().sqrt())


@pytest.mark.parametrize("bits,n,k,group,mins,dtype", [
    (4, 40, 64, 32, True, torch.bfloat16), (4, 72, 192, 64, True, torch.float16),
    (4, 40, 96, 96, True, torch.float32), (8, 40, 96, 96, False, torch.bfloat16),
    (8, 72, 192, 32, True, torch.bfloat16), (8, 72, 192, 16, True, torch.bfloat16),
    (8, 40, 96, 16, False, torch.float16)])
def test_dp4a_gemv_matches_the_exact_integer_reference(bits, n, k, group, mins, dtype):
    qw, prep = make_weight(bits, n, k, group, mins=mins, seed=n + k + bits)
    x = 3 * rand_x(1, k, dtype)
    y = quant_gemv(x, prep, config=SMALL)
    check_exact(y, x, prep)
    check_against_float(y, x, qw)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 192), (8, 16)])
def test_dp4a_gemv_swiglu_bias_and_out(bits, group):
    n, k = 72, 192
    _, prep = make_weight(bits, n, k, group)
    gate_up = 3 * rand_x(1, 2 * k, torch.bfloat16)
    bias = rand_x(1, n, torch.bfloat16, seed=5)[0]
    out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    assert quant_gemv(gate_up, prep, config=SMALL, swiglu=True, out=out, bias=bias) is out
    check_exact(out, gate_up, prep, bias=bias, swiglu=True)


@pytest.mark.parametrize("bits,group,swiglu", [(4, 32, False), (4, 128, True), (8, 2560, True), (8, 32, False),
                                               (8, 16, True)])
def test_dp4a_split_k_sums_the_splits_in_order(bits, group, swiglu):
    """K split among programs (the last to arrive adds the partial sums in split order):
    the exact integer reference, with K not a power of 2 (a split past the end reads
    nothing), N not a multiple of the rows per program, a bias; a second call gives the
    same bits (the counters were left zeroed)."""
    n, k = 44, 2560
    _, prep = make_weight(bits, n, k, group, mins=bits == 4 or group == 16, seed=7)
    x = 3 * rand_x(1, 2 * k if swiglu else k, torch.bfloat16)
    bias = rand_x(1, n, torch.bfloat16, seed=8)[0]
    for split in (2, 4):
        cfg = GemvConfig(8, 4, 1, DP4A, 2, split)
        y = quant_gemv(x, prep, config=cfg, swiglu=swiglu, bias=bias)
        check_exact(y, x, prep, bias=bias, swiglu=swiglu, levels=1 if DEVICE == "cuda" else 0)
        assert torch.equal(quant_gemv(x, prep, config=cfg, swiglu=swiglu, bias=bias), y)


def _rel_rms(a, b) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt())


def _exact_product(s, weight, eps, prep, bias=None):
    """float64: the dequantized weight times RMSNorm(s), nothing rounded."""
    sd = s.double()
    xn = weight.double() * sd * torch.rsqrt(sd.pow(2).mean() + eps)
    y = xn @ _dequantized(prep).T
    return y if bias is None else y + bias.double()


def _norm_reference(x, residual, weight, eps):
    """(RMSNorm(x + residual), x + residual) by Hearth's reference norm (torch ops)."""
    from engine.layers.norm import RMSNorm

    norm = RMSNorm(x.shape[1], eps, dtype=x.dtype, device=x.device)
    norm.weight.data.copy_(weight)
    return (norm(x), x) if residual is None else norm(x, residual)


@pytest.mark.parametrize("bits,n,k,group,dtype", [(4, 40, 192, 64, torch.bfloat16), (8, 72, 160, 160, torch.bfloat16),
                                                  (4, 40, 96, 32, torch.float32), (8, 40, 64, 32, torch.float16),
                                                  (8, 40, 160, 16, torch.bfloat16)])
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add+norm"])
def test_dp4a_rmsnorm_prologue(bits, n, k, group, dtype, add):
    """The RMSNorm (after the residual add) in the dp4a kernel's prologue: the product is the
    exact integer reference's for the reference norm's output (within one activation level
    of it: the mean of squares is summed in another order), the new residual stream is the
    rounded sum bit for bit (a new tensor; the inputs untouched), and K not a power of 2
    pads nothing into the mean."""
    from hearth_kernels.quant_gemv import quant_gemv_normed

    _, prep = make_weight(bits, n, k, group, mins=bits == 4 or group == 16, seed=k + bits)
    x = 3 * rand_x(1, k, dtype)
    residual = rand_x(1, k, dtype, seed=2) if add else None
    weight = (1 + 0.2 * rand_x(1, k, torch.float32, seed=3)[0]).to(dtype)
    bias = rand_x(1, n, dtype, seed=4)[0]
    keep = (x.clone(), None if residual is None else residual.clone())
    from hearth_kernels.rmsnorm import fused_add_rms_norm, rms_norm

    y, s = quant_gemv_normed(x, prep, weight, 1e-5, residual=residual, config=SMALL, bias=bias)
    h2, s2 = (rms_norm(x, weight, 1e-5), x) if residual is None else fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(s, s2)  # the norm kernel's residual stream, bit for bit
    if dtype != torch.bfloat16 or DEVICE == "cuda":  # (Triton's interpreter truncates to bf16)
        assert torch.equal(s, _norm_reference(x, residual, weight, 1e-5)[1])
    h = _norm_reference(s, None, weight, 1e-5)[0]
    check_exact(y, h, prep, bias=bias, levels=1)
    assert torch.equal(x, keep[0]) and (residual is None or torch.equal(residual, keep[1]))
    if add:
        assert s.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    # and no further from the float64 product of the unrounded norm than the two kernels it
    # replaces (which round the normalised x to the dtype first): the bound above allows a
    # level per input, this catches a wrong mean (e.g. over the padded K)
    y2 = quant_gemv(h2, prep, config=SMALL, bias=bias)
    check_exact(y2, h, prep, bias=bias, levels=1)
    exact = _exact_product(s, weight, 1e-5, prep, bias)
    assert _rel_rms(y, exact) <= 1.25 * _rel_rms(y2, exact) + 1e-4


def test_dp4a_rmsnorm_prologue_small_inputs_feel_eps():
    """Inputs so small that eps is most of the mean of squares: the norm's eps is in the
    kernel's scale (without it the product is several times larger)."""
    from hearth_kernels.quant_gemv import quant_gemv_normed

    n, k = 40, 128
    _, prep = make_weight(8, n, k, 32, mins=False, seed=11)
    x = 1e-3 * rand_x(1, k, torch.float32)
    weight = torch.ones(k, device=DEVICE)
    y, s = quant_gemv_normed(x, prep, weight, 1e-5, config=SMALL)
    exact = _exact_product(s, weight, 1e-5, prep)
    assert _rel_rms(y, exact) < 0.02
    assert _rel_rms(y, _exact_product(s, weight, 0.0, prep)) > 0.5


def test_the_engine_kernel_takes_the_norm_with_the_projection_bias():
    """``TritonQuant`` as the engine binds it (here by hand, on the interpreter): it takes
    the fused plan's norm for a dp4a config, not for another config or the reference norm,
    and ``normed`` gives the two calls' product, bias included, with and without a residual."""
    from types import SimpleNamespace

    from engine.layers.linear import norm_then_project
    from engine.layers.norm import RMSNorm, TritonRMSNorm
    from engine.layers.quant_kernels import TritonQuant

    n, k = 40, 160
    _, prep = make_weight(4, n, k, 32, seed=12)
    layer = SimpleNamespace(bias=rand_x(1, n, torch.bfloat16, seed=6)[0], perm=None, act=None, dtype=torch.bfloat16)
    plain = RMSNorm(k, 1e-5, dtype=torch.bfloat16, device=DEVICE)
    plain.weight.data.copy_((1 + 0.2 * rand_x(1, k, torch.float32, seed=7)[0]).to(torch.bfloat16))
    fused = TritonRMSNorm(plain)

    def bound(config):
        kernel = TritonQuant(config)
        kernel.prepared, kernel._gemv = prep, quant_gemv
        return kernel

    kernel = bound(SMALL)
    assert kernel.fuses_norm(layer, fused) and not kernel.fuses_norm(layer, plain)
    assert not bound(GemvConfig(8, 64, 2, 0, 1)).fuses_norm(layer, fused)
    # the tuner's other way to run a prologue-norm config: the norm kernel first
    first = kernel.with_norm_first()
    first.prepared = prep
    assert first.norm_first and not first.fuses_norm(layer, fused) and first.name.endswith("norm first")
    assert first.with_norm_first() is None and TritonQuant(SMALL._replace(qx=1)).with_norm_first() is None
    assert TritonQuant(GemvConfig(8, 4, 1, DP4A, 2, 2)).with_norm_first() is None  # K split: never in the prologue
    x = 3 * rand_x(1, k, torch.bfloat16)
    for residual in (None, rand_x(1, k, torch.bfloat16, seed=8)):
        y, s = kernel.normed(x, layer, residual, fused)
        y2, s2 = norm_then_project(lambda h: kernel(h, layer), x, residual, fused)
        assert torch.equal(s, s2)
        exact = _exact_product(s, plain.weight, 1e-5, prep, layer.bias)
        assert _rel_rms(y, exact) <= 1.25 * _rel_rms(y2, exact) + 1e-4
        assert _rel_rms(y, exact) < 0.02


def test_dp4a_rmsnorm_prologue_other_configs_run_the_norm_first():
    """A config that can't hold the row in one program (K split), or another kernel kind,
    runs the norm kernel and then the GEMV: bit for bit the two calls; bad arguments say
    what is wrong."""
    from hearth_kernels.quant_gemv import norm_fusable, quant_gemv_normed
    from hearth_kernels.rmsnorm import fused_add_rms_norm

    n, k = 40, 2048
    _, prep = make_weight(8, n, k, 64, mins=False, seed=9)
    x, residual = rand_x(1, k, torch.bfloat16), rand_x(1, k, torch.bfloat16, seed=2)
    weight = torch.ones(k, dtype=torch.bfloat16, device=DEVICE)
    assert norm_fusable(prep, SMALL) and not norm_fusable(prep, None)
    for cfg in (GemvConfig(8, 4, 1, DP4A, 2, 2), GemvConfig(8, 64, 2, 0, 1)):
        assert not norm_fusable(prep, cfg)
        y, s = quant_gemv_normed(x, prep, weight, 1e-6, residual=residual, config=cfg)
        h, s2 = fused_add_rms_norm(x, residual, weight, 1e-6)
        assert torch.equal(s, s2) and torch.equal(y, quant_gemv(h, prep, config=cfg))
    with pytest.raises(ValueError, match="norm's weight"):
        quant_gemv_normed(x, prep, weight[:-32], 1e-6, config=SMALL)
    with pytest.raises(ValueError, match="residual must be"):
        quant_gemv_normed(x, prep, weight, 1e-6, residual=residual.float(), config=SMALL)


@pytest.mark.parametrize("bits,group,swiglu,split,mins", [(4, 32, False, 1, True), (4, 128, True, 2, True),
                                                          (8, 16, True, 2, True), (8, 16, False, 1, False),
                                                          (8, 2560, True, 1, False), (8, 32, False, 4, True)])
def test_dp4a_x_quantized_once_is_the_same_product(bits, group, swiglu, split, mins):
    """``qx`` configs: one kernel quantizes x (SwiGLU first) and every program reads it. The
    product is the exact integer reference's, and (on the interpreter, the same float32
    arithmetic) the per-program path's bit for bit; K not a power of 2, a bias, K split."""
    from hearth_kernels.quant_dp4a import quantize_x_blocks

    n, k = 44, 2560
    _, prep = make_weight(bits, n, k, group, mins=mins, seed=17)
    x = 3 * rand_x(1, 2 * k if swiglu else k, torch.bfloat16)
    bias = rand_x(1, n, torch.bfloat16, seed=8)[0]
    cfg = GemvConfig(8, 4, 1, DP4A, 2, split, 1)
    y = quant_gemv(x, prep, config=cfg, swiglu=swiglu, bias=bias)
    check_exact(y, x, prep, bias=bias, swiglu=swiglu, levels=1 if DEVICE == "cuda" else 0)
    if DEVICE != "cuda":
        assert torch.equal(y, quant_gemv(x, prep, config=cfg._replace(qx=0), swiglu=swiglu, bias=bias))
    # the quantized blocks themselves: dp4a_reference's levels and scales
    words, terms = quantize_x_blocks(x, bits, swiglu)
    xe = (silu_and_mul(x) if swiglu else x).float().reshape(-1, 32)
    amax = xe.abs().amax(dim=1)
    xq = torch.floor(xe * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))[:, None] + 0.5)
    # (a GPU's fp32 division and fused multiply-adds may land an input a level away: check_exact)
    ulp = 0 if DEVICE != "cuda" else 2.0 ** -22
    assert bool(((terms[:, 0] - amax / 127.0).abs() <= ulp * amax / 127.0).all())
    codes = words.view(torch.int8).reshape(-1, 32).float()  # bytes of the words, little-endian
    order = list(range(32))  # int8: byte b of word j is input 4j + b
    if bits == 4:  # byte b of word j: input 8j + 2b (the even inputs' 4 words), then the odd ones'
        order = [8 * (b // 4) + 2 * (b % 4) if b < 16 else 8 * ((b - 16) // 4) + 2 * (b % 4) + 1 for b in range(32)]
    off = (codes - xq[:, order]).abs()
    assert bool((off <= (1 if DEVICE == "cuda" else 0)).all()) and float(off.mean()) < 0.01
    assert torch.allclose(terms[:, 1], xe.double().sum(dim=1).float(), rtol=1e-5, atol=1e-5 * float(xe.abs().max()))
    if bits == 4:
        assert torch.equal(terms[:, 2], codes.sum(dim=1))
    if bits == 8:  # x's float sums per half block too, for weights in groups of 16 (any int8 group reads it)
        want = xe.double().reshape(-1, 2, 16).sum(dim=2).float()
        assert torch.allclose(terms[:, 2:4], want, rtol=1e-5, atol=1e-5 * float(xe.abs().max()))
        # so one quantized x serves an int8 weight of any group: per channel and in groups of 16
        from hearth_kernels.quant_dp4a import quant_gemv_dp4a

        xin = silu_and_mul(x) if swiglu else x
        for g in (k, 16):
            _, p8 = make_weight(8, n, k, g, mins=g == 16, seed=g)
            out = torch.empty(1, n, dtype=torch.bfloat16, device=DEVICE)
            quant_gemv_dp4a(xin, p8, out, None, False, 8, 4, 1, 2, qx=(words, terms))
            check_exact(out, xin, p8, levels=1 if DEVICE == "cuda" else 0)
    with pytest.raises(ValueError, match="not both"):
        quantize_x_blocks(x, bits, True, (None, torch.ones(k, device=DEVICE), 1e-5, None))


@pytest.mark.parametrize("bits,split,group", [(4, 1, 32), (8, 2, 32), (8, 1, 16)])
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add+norm"])
def test_dp4a_norm_in_the_quantizing_kernel(bits, split, group, add):
    """``qx`` configs take the norm into the kernel that quantizes x: the same product as
    the norm in the GEMV's prologue (bit for bit on the interpreter, one activation level
    on a GPU), the residual stream bit for bit, K split allowed."""
    from hearth_kernels.quant_gemv import norm_fusable, quant_gemv_normed

    n, k = 40, 2080
    _, prep = make_weight(bits, n, k, group, mins=bits == 4 or group == 16, seed=21)
    x = 3 * rand_x(1, k, torch.bfloat16)
    residual = rand_x(1, k, torch.bfloat16, seed=2) if add else None
    weight = (1 + 0.2 * rand_x(1, k, torch.float32, seed=3)[0]).to(torch.bfloat16)
    cfg = GemvConfig(8, 4, 1, DP4A, 2, split, 1)
    assert norm_fusable(prep, cfg) and (split == 1 or not norm_fusable(prep, cfg._replace(qx=0)))
    y, s = quant_gemv_normed(x, prep, weight, 1e-5, residual=residual, config=cfg)
    y1, s1 = quant_gemv_normed(x, prep, weight, 1e-5, residual=residual, config=SMALL)
    assert torch.equal(s, s1)
    h = _norm_reference(s, None, weight, 1e-5)[0]
    check_exact(y, h, prep, levels=1)
    if DEVICE != "cuda":
        assert torch.equal(y, y1)
    exact = _exact_product(s, weight, 1e-5, prep)
    assert _rel_rms(y, exact) <= 1.25 * _rel_rms(quant_gemv(h, prep, config=cfg), exact) + 1e-4


def test_blocks_of_zeros_outliers_and_partial_rows():
    """A block of x that is all zero (its scale would divide by zero), one with an outlier
    (the others round to few levels but stay within the bound), and K not a power of 2."""
    n, k = 40, 160
    qw, prep = make_weight(4, n, k, 32, seed=3)
    x = rand_x(1, k, torch.bfloat16)
    x[0, 32:64] = 0
    x[0, 70] = 60.0
    y = quant_gemv(x, prep, config=GemvConfig(8, 4, 1, DP4A, 1))
    check_exact(y, x, prep)
    check_against_float(y, x, qw, typical=False)


@pytest.mark.parametrize("cfg", [GemvConfig(12, 4, 1, DP4A, 2), GemvConfig(28, 2, 1, DP4A, 2),
                                 GemvConfig(12, 4, 1, DP4A, 2, 1, 1)], ids=["12rows", "28rows", "12rows-qx"])
@pytest.mark.parametrize("bits,group,swiglu", [(4, 32, False), (4, 128, True), (8, 16, True)])
def test_dp4a_rows_per_program_not_a_power_of_2(cfg, bits, group, swiglu):
    """12 or 28 rows a program (tuner candidates): the steps of 2 or 4 rows stop at the
    program's last row, and N=44 leaves a partial last program; exact integer reference."""
    n, k = 44, 256
    _, prep = make_weight(bits, n, k, group, mins=bits == 4 or group == 16, seed=3)
    x = 3 * rand_x(1, 2 * k if swiglu else k, torch.bfloat16)
    check_exact(quant_gemv(x, prep, config=cfg, swiglu=swiglu), x, prep, swiglu=swiglu)


def test_the_tuner_lists_dp4a_configs_and_the_launch_shape(monkeypatch):
    monkeypatch.setenv("HEARTH_QUANT_DP4A", "0")  # the opt-out
    assert DP4A not in {c.kind for c in quant_gemv_configs(4096, 4096, 4)}
    monkeypatch.delenv("HEARTH_QUANT_DP4A")
    kinds = {c.kind for c in quant_gemv_configs(4096, 4096, 4)}
    assert DP4A in kinds and DP4A in {c.kind for c in quant_gemv_configs(4096, 4096, 8)}
    assert DP4A not in {c.kind for c in quant_gemv_configs(64, 40000, 4)}  # longer rows than it holds
    assert {c for c in quant_gemv_configs(4096, 4096, 4) if c.kind == DP4A and c.qx}  # x quantized once, too
    assert dp4a_launch(16, 4, 4, 4096) == (4096, 4, 4, 1)
    assert dp4a_launch(16, 4, 1, 14336) == (16384, 4, 4, 1)  # at most 4 blocks of x per thread
    assert dp4a_launch(16, 32, 8, 1000) == (1024, 16, 1, 1)  # rows per step <= rows per program
    assert dp4a_launch(32, 4, 8, 14336, 4) == (4096, 4, 4, 4)  # K split 4 ways: 4096 inputs a program
    assert dp4a_launch(16, 4, 4, 2048, 4) == (1024, 4, 1, 2)  # at least 1024 inputs a program


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 4096)])
def test_gpu_dp4a_rmsnorm_prologue_llama_shapes(bits, group):
    """The norm in the prologue (or in the kernel quantizing x: ``qx``) at the 8B q/k/v and
    gate_up shapes, against the reference norm
    then the exact integer product (one activation level: the GPU's mean of squares is summed
    in another order than torch's)."""
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA GPU")
    from hearth_kernels.quant_gemv import quant_gemv_normed

    for n in (6144, 28672):
        _, prep = make_weight(bits, n, 4096, group, mins=bits == 4, seed=n)
        x, residual = 4 * rand_x(1, 4096, torch.bfloat16), rand_x(1, 4096, torch.bfloat16, seed=2)
        weight = (1 + 0.2 * rand_x(1, 4096, torch.float32, seed=3)[0]).to(torch.bfloat16)
        h, s_ref = _norm_reference(x, residual, weight, 1e-5)
        for c in (GemvConfig(16, 4, 4, DP4A, 3), GemvConfig(32, 2, 4, DP4A, 2), GemvConfig(8, 4, 4, DP4A, 2),
                  GemvConfig(8, 2, 4, DP4A, 2, 1, 1), GemvConfig(16, 2, 4, DP4A, 2, 4, 1)):
            y, s = quant_gemv_normed(x, prep, weight, 1e-5, residual=residual, config=c)
            check_exact(y, h, prep, levels=1)
            assert torch.equal(s, s_ref)
            exact = _exact_product(s, weight, 1e-5, prep)
            assert _rel_rms(y, exact) <= 1.25 * _rel_rms(quant_gemv(h, prep, config=c), exact) + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,swiglu", [(6144, 4096, False), (4096, 14336, True)])
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 4096), (8, 16)])
def test_gpu_dp4a_llama_shapes(n, k, swiglu, bits, group):
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA GPU")
    if bits == 8 and swiglu and group != 16:
        group = k
    _, prep = make_weight(bits, n, k, group, mins=bits == 4 or group == 16)
    x = rand_x(1, 2 * k if swiglu else k, torch.bfloat16)
    for c in (GemvConfig(32, 4, 4, DP4A, 3), GemvConfig(32, 4, 2, DP4A, 3), GemvConfig(16, 2, 1, DP4A, 2),
              GemvConfig(32, 4, 4, DP4A, 2, 4), GemvConfig(16, 4, 4, DP4A, 2, 2), GemvConfig(8, 2, 4, DP4A, 2, 1, 1),
              GemvConfig(16, 2, 4, DP4A, 2, 4, 1)):
        if c.kind == DP4A:
            check_exact(quant_gemv(x, prep, config=c, swiglu=swiglu), x, prep, swiglu=swiglu, levels=1)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [2, 4])
def test_gpu_dp4a_split_writes_every_output_the_same_way(split):
    """The split-K fixup at the 8B down shape (128 row blocks of 32, each split along K): every
    output written (poisoned with NaN first), the same bits on three calls, and exact (the
    pattern that raced in the Gluon kernel without per-thread fences: hearth_kernels/split_fence.py)."""
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA GPU")
    _, prep = make_weight(4, 4096, 14336, 128, mins=True, seed=split)
    x = rand_x(1, 14336, torch.bfloat16)
    c = GemvConfig(32, 4, 4, DP4A, 2, split)
    check_exact(poisoned_runs(lambda out: quant_gemv(x, prep, config=c, out=out), (1, 4096)), x, prep, levels=1)
