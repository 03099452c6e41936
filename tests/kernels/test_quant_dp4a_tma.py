"""The K-loop dp4a GEMV whose weight tiles come by TMA (``GemvConfig.kind == DP4A_TMA``,
``hearth_kernels/quant_dp4a.quant_gemv_dp4a_tma``), against ``dp4a_reference`` (x quantized per
block of 32 as the kernels do, integer dots exact, scaling in float64; ``check_exact`` of the
x-stationary kernel's tests gives the bound). On CPU through Triton's interpreter, which
emulates the tensor descriptors; the GPU test runs the TMA copies at Llama shapes (Hopper)."""

from __future__ import annotations

import pytest
import torch

from hearth_kernels.quant_gemv import DP4A, DP4A_TMA, GemvConfig, quant_gemv, quant_gemv_configs
from tests.kernels.reference import DEVICE
from tests.kernels.test_quant_dp4a import _exact_product, _norm_reference, _rel_rms, check_exact
from tests.kernels.test_quant_gemv import make_weight, rand_x

LEVELS = 1 if DEVICE == "cuda" else 0  # a GPU's fp32 division may put an input one level away


@pytest.mark.parametrize("n,k,group,cfg", [
    (40, 384, 128, GemvConfig(16, 256, 2, DP4A_TMA, 2)),  # a partial program, K not a multiple of the step
    (72, 352, 32, GemvConfig(32, 64, 4, DP4A_TMA, 3)),  # 11 steps, more than in flight
    (24, 512, 64, GemvConfig(8, 512, 1, DP4A_TMA, 1)),  # one step, one stage
    (40, 320, 320, GemvConfig(16, 128, 2, DP4A_TMA, 3)),  # one group a row (GPTQ's group_size -1)
])
@pytest.mark.parametrize("mins", [True, False], ids=["asym", "sym"])
def test_tma_gemv_matches_the_exact_integer_product(n, k, group, cfg, mins):
    _, prep = make_weight(4, n, k, group, seed=n + k)
    if not mins:  # symmetric (GPTQ sym): w = (q - 8) s
        prep = prep._replace(mins=None)
    x = 3 * rand_x(1, k, torch.bfloat16)
    bias = rand_x(1, n, torch.bfloat16, seed=5)[0]
    y = quant_gemv(x, prep, config=cfg, bias=bias)
    check_exact(y, x, prep, bias=bias, levels=LEVELS)
    # the same dots as the x-stationary kernel with x quantized once (sums in another order)
    y0 = quant_gemv(x, prep, config=GemvConfig(8, 4, 1, DP4A, 2, 1, 1), bias=bias)
    assert torch.allclose(y.float(), y0.float(), rtol=2e-2, atol=1e-2 * float(y0.float().abs().max()))


@pytest.mark.parametrize("n,k,group,mins,cfg", [
    (40, 384, 384, False, GemvConfig(16, 128, 2, DP4A_TMA, 2)),  # per channel (scales applied at the end)
    (40, 384, 384, True, GemvConfig(16, 128, 2, DP4A_TMA, 3)),  # per channel with offsets: m * sum(x)
    (24, 352, 32, False, GemvConfig(8, 64, 1, DP4A_TMA, 2)),  # GGUF Q8_0's groups; a K tail
    (40, 256, 16, True, GemvConfig(16, 64, 2, DP4A_TMA, 2)),  # groups of 16 (Q6_K's), with offsets
    (24, 512, 256, True, GemvConfig(8, 64, 1, DP4A_TMA, 3)),  # groups wider than a step
])
def test_tma_gemv_int8(n, k, group, mins, cfg):
    _, prep = make_weight(8, n, k, group, mins=mins, seed=n + group)
    assert (prep.mins is not None) == mins
    x = 3 * rand_x(1, k, torch.bfloat16)
    bias = rand_x(1, n, torch.bfloat16, seed=6)[0]
    check_exact(quant_gemv(x, prep, config=cfg, bias=bias), x, prep, bias=bias, levels=LEVELS)


