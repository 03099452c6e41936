"""int8/int4 dequantize GEMV and GEMM (kernels/quant_gemv.py, kernels/quant_gemm.py) against
``QuantizedWeight.dequantize(float64)`` then a float64 matmul.

Weights are quantized here with ``engine.quant.rtn`` (int8 with mins is built by hand: an
asymmetric 8-bit checkpoint). Tolerances come from the dtypes, per output element, with
``S = |W| @ |x|`` (the size of the terms summed) and ``u`` the unit roundoff of the output
dtype (bf16 2^-8, fp16 2^-11, fp32 2^-24; bf16 gets 2^-7 because Triton 3.6's interpreter
truncates fp32 -> bf16 where the GPU rounds to nearest):
- the Triton paths use exact codes and scale in fp32: one output rounding ``u * |y|``, plus
  fp32 arithmetic ``ACC * S`` (2^-13 for 16-bit activations, whose int4 dots carry the
  magic-number offset of 128 or 1024 and cancel it afterwards; 2^-17 for fp32);
- dequantize + cuBLAS rounds every weight to the activation dtype first: ``u * S`` more.
"""

from __future__ import annotations

import pytest
import torch

from engine.quant.qweight import QuantizedWeight
from engine.quant.rtn import quantize_int4, quantize_int8
from hearth_kernels.activation import silu_and_mul
from hearth_kernels.quant_gemm import dequantize_weight, gemm_path, quant_gemm
from hearth_kernels.gemv import tma_listed
from hearth_kernels.quant_gemv import (DP4A, DP4A_TMA, GemvConfig, default_quant_config, prepare_int4, prepare_int8,
                                quant_gemv, quant_gemv_configs, unpair_nibbles)
from tests.kernels.reference import DEVICE

UNIT = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
ACC = {torch.bfloat16: 2.0 ** -13, torch.float16: 2.0 ** -13, torch.float32: 2.0 ** -17}
MMA = GemvConfig(16, 64, 2, 1, 2)  # the tensor-core GEMV, small for the interpreter
FMA = GemvConfig(8, 64, 2, 0, 1)  # the CUDA-core K-loop GEMV
ROWS = GemvConfig(16, 2, 1, 2, 2)  # the x-stationary GEMV (16 rows per program: N=40 has a partial one)
KINDS = pytest.mark.parametrize("config", [MMA, FMA, ROWS], ids=["mma", "kloop", "rows"])


