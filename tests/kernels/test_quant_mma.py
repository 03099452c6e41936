"""The weight-stationary int4/int8 tensor-core kernel (kernels/quant_mma.py) against
``QuantizedWeight.dequantize(float64)`` and a float64 matmul, with the tolerances of
test_quant_gemv.py (its ``check``); and its int4 decode (bf16/fp16 bit patterns) on its own,
since under the interpreter the dot runs on plainly converted codes."""

from __future__ import annotations

import dataclasses
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
from hearth_kernels.quant_mma import (_COUNTERS, XP_STEP, MmaConfig, _decode_int4, default_mma_config, mma_configs,
                                      permute_x, quant_mma, xp_fits)
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


XP = MmaConfig(32, 128, 2, 2, 1, True, True)  # the permuted-x kernel


def pair_rounded(qw, dtype: torch.dtype):
    """``qw`` with its scale and min rounded to ``dtype`` as the permuted-x kernel's pair
    arithmetic takes them (bf16 rounds the float16 values; fp16 and fp32 keep them)."""
    if dtype != torch.bfloat16:
        return qw
    return dataclasses.replace(qw, scales=qw.scales.to(dtype).float(), mins=qw.mins.to(dtype).float())


def test_permute_x_puts_each_input_where_the_pairs_want_it():
    x = torch.arange(2 * 256, dtype=torch.float32, device=DEVICE).view(2, 256)
    xp = permute_x(x, 256)
    k0, s, j, e = torch.meshgrid(torch.arange(0, 256, 128), torch.arange(4), torch.arange(16), torch.arange(2),
                                 indexing="ij")
    dst = (k0 + 32 * s + 2 * j + e).flatten()
    src = (k0 + 8 * j + s + 4 * e).flatten()
    assert torch.equal(xp[:, dst.to(DEVICE)], x[:, src.to(DEVICE)])
    assert sorted(src.tolist()) == list(range(256))  # a permutation
    g = rand_x(3, 512, torch.bfloat16)
    assert torch.equal(permute_x(g, 256, swiglu=True), permute_x(silu_and_mul(g), 256))


@pytest.mark.parametrize("rows", [1, 5, 17, 40])
@pytest.mark.parametrize("n,k,group,dtype", [(72, 256, 128, torch.bfloat16), (40, 384, 384, torch.float16),
                                             (24, 256, 256, torch.float32)])
def test_int4_permuted_x(rows, n, k, group, dtype):
    """The permuted-x kernel against float64, its weights rounded once to x's dtype from the
    pair-rounded scale and min; K split, SwiGLU and a bias too."""
    qw, prep = make_weight(4, n, k, group, seed=rows)
    assert xp_fits(k, 4, group) and k % XP_STEP == 0
    ref = pair_rounded(qw, dtype)
    x = rand_x(rows, k, dtype)
    rounding = dtype != torch.float32
    check(quant_mma(x, prep, config=XP), x, ref, weight_rounding=rounding)
    check(quant_mma(x, prep, config=XP._replace(split_k=2)), x, ref, weight_rounding=rounding)
    xg = rand_x(rows, 2 * k, dtype, seed=4)
    bias = rand_x(1, n, dtype, seed=5)[0]
    y = quant_mma(xg, prep, config=XP._replace(block_n=16, warps=1), swiglu=True, bias=bias)
    check(y, silu_and_mul(xg), ref, bias=bias, weight_rounding=rounding)


@pytest.mark.parametrize("config,rows,dtype", [(MmaConfig(64, 128, 4, 3, 2, True, True), 40, torch.float16),
                                               (MmaConfig(128, 128, 8, 3, 1, True, True), 64, torch.bfloat16)])
def test_int4_permuted_x_at_the_shipped_tiles(config, rows, dtype):
    """The tiles ``mma_configs`` lists (wgmma-sized on a GPU: 64 rows on 4 warps, 128 on 8), fp16
    with K split."""
    qw, prep = make_weight(4, 136, 512, 128, seed=rows)
    x = rand_x(rows, 512, dtype)
    assert config in mma_configs(rows, 4096, 4096, 4, 128)
    check(quant_mma(x, prep, config=config), x, pair_rounded(qw, dtype), weight_rounding=True)


def test_permuted_x_needs_whole_groups_of_128():
    assert not xp_fits(256, 4, 64) and not xp_fits(192, 4, 192) and not xp_fits(256, 8, 128)
    qw, prep = make_weight(4, 40, 256, 64)  # falls back to the natural-order kernel (scale_w)
    x = rand_x(3, 256, torch.bfloat16)
    check(quant_mma(x, prep, config=XP), x, qw, weight_rounding=True)