def test_tma_gemv_swiglu_and_zero_blocks():
    """SwiGLU runs in the kernel that quantizes x; an all-zero block of x (its scale would
    divide by zero) and an outlier."""
    n, k = 40, 256
    _, prep = make_weight(4, n, k, 32, seed=4)
    x = rand_x(1, 2 * k, torch.bfloat16)
    x[0, 32:64] = 0  # gate 0: silu(0) * up = 0 for that block
    x[0, 70] = 30.0
    y = quant_gemv(x, prep, config=GemvConfig(16, 128, 2, DP4A_TMA, 2), swiglu=True)
    check_exact(y, x, prep, swiglu=True, levels=LEVELS)


@pytest.mark.parametrize("add", [False, True], ids=["norm", "add+norm"])
def test_tma_gemv_takes_the_norm(add):
    """The RMSNorm (after the residual add) runs in the kernel that quantizes x: the residual
    stream bit for bit that of the x-stationary kernel's ``qx`` path (the same kernel writes
    it; on a GPU also torch's sum in bf16), the product the exact one of the normalised x."""
    from hearth_kernels.quant_gemv import norm_fusable, quant_gemv_normed

    n, k = 40, 640
    _, prep = make_weight(4, n, k, 64, seed=21)
    x = 3 * rand_x(1, k, torch.bfloat16)
    residual = rand_x(1, k, torch.bfloat16, seed=2) if add else None
    weight = (1 + 0.2 * rand_x(1, k, torch.float32, seed=3)[0]).to(torch.bfloat16)
    cfg = GemvConfig(16, 128, 2, DP4A_TMA, 2)
    assert norm_fusable(prep, cfg)
    y, s = quant_gemv_normed(x, prep, weight, 1e-5, residual=residual, config=cfg)
    _, s1 = quant_gemv_normed(x, prep, weight, 1e-5, residual=residual, config=GemvConfig(8, 4, 1, DP4A, 2, 1, 1))
    assert torch.equal(s, s1)
    if DEVICE == "cuda":
        assert torch.equal(s, _norm_reference(x, residual, weight, 1e-5)[1])
    h = _norm_reference(s, None, weight, 1e-5)[0]
    check_exact(y, h, prep, levels=1)
    exact = _exact_product(s, weight, 1e-5, prep)
    assert _rel_rms(y, exact) <= 1.25 * _rel_rms(quant_gemv(h, prep, config=cfg), exact) + 1e-4


def test_tma_gemv_refuses_what_it_cannot_run():
    x = rand_x(1, 256, torch.bfloat16)
    _, p4 = make_weight(4, 16, 256, 64)
    _, p96 = make_weight(4, 16, 288, 96)
    with pytest.raises(ValueError, match="divide its K step"):  # groups of 96, steps of 64
        quant_gemv(rand_x(1, 288, torch.bfloat16), p96, config=GemvConfig(16, 64, 2, DP4A_TMA, 2))
    with pytest.raises(ValueError, match="power of 2"):
        quant_gemv(x, p4, config=GemvConfig(12, 128, 2, DP4A_TMA, 2))
    with pytest.raises(ValueError, match="power of 2"):
        quant_gemv(x, p4, config=GemvConfig(16, 4096, 2, DP4A_TMA, 2))  # past TMA's 256-element box
    with pytest.raises(ValueError, match="shared memory"):
        quant_gemv(x, p4, config=GemvConfig(256, 2048, 4, DP4A_TMA, 8))  # 8 x 256 KB tiles in flight


