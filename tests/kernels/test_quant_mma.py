"""The weight-stationary int4/int8 tensor-core kernel (kernels/quant_mma.py) against
``QuantizedWeight.dequantize(float64)`` and a float64 matmul, with the tolerances of
test_quant_gemv.py (its ``check``); and its int4 decode (bf16/fp16 bit patterns) on its own,
since under the interpreter the dot runs on plainly converted codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from hearth_kernels.activation import silu_and_mul
from hearth_kernels.quant_gemm import quant_gemm
from hearth_kernels.quant_gemv import SWAP, SWAP_SCALED, GemvConfig, quant_gemv, quant_gemv_configs
from hearth_kernels.quant_mma import _COUNTERS, MmaConfig, _decode_int4, default_mma_config, mma_configs, quant_mma
from tests.kernels.reference import DEVICE
from tests.kernels.test_quant_gemv import check, make_weight, rand_x

SMALL = MmaConfig(32, 32, 2, 2, 1)  # mma.sync-sized tiles, cheap under the interpreter
SPLIT = MmaConfig(16, 32, 1, 1, 2)  # K split over two programs per tile


@pytest.mark.parametrize("rows", [1, 3, 17, 40])
@pytest.mark.parametrize("n,k,group,dtype", [(72, 256, 64, torch.bfloat16), (40, 128, 32, torch.float16),
                                             (24, 96, 32, torch.float32)])
def test_int4(rows, n, k, group, dtype):
    qw, prep = make_weight(4, n, k, group)
    x = rand_x(rows, k, dtype)
    for config in (SMALL, SPLIT if (k // 32) % 2 == 0 else SMALL):
        check(quant_mma(x, prep, config=config), x, qw)
    # the default dequantizes grouped weight tiles to x's dtype in registers (scale_w)
    check(quant_mma(x, prep), x, qw, weight_rounding=dtype != torch.float32)
    # the weight tile dequantized in registers: rounded to x's dtype like the dequantize path
    for config in (SMALL._replace(scale_w=True), SPLIT._replace(scale_w=True) if (k // 32) % 2 == 0 else None):
        if config is not None:
            check(quant_mma(x, prep, config=config), x, qw, weight_rounding=dtype != torch.float32)


@pytest.mark.parametrize("n,k,group,mins", [(40, 96, 96, False), (72, 192, 64, True), (24, 256, 256, True)])
def test_int8(n, k, group, mins):
    qw, prep = make_weight(8, n, k, group, mins)
    for rows in (1, 5):
        x = rand_x(rows, k, torch.bfloat16)
        check(quant_mma(x, prep, config=SMALL), x, qw)
        check(quant_mma(x, prep, config=SPLIT), x, qw)


@pytest.mark.parametrize("rows", [1, 2])
def test_swiglu_bias_and_out(rows):
    """One row with SwiGLU takes the vector path (ONE_ROW); two rows the tile path."""
    n, k = 40, 128
    qw, prep = make_weight(4, n, k, 32)
    x = rand_x(rows, 2 * k, torch.bfloat16)
    bias = rand_x(1, n, torch.bfloat16, seed=5)[0]
    out = torch.empty(rows, n, dtype=torch.bfloat16, device=DEVICE)
    for config in (SMALL, SPLIT, SPLIT._replace(scale_w=True)):
        y = quant_mma(x, prep, config=config, swiglu=True, bias=bias, out=out)
        assert y is out
        check(y, silu_and_mul(x), qw, bias=bias, weight_rounding=config.scale_w)


def test_split_k_is_deterministic_and_leaves_its_counters_zero():
    qw, prep = make_weight(4, 40, 256, 32)
    x = rand_x(3, 256, torch.bfloat16)
    cfg = MmaConfig(16, 32, 1, 1, 4)
    first = quant_mma(x, prep, config=cfg)
    check(first, x, qw)
    assert torch.equal(quant_mma(x, prep, config=cfg), first)  # same bits: partials summed in split order
    assert not bool(_COUNTERS[x.device].any())  # reset by the last program of each tile


@triton.jit
def _decode_probe(q_ptr, out_ptr, magic, BN: tl.constexpr, W: tl.constexpr, OFFSET: tl.constexpr):
    w = tl.load(q_ptr + tl.arange(0, BN)[:, None] * W + tl.arange(0, W)[None, :])
    c = _decode_int4(w, magic, out_ptr.dtype.element_ty, OFFSET)
    tl.store(out_ptr + tl.arange(0, BN)[:, None] * (8 * W) + tl.arange(0, 8 * W)[None, :], c)


@pytest.mark.parametrize("dtype,magic,offset", [(torch.bfloat16, 0x43004300, 128), (torch.float16, 0x64006400, 1024)])
def test_int4_decode_gives_offset_codes_in_natural_order(dtype, magic, offset):
    """The GPU's decode (bit patterns, half-word joins): every code at its input, plus the offset."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.uint8)  # [rows, inputs]
    paired = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # pair order: input 2j low, 2j + 1 high
    out = torch.empty(16, 64, dtype=dtype, device=DEVICE)
    _decode_probe[(1,)](paired.to(DEVICE).view(torch.int32), out, magic, BN=16, W=8, OFFSET=offset)
    assert torch.equal(out.float().cpu(), codes.float() + offset)