def test_the_knobs_route_the_defaults(monkeypatch):
    """``HEARTH_QUANT_MMA_XP=1`` makes the permuted-x kernel the default where it fits;
    ``HEARTH_QUANT_SWAP_INT8=1`` sends int8 with few rows to the weight-stationary kernel."""
    import hearth_kernels.quant_gemm as qg

    assert not default_mma_config(64, 4096, 4096, 4, 128).xp
    monkeypatch.setenv("HEARTH_QUANT_MMA_XP", "1")
    assert default_mma_config(64, 4096, 4096, 4, 128).xp and default_mma_config(8, 4096, 4096, 4, 4096).xp
    assert not default_mma_config(64, 4096, 4096, 4, 64).xp and not default_mma_config(64, 4096, 4096, 8, 4096).xp
    qw, prep = make_weight(4, 40, 256, 128)
    x = rand_x(3, 256, torch.bfloat16)
    check(quant_mma(x, prep), x, pair_rounded(qw, torch.bfloat16), weight_rounding=True)

    calls = []
    real = qg.quant_mma
    monkeypatch.setattr(qg, "quant_mma", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    qw8, prep8 = make_weight(8, 40, 128, 128)
    x8 = rand_x(5, 128, torch.bfloat16)
    check(qg.quant_gemm(x8, prep8), x8, qw8)
    assert not calls  # int8: the fused kernel by default
    monkeypatch.setenv("HEARTH_QUANT_SWAP_INT8", "1")
    check(qg.quant_gemm(x8, prep8), x8, qw8)
    assert len(calls) == 1


@pytest.mark.parametrize("xp", ["0", "1"])
def test_quant_gemm_takes_the_swiglu(monkeypatch, xp):
    """``quant_gemm(..., swiglu=True)`` multiplies silu(gate) * up on every path: the
    weight-stationary kernel (in the permuted-x pass with ``HEARTH_QUANT_MMA_XP=1``), the
    fused kernel (int8) and dequantize + matmul (many rows)."""
    import hearth_kernels.quant_gemm as qg

    monkeypatch.setenv("HEARTH_QUANT_MMA_XP", xp)
    seen = []
    real = qg.quant_mma
    monkeypatch.setattr(qg, "quant_mma", lambda x, *a, **kw: seen.append(kw.get("swiglu", False)) or real(x, *a, **kw))
    for bits, rows, dequant_rows in ((4, 5, None), (8, 5, None), (4, 6, 4)):
        qw, prep = make_weight(bits, 40, 256, 128)
        xg = rand_x(rows, 512, torch.bfloat16, seed=rows)
        bias = rand_x(1, 40, torch.bfloat16, seed=9)[0]
        y = qg.quant_gemm(xg, prep, bias=bias, swiglu=True, dequant_rows=dequant_rows)
        ref = pair_rounded(qw, torch.bfloat16) if (bits, dequant_rows, xp) == (4, None, "1") else qw
        check(y, silu_and_mul(xg), ref, bias=bias, weight_rounding=bits == 4)
    assert seen == [xp == "1"]  # int4 with 5 rows only: SwiGLU inside the permuted-x pass, else first


def test_the_int8_assembly_converts_every_pair_of_codes_exactly():
    """``_INT8_ASM`` run by a model of the PTX ISA (tests/kernels/ptx_model.py; the interpreter
    runs no assembly): every pair of int8 codes, as bf16 and as fp16, is the pair of values."""
    from hearth_kernels.quant_mma import _INT8_ASM
    from tests.kernels.ptx_model import run, unpair

    for asm, ty in zip(_INT8_ASM.value, ("bf16", "f16")):
        for lo in range(-128, 128):
            for hi in range(-128, 128, 5):
                got = run(asm, {"$1": (lo & 0xFF) | ((hi & 0xFF) << 8)})["$0"]
                assert unpair(got, ty) == (lo, hi), (ty, lo, hi)


def test_the_int4_pair_assembly_is_q_times_s_plus_m_rounded_once():
    """``_PAIR_ASM`` (the permuted-x kernel's decode) on the PTX model: for each shift s, the
    pair (nibble s, nibble s + 4) of a word as round(q * s + m), for random words, scales, mins."""
    from hearth_kernels.quant_mma import _PAIR_ASM
    from tests.kernels.ptx_model import pair, run, unpair

    g = torch.Generator().manual_seed(7)
    for i, asm in enumerate(_PAIR_ASM.value):
        ty, shift = ("bf16", i) if i < 4 else ("f16", i - 4)
        dt = torch.bfloat16 if ty == "bf16" else torch.float16
        for _ in range(40):
            word = int(torch.randint(0, 1 << 32, (1,), generator=g, dtype=torch.int64))
            s = float(torch.rand(1, generator=g) * 0.1 + 1e-3)
            m = float(-8 * s * torch.rand(1, generator=g))
            sp, mp = pair(s, s, ty), pair(m, m, ty)
            s16, m16 = unpair(sp, ty)[0], unpair(mp, ty)[0]
            got = unpair(run(asm, {"$1": word, "$2": word, "$3": sp, "$4": mp})["$0"], ty)
            q = ((word >> (4 * shift)) & 15, (word >> (4 * shift + 16)) & 15)
            want = tuple(float(torch.tensor(qi * s16 + m16, dtype=torch.float64).to(dt)) for qi in q)
            assert got == want, (ty, shift, hex(word), got, want)


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
for dt in ("bf16", "fp16"):  # int8 per channel (the int8 head's layout): codes converted by _INT8_ASM
    t8 = types | {"x_ptr": "*" + dt, "b_ptr": "*" + dt, "y_ptr": "*" + dt, "q_ptr": "*i8"}
    for rows in (1, 64):
        for cfg in qm.mma_configs(rows, 4096, 4096, 8, 4096)[:3]:
            consts = dict(GROUP=4096, BITS=8, HAS_MIN=False, HAS_BIAS=False, SWIGLU=False, OFFSET=0, DOT_FP32=False,
                          BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_M=qm.block_m_for(rows), PER_ROW=True,
                          SPLIT_K=cfg.split_k, STAGES=cfg.stages, ONE_ROW=False, SCALE_W=False)
            row = compile_kernel(qm._quant_mma_kernel, t8, consts, cfg.warps, cfg.stages)
            print(json.dumps({"rows": rows, "swiglu": False, "config": list(cfg), "int8": dt, **row}), flush=True)
xtypes = {k: v for k, v in types.items() if k != "x_ptr"} | {"xp_ptr": "*bf16"}
for cc, dt in ((80, "bf16"), (80, "fp16"), (89, "bf16")):  # the inline assembly on Ampere and Ada too
    consts = dict(GROUP=128, HAS_BIAS=False, DOT_FP32=False, BLOCK_N=64, BLOCK_M=64, SPLIT_K=1, STAGES=3)
    t = {k: v for k, v in types.items() if k != "x_ptr"} | {"xp_ptr": "*" + dt, "b_ptr": "*" + dt, "y_ptr": "*" + dt}
    row = compile_kernel(qm._quant_mma_xp_kernel, t, consts, 4, 3, cc)
    print(json.dumps({"rows": 64, "swiglu": False, "config": [64, 128, 4, 3, 1, True, True], "cc": cc, **row}))
    t8 = types | {"x_ptr": "*" + dt, "b_ptr": "*" + dt, "y_ptr": "*" + dt, "q_ptr": "*i8"}
    consts = dict(GROUP=4096, BITS=8, HAS_MIN=False, HAS_BIAS=False, SWIGLU=False, OFFSET=0, DOT_FP32=False,
                  BLOCK_N=64, BLOCK_K=128, BLOCK_M=64, PER_ROW=True, SPLIT_K=1, STAGES=3, ONE_ROW=False, SCALE_W=False)
    row = compile_kernel(qm._quant_mma_kernel, t8, consts, 4, 3, cc)
    print(json.dumps({"rows": 64, "swiglu": False, "config": [64, 128, 4, 3, 1, False, False], "int8": dt, "cc": cc,
                      **row}))
for rows in (16, 64):
    for cfg in [c for c in qm.mma_configs(rows, 4096, 4096, 4, 128) if c.xp]:
        consts = dict(GROUP=128, HAS_BIAS=False, DOT_FP32=False, BLOCK_N=cfg.block_n, BLOCK_M=qm.block_m_for(rows),
                      SPLIT_K=cfg.split_k, STAGES=cfg.stages)
        row = compile_kernel(qm._quant_mma_xp_kernel, xtypes, consts, cfg.warps, cfg.stages)
        print(json.dumps({"rows": rows, "swiglu": False, "config": list(cfg), **row}), flush=True)
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
        if row["config"][0] >= 64 and not row.get("cc"):  # sm_80/89 have no wgmma
            assert row["wgmma"], row
    assert len([row for row in rows if row.get("cc")]) == 6  # compiled for sm_80/89 too
    xp = [row for row in rows if row["config"][6] and not row.get("cc")]
    assert len(xp) >= 12
    for row in xp:  # the permuted-x kernel's point: its decoded weights go to the wgmma from registers
        assert not row["ldmatrix"], row
    for row in rows:  # its pair decode (and the int8 one) gets neighbouring K columns, even first
        if row["config"][6] or row.get("int8"):
            assert row["asm_pairs"] is True, row