def make_weight(bits: int, n: int, k: int, group: int, mins: bool = True, seed: int = 0):
    """(QuantizedWeight, PreparedQuant) of a random [n, k] weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if bits == 4:
        qw = quantize_int4(w, group)
    else:
        qw = quantize_int8(w, group)
        if mins:  # an asymmetric 8-bit checkpoint: any float16 offsets
            qw.mins = (0.01 * torch.randn(qw.scales.shape, generator=g)).half()
    qw = QuantizedWeight(qw.bits, qw.group_size, qw.qweight.to(DEVICE), qw.scales.to(DEVICE),
                         None if qw.mins is None else qw.mins.to(DEVICE))
    prep = (prepare_int4 if bits == 4 else prepare_int8)(qw.qweight, qw.scales, qw.mins, group)
    return qw, prep


def check(y: torch.Tensor, x_eff: torch.Tensor, qw: QuantizedWeight, bias=None, weight_rounding=False):
    """y vs float64 x_eff @ W.T (+ bias) within the dtype bounds of the module docstring."""
    w = qw.dequantize(torch.float64)
    xd = x_eff.double()
    ref = xd @ w.T + (0 if bias is None else bias.double())
    s = xd.abs() @ w.abs().T + (0 if bias is None else bias.double().abs())
    u = UNIT[y.dtype]
    tol = u * ref.abs() + (ACC[y.dtype] + (u if weight_rounding else 0.0)) * s + 1e-30
    err = (y.double() - ref).abs()
    assert y.shape == ref.shape
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.3g}"


def narrow_fused(config, bits: int, group: int) -> bool:
    """Whether the tensor-core path runs this weight with its tile rounded to x's dtype in
    registers (SCALE_B): int4 in groups of 32, int8 in groups of 16 (``fused_step``)."""
    return (config is None or GemvConfig(*config).kind == 1) and (bits, group) in ((4, 32), (8, 16))


def rand_x(rows: int, cols: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(device=DEVICE, dtype=dtype)


def poisoned_runs(call, shape: tuple[int, int], times: int = 3) -> torch.Tensor:
    """``call(out)`` ``times`` times, each into an output poisoned with NaN first: every output
    written and the same bits every time (a split-K launch whose last program summed a partial
    not yet written shows either way). Returns the first."""
    runs = [call(torch.full(shape, float("nan"), dtype=torch.bfloat16, device=DEVICE)) for _ in range(times)]
    assert not runs[0].isnan().any()
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    return runs[0]


@KINDS
@pytest.mark.parametrize("n,k,group,dtype", [(40, 64, 32, torch.bfloat16), (72, 192, 64, torch.bfloat16),
                                             (40, 96, 96, torch.float16)])
def test_gemv_int4(n, k, group, dtype, config):
    qw, prep = make_weight(4, n, k, group, seed=n + k)
    x = rand_x(1, k, dtype)
    check(quant_gemv(x, prep, config=config), x, qw, weight_rounding=narrow_fused(config, 4, group))


@KINDS
@pytest.mark.parametrize("n,k,group,mins", [(40, 96, 96, False), (72, 192, 32, True),
                                            (40, 100, 100, True)])  # K % 32 != 0: every kind runs the mma kernel
def test_gemv_int8(n, k, group, mins, config):
    qw, prep = make_weight(8, n, k, group, mins=mins, seed=n + k)
    x = rand_x(1, k, torch.bfloat16)
    check(quant_gemv(x, prep, config=config), x, qw)


@pytest.mark.parametrize("config", [FMA, ROWS, MMA, GemvConfig(16, 4, 4, DP4A, 2, 2)],
                         ids=["kloop", "rows", "mma", "dp4a"])
@pytest.mark.parametrize("mins", [False, True])
def test_gemv_int8_in_groups_of_16(config, mins):
    """int8 in groups of 16 (GGUF Q6_K's sub-blocks): each half of a block of 32 scaled by
    its own group's scale (and min). A config of the tensor-core kernel (which scales whole
    blocks) runs the default CUDA-core kernel instead; the dp4a kernel sums and scales each
    half of a block apart. Those three, and where it runs the TMA dp4a kind (which scales
    the halves apart too: tests/kernels/test_quant_dp4a_tma.py), are offered to time."""
    n, k = 40, 192
    qw, prep = make_weight(8, n, k, 16, mins=mins, seed=3)
    assert prep.group_size == 16 and prep.scales.shape == (n, k // 16)
    # the two halves of a block have different scales (a kernel using one of them fails)
    assert (qw.scales[:, 0::2] != qw.scales[:, 1::2]).float().mean() > 0.9
    x = rand_x(1, k, torch.bfloat16)
    y = quant_gemv(x, prep, config=config)
    if config.kind == DP4A:  # x rounded to 8 bits: against the same integer arithmetic in float64
        from tests.kernels.test_quant_dp4a import check_exact

        check_exact(y, x, prep, levels=1)  # (this x has an input on a rounding edge: one level either way)
    else:
        check(y, x, qw)
    tma = {DP4A_TMA} if tma_listed() else set()  # Hopper or the interpreter
    assert {c.kind for c in quant_gemv_configs(4096, 14336, 8, 16)} == {0, 2, DP4A} | tma


@KINDS
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 192), (8, 16)])
def test_gemv_swiglu_bias_and_out(bits, group, config):
    n, k = 72, 192
    qw, prep = make_weight(bits, n, k, group)
    gate_up = 3 * rand_x(1, 2 * k, torch.bfloat16)
    bias = rand_x(1, n, torch.bfloat16, seed=5)[0]
    out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    assert quant_gemv(gate_up, prep, config=config, swiglu=True, out=out, bias=bias) is out
    # the activation is rounded like the unfused kernel's; the rest is checked in float64
    check(out, silu_and_mul(gate_up), qw, bias=bias, weight_rounding=narrow_fused(config, bits, group))


def test_gemv_float32_activations_are_exact_to_fp32():
    qw, prep = make_weight(4, 40, 64, 32)
    x = rand_x(1, 64, torch.float32)
    for config in (MMA, FMA, ROWS):
        check(quant_gemv(x, prep, config=config), x, qw)


@pytest.mark.slow
def test_every_listed_config_computes_the_same_product(monkeypatch):
    monkeypatch.setenv("HEARTH_QUANT_DP4A", "1")
    n, k = 40, 256
    qw, prep = make_weight(4, n, k, 128)
    x = rand_x(1, k, torch.float16)
    configs = quant_gemv_configs(n, k, 4)
    first = default_quant_config(n, k, 4)
    assert configs[0] == first._replace(block_k=min(first.block_k, k)) and len(set(configs)) == len(configs)
    assert all(c.block_k <= 256 for c in configs if c.kind not in (2, 5))
    tma = {DP4A_TMA} if tma_listed() else set()  # Hopper, or the interpreter (which emulates TMA)
    assert {c.kind for c in configs} == {0, 1, 2, 4, 5} | tma
    for config in configs:  # kind 4 dequantizes weight tiles to x's dtype in registers
        if config.kind in (5, 6):  # dp4a: x rounded to int8 (its own tests' exact reference)
            from tests.kernels.test_quant_dp4a import check_exact

            check_exact(quant_gemv(x, prep, config=config), x, prep)
        else:
            check(quant_gemv(x, prep, config=config), x, qw, weight_rounding=config.kind == 4)


@pytest.mark.parametrize("rows", [3, 17])
@pytest.mark.parametrize("bits,group,mins,dtype", [
    (4, 32, True, torch.bfloat16), (4, 96, True, torch.float16), (4, 64, True, torch.float32),
    (8, 96, False, torch.bfloat16), (8, 32, True, torch.float16), (8, 100, False, torch.bfloat16),
])
def test_gemm_fused(rows, bits, group, mins, dtype):
    k = 100 if group == 100 else 192 if group in (32, 64) else 96
    n = 72 if rows == 17 else 40
    qw, prep = make_weight(bits, n, k, group, mins=mins, seed=rows)
    x = rand_x(rows, k, dtype)
    # the fused kernel (int4 would run quant_mma)
    check(quant_gemm(x, prep, swap_rows=0), x, qw, weight_rounding=narrow_fused(None, bits, group))


def test_gemm_fused_bias_out_and_strided_rows():
    qw, prep = make_weight(4, 40, 64, 32)
    big = rand_x(5, 96, torch.bfloat16)
    x = big[:, :64]  # row stride 96
    bias = rand_x(1, 40, torch.bfloat16, seed=3)[0]
    out = torch.empty(5, 40, dtype=torch.bfloat16, device=DEVICE)
    assert quant_gemm(x, prep, bias=bias, out=out, config=(16, 32, 32, 2, 1)) is out
    check(out, x, qw, bias=bias, weight_rounding=True)  # int4 in groups of 32: SCALE_B


@pytest.mark.parametrize("bits,group,mins,dtype", [(4, 32, True, torch.bfloat16), (4, 64, True, torch.float16),
                                                  (8, 32, True, torch.bfloat16), (8, 96, False, torch.float16)])
def test_gemm_fused_scale_b(bits, group, mins, dtype):
    """The SCALE_B variant (weight tile dequantized in registers, one accumulator): the
    product of the weight rounded to x's dtype, like the dequantize path."""
    k = 96 if group == 96 else 192
    qw, prep = make_weight(bits, 72, k, group, mins=mins, seed=7)
    x = rand_x(19, k, dtype)
    check(quant_gemm(x, prep, config=(16, 32, 32, 2, 2, True)), x, qw, weight_rounding=True)