def test_gemv_and_gemm_reach_it():
    n, k = 40, 256
    qw, prep = make_weight(4, n, k, 128)
    configs = quant_gemv_configs(n, k, 4, 128)
    swap = [c for c in configs if c.kind in (SWAP, SWAP_SCALED)]
    assert swap and not [c for c in quant_gemv_configs(n, k, 8) if c.kind in (SWAP, SWAP_SCALED)]  # int4 only
    x = rand_x(1, k, torch.bfloat16)
    check(quant_gemv(x, prep, config=GemvConfig(32, 32, 2, SWAP, 2, 2)), x, qw)
    xm = rand_x(9, k, torch.bfloat16)
    check(quant_gemm(xm, prep), xm, qw, weight_rounding=True)  # 9 rows of int4: the weight-stationary kernel


def test_configs_and_errors():
    cfg = default_mma_config(1, 4096, 4096, 4, 128)
    assert cfg.split_k > 1 and cfg.block_k == 128  # 64 tiles of N=4096: K split to fill the SMs
    assert default_mma_config(1, 28672, 4096, 4, 128).split_k == 1
    assert default_mma_config(1, 4096, 4096, 4, 32).block_k == 32  # a step inside one group
    for c in mma_configs(16, 4096, 14336, 4, 128):
        assert (14336 // c.block_k) % c.split_k == 0
    qw, prep = make_weight(4, 40, 64, 32)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        quant_mma(rand_x(65, 64, torch.bfloat16), prep)
    _, prep8 = make_weight(8, 40, 100, 100)
    with pytest.raises(ValueError, match="multiple of 16"):
        quant_mma(rand_x(1, 100, torch.bfloat16), prep8)


_COMPILE = r"""
import json
from tests.kernels.sm90_compile import compile_kernel
from hearth_kernels import quant_mma as qm
types = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16", "b_ptr": "*bf16", "y_ptr": "*bf16",
         "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
for rows, swiglu in ((1, False), (1, True), (16, False), (64, False)):
    for cfg in qm.mma_configs(rows, 4096, 4096, 4, 128)[:9]:
        bm = qm.block_m_for(rows)
        consts = dict(GROUP=128, BITS=4, HAS_MIN=True, HAS_BIAS=False, SWIGLU=swiglu, OFFSET=128, DOT_FP32=False,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_M=bm, PER_ROW=False, SPLIT_K=cfg.split_k,
                      STAGES=cfg.stages, ONE_ROW=rows == 1 and swiglu, SCALE_W=cfg.scale_w)
        row = compile_kernel(qm._quant_mma_kernel, types, consts, cfg.warps, cfg.stages)
        print(json.dumps({"rows": rows, "swiglu": swiglu, "config": list(cfg), **row}), flush=True)
"""


@pytest.mark.slow
def test_compiles_for_sm90_on_wgmma_without_spills():
    """The GPU build (not the interpreter) at Llama-8B settings: the listed configs."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file() or not triton.__version__.startswith("3.6."):
        pytest.skip("needs Triton 3.6 with its bundled ptxas (see test_compile_sm90.py)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", _COMPILE], cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert len(rows) >= 12
    for row in rows:
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, row
        assert row["pipelined"], row
        if row["config"][0] >= 64:
            assert row["wgmma"], row