def test_tuner_lists_the_tma_kind(monkeypatch):
    c4 = [c for c in quant_gemv_configs(4096, 14336, 4, 128) if c.kind == DP4A_TMA]
    assert c4 and all(c.block_k % 128 == 0 and c.block_k <= 2048 for c in c4)
    c8 = [c for c in quant_gemv_configs(4096, 4096, 8) if c.kind == DP4A_TMA]  # per channel: steps of half the inputs
    assert [c.block_k for c in c8] == [c.block_k // 2 for c in c4]
    # a short row: the steps shrink to it, and only where the group divides them
    short = [c for c in quant_gemv_configs(64, 256, 4, 128) if c.kind == DP4A_TMA]
    assert short and all(c.block_k == 256 for c in short)
    assert not [c for c in quant_gemv_configs(64, 288, 4, 96) if c.kind == DP4A_TMA]  # 96 and steps of 512
    monkeypatch.setenv("HEARTH_QUANT_TMA", "0")  # the A/B switch
    assert not [c for c in quant_gemv_configs(4096, 14336, 4, 128) if c.kind == DP4A_TMA]
    monkeypatch.setenv("HEARTH_QUANT_TMA", "1")
    monkeypatch.setenv("HEARTH_QUANT_DP4A", "0")  # no dp4a kind at all
    assert not [c for c in quant_gemv_configs(4096, 14336, 4, 128) if c.kind == DP4A_TMA]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,swiglu", [(28672, 4096, False), (4096, 14336, True), (6144, 4096, False)])
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 0), (8, 16)], ids=["int4", "int8", "int8-g16"])
def test_gpu_tma_gemv_llama_shapes(n, k, swiglu, bits, group):
    """Every TMA config the tuner lists at the 8B shapes (under PDL where the card has it),
    against the exact integer product."""
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA GPU")
    from hearth_kernels.gemv import tma_available

    if not tma_available(torch.device(DEVICE)):
        pytest.skip("needs TMA (Hopper or newer)")
    group = group or k
    _, prep = make_weight(bits, n, k, group, mins=bits == 4 or group == 16)
    x = rand_x(1, 2 * k if swiglu else k, torch.bfloat16)
    configs = [c for c in quant_gemv_configs(n, k, bits, group) if c.kind == DP4A_TMA]
    assert configs
    for c in configs:
        check_exact(quant_gemv(x, prep, config=c, swiglu=swiglu), x, prep, swiglu=swiglu, levels=1)


_COMPILE = r"""
import json, re
from tests.kernels.sm90_compile import build, compile_kernel
from hearth_kernels import quant_dp4a as qd, quant_gemv as qv
ptrs = {"s_ptr": "*fp16", "m_ptr": "*fp16", "b_ptr": "*bf16", "xq_ptr": "*i32", "xf_ptr": "*fp32", "y_ptr": "*bf16"}
for bits, group in ((4, 128), (8, 4096), (8, 16)):
    for cfg in qv._DP4A_TMA_CONFIGS:  # as quant_gemv_configs lists them on a Hopper GPU (none here)
        cfg = cfg._replace(block_k=cfg.block_k * 4 // bits)
        if qd.dp4a_tma_problem(4096, bits, group, cfg.block_n, cfg.block_k, cfg.stages):
            continue
        words = cfg.block_k * bits // 32
        consts = dict(GROUP=group, BITS=bits, PER_ROW=group == 4096, HAS_MIN=bits == 4 or group == 16,
                      HAS_BIAS=False, BN=cfg.block_n, BK=cfg.block_k, STAGES=cfg.stages, EVEN_K=True, ASM=True,
                      PDL=True)
        types = {**ptrs, "w_desc": f"tensordesc<i32[{cfg.block_n}, {words}]>"}
        row = dict(compile_kernel(qd._quant_gemv_dp4a_tma_kernel, types, consts, cfg.warps, cfg.stages),
                   stages=cfg.stages)
        asm = build(qd._quant_gemv_dp4a_tma_kernel, types, consts, cfg.warps, cfg.stages).asm
        loop = asm["ttgir"][asm["ttgir"].index("scf.for"):]
        loop = loop[:loop.index("scf.yield")]
        row.update(tma="cp.async.bulk.tensor" in asm["ptx"], loop_plain_loads=len(re.findall(r"= tt\.load ", loop)))
        print(json.dumps({"kernel": f"int{bits}-g{group}-{cfg.block_n}x{cfg.block_k}-s{cfg.stages}", **row}), flush=True)
"""


@pytest.mark.slow
def test_tma_kind_compiles_for_sm90():
    """The GPU build (not the interpreter) of every listed TMA config at the 8B width: the
    tiles come by TMA, and from 3 stages no load of the loop stays plain (the step's x, scales
    and mins are copied ahead too: Triton's pipeliner left a masked load of 2-byte values
    synchronous, which cost int4 down 40% on an H100), no spills, the shared memory of an H100."""
    from tests.kernels.sm90_compile import compiled_rows

    rows = {r.pop("kernel"): r for r in compiled_rows(_COMPILE, 900)}
    assert len(rows) >= 12, rows
    for name, row in rows.items():
        assert row["tma"] and row["pipelined"], (name, row)
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, (name, row)
        assert row["shared"] <= 227 * 1024, (name, row)
        if row["stages"] > 2:  # (with 2, Triton keeps int4's two scale loads plain: one step in flight)
            assert row["loop_plain_loads"] == 0, (name, row)