@pytest.mark.parametrize("rows,mins,dtype,k", [(3, True, torch.bfloat16, 192), (17, False, torch.float16, 192),
                                              (5, True, torch.bfloat16, 160)])
def test_gemm_int8_in_groups_of_16(rows, mins, dtype, k):
    """More rows, groups of 16: every config runs the SCALE_B tile (each group's columns
    scaled by its scale in registers, rounded to x's dtype), with or without split-K; K = 160
    leaves a last step past K (masked codes and x)."""
    qw, prep = make_weight(8, 72, k, 16, mins=mins, seed=rows)
    x = rand_x(rows, k, dtype)
    check(quant_gemm(x, prep), x, qw, weight_rounding=True)
    check(quant_gemm(x, prep, config=(16, 32, 64, 2, 2, False, 3)), x, qw, weight_rounding=True)


@pytest.mark.parametrize("k,config", [(96, None), (192, (16, 32, 128, 2, 1)), (160, (16, 64, 128, 2, 2, False, 2))])
@pytest.mark.parametrize("swiglu", [False, True])
def test_int4_in_groups_of_32_with_steps_past_k(k, config, swiglu):
    """int4 in groups of 32: the fused kernel's steps span groups (64-128 inputs), so the
    last one may run past K (K = 32 x odd; the bundled SmolLM2's 576 with steps of 128):
    codes and x beyond K are masked (the next row's codes and x, or [gate | up]'s up half,
    must not leak in). Also the tensor-core GEMV config of the tuner's list, and SwiGLU."""
    n = 40
    qw, prep = make_weight(4, n, k, 32, seed=k)
    if swiglu:  # the one-row tensor-core GEMV over [gate | up] (the fused kernel applies SwiGLU)
        gate_up = 3 * rand_x(1, 2 * k, torch.bfloat16)
        y = quant_gemv(gate_up, prep, config=GemvConfig(16, 128, 2, 1, 2), swiglu=True)
        check(y, silu_and_mul(gate_up), qw, weight_rounding=True)
        return
    big = rand_x(6, k + 64, torch.bfloat16)
    x = big[:, :k]  # rows strided: what lies past K in memory is the next row's x
    check(quant_gemm(x, prep, swap_rows=0, config=config), x, qw, weight_rounding=True)


@pytest.mark.parametrize("bits,group,mins,scale_b", [(4, 32, True, False), (4, 64, True, True),
                                                    (8, 192, False, False), (8, 32, True, True)])
def test_gemm_fused_split_k(bits, group, mins, scale_b):
    """Split-K (K over 3 programs per tile, fp32 partial sums summed in order), with bias."""
    k = 192
    qw, prep = make_weight(bits, 40, k, group, mins=mins, seed=11)
    x = rand_x(5, k, torch.bfloat16)
    bias = rand_x(1, 40, torch.bfloat16, seed=3)[0]
    out = torch.full((5, 40), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    assert quant_gemm(x, prep, bias=bias, out=out, config=(16, 32, 32, 2, 2, scale_b, 3)) is out
    check(out, x, qw, bias=bias, weight_rounding=scale_b or narrow_fused(None, bits, group))


def test_int4_codes_are_repacked_into_pair_order():
    """Byte j of a GGUF block holds inputs j (low) and j + 16 (high); prepared, byte j
    holds inputs 2j (low) and 2j + 1 (high). Hand-built: input i of the block has code i % 16,
    so GGUF byte j = j | (j << 4) and pair byte j = (2j % 16) | ((2j + 1) % 16) << 4."""
    gguf = torch.tensor([[j | (j << 4) for j in range(16)] * 2], dtype=torch.uint8)  # one row, K = 64
    prep = prepare_int4(gguf.to(DEVICE), torch.ones(1, 2, dtype=torch.float16, device=DEVICE),
                        torch.zeros(1, 2, dtype=torch.float16, device=DEVICE), 32)
    want = [((2 * j) % 16) | (((2 * j + 1) % 16) << 4) for j in range(16)] * 2
    assert prep.qweight.cpu().tolist() == [want]
    assert dequantize_weight(prep, torch.float32).cpu().tolist() == [[float(i % 16) for i in range(32)] * 2]


def test_pair_order_round_trips_and_is_made_once_per_weight():
    """unpair_nibbles inverts the repack; preparing the same codes again (the load-time
    tuner binds one kernel per candidate) reuses the pair-order copy, and an in-place
    change of the codes is seen."""
    qw, prep = make_weight(4, 24, 128, 32)
    assert torch.equal(unpair_nibbles(prep.qweight), qw.qweight)
    again = prepare_int4(qw.qweight, qw.scales, qw.mins, 32)
    assert again.qweight is prep.qweight
    qw.qweight[0, 0] ^= 0x21
    changed = prepare_int4(qw.qweight, qw.scales, qw.mins, 32)
    assert changed.qweight is not prep.qweight and torch.equal(unpair_nibbles(changed.qweight), qw.qweight)


@pytest.mark.parametrize("bits,group,mins", [(4, 64, True), (8, 100, True), (8, 32, False), (8, 16, True)])
def test_gemm_dequantize_path(bits, group, mins):
    k = 100 if group == 100 else 128
    qw, prep = make_weight(bits, 40, k, group, mins=mins)
    x = rand_x(5, k, torch.bfloat16)
    bias = rand_x(1, 40, torch.bfloat16, seed=3)[0]
    check(quant_gemm(x, prep, bias=bias, dequant_rows=1), x, qw, bias=bias, weight_rounding=True)
    # the scratch weight is q * s + m in fp32, rounded once
    w32 = dequantize_weight(prep, torch.float32)
    torch.testing.assert_close(w32, qw.dequantize(torch.float32), rtol=2 ** -23, atol=0)


def test_bad_arguments_are_clear_errors():
    qw, prep = make_weight(4, 8, 64, 32)
    with pytest.raises(ValueError, match="group size 48"):
        prepare_int8(torch.zeros(8, 96, dtype=torch.int8), torch.ones(8, 2, dtype=torch.float16), None, 48)
    with pytest.raises(ValueError, match="group size 16 is not a multiple of 32"):  # int8 only
        prepare_int4(qw.qweight, torch.ones(8, 4, dtype=torch.float16), torch.ones(8, 4, dtype=torch.float16), 16)
    with pytest.raises(ValueError, match="uint8"):
        prepare_int4(qw.qweight.to(torch.int8), qw.scales, qw.mins, 32)
    with pytest.raises(ValueError, match="mins"):
        prepare_int4(qw.qweight, qw.scales, None, 32)
    with pytest.raises(ValueError, match="scales must be float16"):
        prepare_int4(qw.qweight, qw.scales.float(), qw.mins, 32)
    with pytest.raises(ValueError, match="one row"):
        quant_gemv(rand_x(2, 64, torch.bfloat16), prep)
    with pytest.raises(ValueError, match="gate"):
        quant_gemv(rand_x(1, 64, torch.bfloat16), prep, swiglu=True)
    with pytest.raises(ValueError, match="out must be"):
        quant_gemv(rand_x(1, 64, torch.bfloat16), prep, out=torch.empty(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        quant_gemm(rand_x(3, 64, torch.bfloat16), prep, bias=torch.zeros(7, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        quant_gemm(torch.zeros(3, 64, dtype=torch.float64, device=DEVICE), prep)


_COMPILE = r"""
import json, sys
from tests.kernels.sm90_compile import compile_kernel
from hearth_kernels import quant_gemm as qm, quant_gemv as qv
bf = "*bf16"
ptrs = {"x_ptr": bf, "s_ptr": "*fp16", "m_ptr": "*fp16", "b_ptr": bf, "y_ptr": bf}
def q(bits): return {**ptrs, "q_ptr": "*u8" if bits == 4 else "*i8"}
cases = {}
for bits, group in ((4, 128), (8, 4096)):
    common = dict(GROUP=group, BITS=bits, HAS_MIN=bits == 4, HAS_BIAS=False, SWIGLU=True)
    for name, cfg in (("gemv_kloop", qv.GemvConfig(16, 512, 4, 0, 3)), ("gemv_mma", qv.GemvConfig(128, 128, 4, 1, 3)),
                      ("gemv_rows", qv.default_quant_config(4096, 4096, bits)), ("gemv_rows_k14336", qv.GemvConfig(32, 4, 4, 2, 3))):
        if cfg.kind == 2:
            kp, r, warps = qv.rows_launch(cfg, 4096 if name == "gemv_rows" else 14336)
            consts = dict(common, ROWS=cfg.block_n, R=r, KP=kp, STAGES=cfg.stages)
            cases[f"{name}{bits}"] = (qv._quant_gemv_rows_kernel, {**ptrs, "q_ptr": "*i32"}, consts, warps, 1)
        elif cfg.kind == 1:
            consts = dict(common, OFFSET=128 if bits == 4 else 0, DOT_PRECISION="tf32", DOT_FP32=False,
                          BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=True, PER_ROW=group == 4096,
                          SCALE_B=False, SPLIT_K=1)
            cases[f"{name}{bits}"] = (qm._quant_gemm_kernel, q(bits), consts, cfg.warps, cfg.stages)
        else:
            consts = dict(common, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=True, STAGES=cfg.stages)
            cases[f"{name}{bits}"] = (qv._quant_gemv_kernel, {**ptrs, "q_ptr": "*i32"}, consts, cfg.warps, 1)
    for m in (64, 512):
        bm, bn, bk, w, st, sb, sk = qm.default_gemm_config(m, 4096, 4096, bits, group)
        consts = dict(common, SWIGLU=False, OFFSET=128 if bits == 4 else 0, DOT_PRECISION="tf32", DOT_FP32=False,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, PER_ROW=group == 4096, SCALE_B=sb, SPLIT_K=sk,
                      )
        types = {**q(bits), "y_ptr": "*fp32" if sk > 1 else bf}  # split-K writes fp32 partial sums
        cases[f"gemm{m}_{bits}"] = (qm._quant_gemm_kernel, types, consts, w, st)
    # GGUF's narrow groups (int4 Q4_K/Q4_0/Q4_1: 32; int8 Q6_K: 16) at a prompt of 768
    # tokens, as the launcher runs them (int4 in steps of 32 aborted the compile on Hopper)
    narrow = 32 if bits == 4 else 16
    bm, bn, bk, w, st, sb, sk = qm.default_gemm_config(768, 4096, 4096, bits, narrow)
    bk, sb = qm.fused_step(bits, narrow, 4096, bk, sb)
    consts = dict(GROUP=narrow, BITS=bits, HAS_MIN=True, HAS_BIAS=False, SWIGLU=False, OFFSET=128 if bits == 4 else 0,
                  DOT_PRECISION="tf32", DOT_FP32=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, PER_ROW=False,
                  SCALE_B=sb, SPLIT_K=sk)
    cases[f"gemm768_{bits}_g{narrow}"] = (qm._quant_gemm_kernel, q(bits), consts, w, st)
    cases[f"dequantize{bits}"] = (qm._dequantize_kernel, {"q_ptr": q(bits)["q_ptr"], "s_ptr": "*fp16",
                                  "m_ptr": "*fp16", "w_ptr": bf},
                                  dict(GROUP=group, BITS=bits, HAS_MIN=bits == 4, BLOCK_N=8, BLOCK_K=512, EVEN=True), 4, 1)
for name, (fn, types, consts, warps, stages) in cases.items():
    print(json.dumps({"kernel": name, **compile_kernel(fn, types, consts, warps, stages)}), flush=True)
"""


@pytest.mark.slow
def test_quant_kernels_compile_for_sm90_without_spills():
    """The GPU build (not the interpreter) of every kernel at Llama-8B settings."""
    from tests.kernels.sm90_compile import compiled_rows

    rows = {r.pop("kernel"): r for r in compiled_rows(_COMPILE, 600)}
    assert len(rows) == 16
    for name, row in rows.items():
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, (name, row)
    for name in ("gemv_kloop4", "gemv_kloop8", "gemv_mma4", "gemv_mma8", "gemm64_4", "gemm512_4", "gemm512_8",
                 "gemm768_4_g32", "gemm768_8_g16"):
        assert rows[name]["pipelined"], (name, rows[name])  # cp.async: K steps in flight
    for name in ("gemv_rows4", "gemv_rows8"):  # steps loaded ahead in registers (_steps_start), not cp.async
        assert not rows[name]["pipelined"], (name, rows[name])
    assert rows["gemm64_4"]["wgmma"] and rows["gemm512_8"]["wgmma"]
    # narrow groups scale the code tile group by group, not weight by weight (_scale_groups):
    # no byte-wise shared-memory gather of the codes (the per-weight scale gather had 32-64)
    for name in ("gemm768_4_g32", "gemm768_8_g16"):
        assert rows[name]["byte_shared_loads"] == 0, (name, rows[name])


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,swiglu", [(6144, 4096, False), (4096, 4096, False), (28672, 4096, False),
                                        (4096, 14336, True)])
@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, None), (8, 16)])
def test_gpu_llama_shapes(n, k, swiglu, bits, group):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = 0.02 * torch.randn(n, k, device="cuda", generator=g)
    qw = quantize_int4(w, group) if bits == 4 else quantize_int8(w, group)
    prep = (prepare_int4 if bits == 4 else prepare_int8)(qw.qweight, qw.scales, qw.mins, qw.group_size)
    x = torch.randn(1, 2 * k if swiglu else k, device="cuda", generator=g).bfloat16()
    x_eff = silu_and_mul(x) if swiglu else x
    for config in quant_gemv_configs(n, k, bits, group):
        y = quant_gemv(x, prep, config=config, swiglu=swiglu)
        if config.kind in (DP4A, DP4A_TMA):  # x rounded to 8 bits: against the same integer arithmetic in float64
            from tests.kernels.test_quant_dp4a import check_exact

            check_exact(y, x, prep, swiglu=swiglu, levels=1)
        else:  # SWAP_SCALED dequantizes the weight tile to bf16 in registers, like the dequantize path
            check(y, x_eff, qw, weight_rounding=config.kind == 4 or narrow_fused(config, bits, group))
    for rows in (2, 64, 80, 300):
        xm = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
        # int4 up to SWAP_ROWS: kernels/quant_mma.py, weight tiles dequantized to bf16 by default;
        # the dequantize path rounds the weight to bf16 too (gemm_path says which runs)
        # (narrow groups always scale the weight tile in registers: kernels/quant_gemm.fused_step)
        narrow = group in (16, 32)
        path = gemm_path(rows, prep)
        rounded = (path == "mma" and bits == 4) or path == "dequant"
        check(quant_gemm(xm, prep), xm, qw, weight_rounding=rounded or narrow)
        check(quant_gemm(xm, prep, config=(64, 128, 128, 8, 4, False, 1), dequant_rows=1 << 30), xm, qw,
              weight_rounding=narrow)
    # SCALE_B 128-row tiles (weight rounded to bf16 in registers, like the dequantize path)
    check(quant_gemm(xm, prep, config=(128, 128, 64, 8, 3, True, 1), dequant_rows=1 << 30), xm, qw,
          weight_rounding=True)
    xm = torch.randn(1100, k, device="cuda", generator=g).bfloat16()
    check(quant_gemm(xm, prep), xm, qw, weight_rounding=True)
