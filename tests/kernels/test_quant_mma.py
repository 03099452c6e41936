"""The weight-stationary int4/int8 tensor-core kernel (kernels/quant_mma.py) against
``QuantizedWeight.dequantize(float64)`` and a float64 matmul, with the tolerances of
test_quant_gemv.py (its ``check``); and its int4 decode (bf16/fp16 bit patterns) on its own,
since under the interpreter the dot runs on plainly converted codes."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from hearth_kernels.activation import silu_and_mul
from hearth_kernels.quant_gemm import quant_gemm
from hearth_kernels.quant_gemv import SWAP, SWAP_SCALED, GemvConfig, quant_gemv, quant_gemv_configs
from hearth_kernels.counters import _COUNTERS
from hearth_kernels.quant_mma import (_MAGIC32, MmaConfig, _decode_int4, _decode_int4_f32, default_mma_config,
                                    mma_configs, quant_mma)
from tests.kernels.reference import DEVICE
from tests.kernels.test_quant_gemv import check, make_weight, poisoned_runs, rand_x

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


@pytest.mark.parametrize("rows,dtype", [(40, torch.bfloat16), (64, torch.float16)])
def test_int4_down_shaped_default_steps_of_64(monkeypatch, rows, dtype):
    """From 33 rows a down-shaped layer (K >= 3N, groups of 128) runs its default with K steps
    of 64, 4 in flight, scales ahead, K split (4 steps a program: two groups each, so the scales
    ahead move on within a program): the products of the steps-of-128 config."""
    monkeypatch.delenv("HEARTH_QUANT_MMA_AHEAD", raising=False)
    qw, prep = make_weight(4, 40, 1024, 128)
    x = rand_x(rows, 1024, dtype)
    cfg = default_mma_config(rows, 40, 1024, 4, 128)
    assert (cfg.block_k, cfg.stages, cfg.scale_w, cfg.ahead) == (64, 4, True, True) and cfg.split_k > 1
    y = quant_mma(x, prep)
    check(y, x, qw, weight_rounding=True)
    check(quant_mma(x, prep, config=cfg._replace(block_k=128, stages=3)), x, qw, weight_rounding=True)


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


@pytest.mark.parametrize("rows", [65, 100, 128])
def test_more_than_one_x_tile(rows):
    """From 65 rows each weight tile has two x tiles (the second partly masked below 128), in
    neighbouring programs: int4 and int8, K split or not, with a bias and ``out``."""
    qw, prep = make_weight(4, 40, 128, 32, seed=rows)
    x = rand_x(rows, 128, torch.bfloat16, seed=rows)
    for config in (SMALL, SPLIT):
        check(quant_mma(x, prep, config=config), x, qw)
    check(quant_mma(x, prep), x, qw, weight_rounding=True)  # the default: scale_w
    qw8, prep8 = make_weight(8, 24, 128, 128, seed=rows)
    bias = rand_x(1, 24, torch.bfloat16, seed=1)[0]
    out = torch.empty(rows, 24, dtype=torch.bfloat16, device=DEVICE)
    assert quant_mma(x, prep8, config=SPLIT, bias=bias, out=out) is out
    check(out, x, qw8, bias=bias)
    with pytest.raises(ValueError, match="1 to 128 rows"):
        quant_mma(rand_x(129, 128, torch.bfloat16), prep)
    # SwiGLU over [gate | up] inside the kernel, per-channel int8 without a split
    xg = rand_x(rows, 256, torch.bfloat16, seed=rows + 1)
    check(quant_mma(xg, prep8, config=SMALL, swiglu=True), silu_and_mul(xg), qw8)


def test_split_k_is_deterministic_and_leaves_its_counters_zero():
    qw, prep = make_weight(4, 40, 256, 32)
    x = rand_x(3, 256, torch.bfloat16)
    cfg = MmaConfig(16, 32, 1, 1, 4)
    first = quant_mma(x, prep, config=cfg)
    check(first, x, qw)
    assert torch.equal(quant_mma(x, prep, config=cfg), first)  # same bits: partials summed in split order
    assert not bool(_COUNTERS[x.device].any())  # reset by the last program of each tile


@pytest.mark.gpu
@pytest.mark.parametrize("split", [2, 4])
def test_split_k_at_a_wide_layer_writes_every_output_the_same_way(split):
    """The split-K pattern that raced in the Gluon kernel without per-thread fences (its last
    program summed a partial not yet visible: hearth_kernels/quant_mma_gluon.fits), at the shape
    where it did (the 8B gate_up, 64 rows, 448 tiles): every output written (poisoned with NaN
    first), the same bits on three calls, and right."""
    qw, prep = make_weight(4, 28672, 4096, 128, seed=split)
    x = rand_x(64, 4096, torch.bfloat16)
    cfg = MmaConfig(64, 128, 4, 3, split, True, True)
    y = poisoned_runs(lambda out: quant_mma(x, prep, config=cfg, out=out), (64, 28672))
    check(y, x, qw, weight_rounding=True)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("n,k,group,dtype,mins", [(72, 256, 64, torch.bfloat16, True),
                                                  (40, 384, 128, torch.float16, True),
                                                  (24, 256, 32, torch.float32, False)])
def test_scales_ahead(rows, n, k, group, dtype, mins):
    """``ahead``: each step's scales and mins loaded a step early (the last step's load
    clamped to the row's last group) give the same products, dequantized in registers or
    scaled after each step's dot, with K split (a split's first step mid-row) or not."""
    qw, prep = make_weight(4, n, k, group, mins, seed=rows)
    x = rand_x(rows, k, dtype)
    rounding = dtype != torch.float32
    for cfg in (SMALL, SPLIT):
        check(quant_mma(x, prep, config=cfg._replace(ahead=True)), x, qw)
        check(quant_mma(x, prep, config=cfg._replace(scale_w=True, ahead=True)), x, qw, weight_rounding=rounding)
    assert torch.equal(quant_mma(x, prep, config=SPLIT._replace(scale_w=True, ahead=True)),
                       quant_mma(x, prep, config=SPLIT._replace(scale_w=True)))  # the same values, a step early
    qw8, prep8 = make_weight(8, n, k, group, mins, seed=rows)
    check(quant_mma(x, prep8, config=SPLIT._replace(ahead=True)), x, qw8)


def test_scales_ahead_by_default_and_among_the_configs(monkeypatch):
    """Grouped weights load their scales a step ahead by default (``HEARTH_QUANT_MMA_AHEAD=0``:
    not); ``mma_configs`` lists its first configs again with the other setting, last."""
    monkeypatch.delenv("HEARTH_QUANT_MMA_AHEAD", raising=False)
    assert default_mma_config(64, 4096, 4096, 4, 128).ahead
    assert not default_mma_config(64, 4096, 4096, 8, 4096).ahead  # per channel: nothing to load ahead
    monkeypatch.setenv("HEARTH_QUANT_MMA_AHEAD", "0")
    assert not default_mma_config(64, 4096, 4096, 4, 128).ahead
    monkeypatch.delenv("HEARTH_QUANT_MMA_AHEAD")
    configs = mma_configs(64, 4096, 4096, 4, 128)
    assert len(set(configs)) == len(configs)
    for c in configs[:8]:
        assert c._replace(ahead=not c.ahead) in configs
    # every other config with scales ahead comes with its twin without (the first eight's twins,
    # last; the old wide default, listed both ways)
    assert not [c for c in configs[1:] if c.ahead and c._replace(ahead=False) not in configs]
    wide = mma_configs(64, 28672, 4096, 4, 128)
    assert {MmaConfig(128, 128, 8, 3, 1, True, True), MmaConfig(128, 128, 8, 3, 1, True, False)} <= set(wide)
    assert not [c for c in mma_configs(64, 4096, 4096, 8, 4096) if c.ahead]


def test_int8_takes_the_weight_stationary_kernel_up_to_swap_rows(monkeypatch):
    """int8 per output channel runs ``quant_mma`` for 2-128 rows (``SWAP_ROWS``; measured faster
    there than the fused kernel at up to 64); grouped int8 (128, Q8_0's 32, Q6_K's 16), 129 rows
    and ``HEARTH_QUANT_SWAP_INT8=0`` keep the fused kernel."""
    import hearth_kernels.quant_gemm as qg

    monkeypatch.delenv("HEARTH_QUANT_SWAP_INT8", raising=False)
    calls = []
    real = qg.quant_mma
    monkeypatch.setattr(qg, "quant_mma", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    for group, swapped in ((256, True), (128, False), (32, False), (16, False)):
        qw8, prep8 = make_weight(8, 40, 256, group)
        for rows in (2, 64, 65, qg.SWAP_ROWS, qg.SWAP_ROWS + 1):
            x8 = rand_x(rows, 256, torch.bfloat16, seed=rows)
            # (the fused kernel's groups of 16; the dequantize path from its threshold)
            check(qg.quant_gemm(x8, prep8), x8, qw8,
                  weight_rounding=group == 16 or qg.gemm_path(rows, prep8) == "dequant")
            assert len(calls) == (swapped and rows <= qg.SWAP_ROWS), (group, rows)
            calls.clear()
    qw8, prep8 = make_weight(8, 40, 256, 256)
    x8 = rand_x(5, 256, torch.bfloat16)
    monkeypatch.setenv("HEARTH_QUANT_SWAP_INT8", "0")
    check(qg.quant_gemm(x8, prep8), x8, qw8)
    assert not calls


def test_int4_routing_by_rows(monkeypatch):
    """int4: the weight-stationary kernel up to ``SWAP_ROWS`` (128), dequantize + matmul beyond
    (``DEQUANT_ROWS["int4"]`` is below it); an explicit ``dequant_rows`` at most M dequantizes."""
    import hearth_kernels.quant_gemm as qg

    taken = []
    real_mma, real_dq = qg.quant_mma, qg.dequantize_weight
    monkeypatch.setattr(qg, "quant_mma", lambda *a, **kw: taken.append("mma") or real_mma(*a, **kw))
    monkeypatch.setattr(qg, "dequantize_weight", lambda *a, **kw: taken.append("dequant") or real_dq(*a, **kw))
    assert qg.SWAP_ROWS == 128
    assert qg.DEQUANT_ROWS == {"int4": 96, "int8": 192, "int8 grouped": 128}
    qw, prep = make_weight(4, 24, 256, 128)
    for rows, dequant_rows, want in ((65, None, "mma"), (128, None, "mma"), (129, None, "dequant"),
                                     (100, 100, "dequant"), (100, 101, "mma")):
        x = rand_x(rows, 256, torch.bfloat16, seed=rows)
        check(qg.quant_gemm(x, prep, dequant_rows=dequant_rows), x, qw, weight_rounding=True)
        assert taken == [want], (rows, dequant_rows, taken)
        taken.clear()
    # int4 in groups of 32 (GGUF's Q4_K, Q4_0, Q4_1): two x tiles not timed, so only up to 64 rows
    qw32, prep32 = make_weight(4, 24, 128, 32)
    for rows, want in ((64, "mma"), (65, "fused"), (96, "dequant")):
        x = rand_x(rows, 128, torch.bfloat16, seed=rows)
        check(qg.quant_gemm(x, prep32), x, qw32, weight_rounding=True)
        assert qg.gemm_path(rows, prep32) == want and taken == ([] if want == "fused" else [want]), (rows, taken)
        taken.clear()


def test_quant_gemm_takes_the_swiglu(monkeypatch):
    """``quant_gemm(..., swiglu=True)`` multiplies silu(gate) * up on every path: the
    weight-stationary kernel (int4 and int8 per channel, SwiGLU first), the fused kernel (int8
    in groups of 32) and dequantize + matmul (many rows)."""
    import hearth_kernels.quant_gemm as qg

    monkeypatch.delenv("HEARTH_QUANT_SWAP_INT8", raising=False)

    seen = []
    real = qg.quant_mma
    monkeypatch.setattr(qg, "quant_mma", lambda x, *a, **kw: seen.append(kw.get("swiglu", False)) or real(x, *a, **kw))
    for bits, group, rows, dequant_rows in ((4, 128, 5, None), (8, 256, 5, None), (8, 32, 5, None), (4, 128, 6, 4)):
        qw, prep = make_weight(bits, 40, 256, group)
        xg = rand_x(rows, 512, torch.bfloat16, seed=rows)
        bias = rand_x(1, 40, torch.bfloat16, seed=9)[0]
        y = qg.quant_gemm(xg, prep, bias=bias, swiglu=True, dequant_rows=dequant_rows)
        check(y, silu_and_mul(xg), qw, bias=bias, weight_rounding=bits == 4)  # (int8 in groups: the fused kernel, exact)
    assert seen == [False, False]  # int4 and int8 per channel with 5 rows, the SwiGLU applied before


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


@triton.jit
def _decode32_probe(q_ptr, out_ptr, magic32, BN: tl.constexpr, W: tl.constexpr, POS: tl.constexpr):
    w = tl.load(q_ptr + tl.arange(0, BN)[:, None] * W + tl.arange(0, W)[None, :])
    c = _decode_int4_f32(w, magic32, POS)
    tl.store(out_ptr + tl.arange(0, BN)[:, None] * (8 * W) + tl.arange(0, 8 * W)[None, :], c)


@pytest.mark.parametrize("offset", [128, 1024])
def test_int4_float32_decode_gives_offset_codes_in_natural_order(offset):
    """The in-register dequantization's decode (codes moved into float32 bit patterns): every
    code at its input plus the offset, for every value at every position of a word (row r
    holds value (r + i) % 16 at input i of each word: all 16 values in all 8 positions, half
    the words with the sign bit set)."""
    rows = torch.arange(16)[:, None]
    codes = ((rows + torch.arange(64)[None, :]) % 16).to(torch.uint8)  # [rows, inputs]
    paired = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    words = paired.view(torch.int32)
    assert (words < 0).any() and (words >= 0).any()
    out = torch.empty(16, 64, dtype=torch.float32, device=DEVICE)
    _decode32_probe[(1,)](words.to(DEVICE), out, _MAGIC32[offset], BN=16, W=8, POS=16 if offset == 128 else 13)
    assert torch.equal(out.cpu(), codes.float() + offset)


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


def test_configs_and_errors(monkeypatch):
    cfg = default_mma_config(1, 4096, 4096, 4, 128)
    assert cfg.split_k > 1 and cfg.block_k == 128  # 64 tiles of N=4096: K split to fill the SMs
    assert default_mma_config(1, 28672, 4096, 4, 128).split_k == 1
    assert default_mma_config(1, 4096, 4096, 4, 32).block_k == 32  # a step inside one group
    for c in mma_configs(16, 4096, 14336, 4, 128):
        assert (14336 // c.block_k) % c.split_k == 0
    # from 33 rows a down-shaped layer (K >= 3N) of grouped weights steps K by 64, 4 in flight
    # (timed faster on an H100); the same config with steps of 128 is still among the configs
    down = default_mma_config(64, 4096, 14336, 4, 128)
    assert (down.block_n, down.block_k, down.stages, down.split_k, down.scale_w) == (64, 64, 4, 4, True)
    assert down._replace(block_k=128, stages=3) in mma_configs(64, 4096, 14336, 4, 128)
    for k in (14336, 384, 640, 1920):  # every config's split divides its K steps (3, 5, 15 of 128)
        for c in mma_configs(64, 128, k, 4, 128):
            assert (k // c.block_k) % c.split_k == 0, (k, c)
    assert default_mma_config(33, 4096, 14336, 4, 128).block_k == 64
    assert default_mma_config(32, 4096, 14336, 4, 128).block_k == 128  # 16/32-row tiles: as before
    assert default_mma_config(64, 6144, 4096, 4, 128).block_k == 128  # q/k/v, o, gate_up: as before
    assert default_mma_config(64, 28672, 4096, 4, 128).block_k == 128
    # a wide layer in groups of 128 (gate_up, an int4 head) keeps 64-row tiles from 33 rows, 4 in
    # flight, scales ahead (the H200's gate_up at 64 rows); per channel keeps the 128-row tile
    monkeypatch.delenv("HEARTH_QUANT_MMA_AHEAD", raising=False)
    monkeypatch.setenv("HEARTH_QUANT_MMA_WIDE128", "1")  # the A/B knob: the 128-row tile as before
    assert default_mma_config(64, 28672, 4096, 4, 128) == MmaConfig(128, 128, 8, 3, 1, True, True)
    assert default_mma_config(65, 28672, 4096, 4, 128) == MmaConfig(128, 128, 8, 3, 1, True, False)
    monkeypatch.delenv("HEARTH_QUANT_MMA_WIDE128")
    for rows in (33, 64, 65, 128):
        assert default_mma_config(rows, 28672, 4096, 4, 128) == MmaConfig(64, 128, 4, 4, 1, True, True), rows
        assert default_mma_config(rows, 28672, 4096, 4, 256)[:4] == (64, 128, 4, 4)
        assert default_mma_config(rows, 128256, 4096, 8, 4096)[:5] == (128, 128, 8, 3, 1), rows
    assert default_mma_config(32, 28672, 4096, 4, 128)[:4] == (64, 128, 4, 3)  # 16/32-row tiles: as before
    # groups of 32 (GGUF, reached directly: quant_gemm routes them elsewhere above 64 rows): the
    # 128-row tile, its scales in their step from 65 rows
    assert default_mma_config(64, 28672, 4096, 4, 32)[:2] == (128, 32)
    assert default_mma_config(64, 28672, 4096, 4, 32).ahead and not default_mma_config(65, 28672, 4096, 4, 32).ahead
    assert default_mma_config(128, 6144, 4096, 4, 128).ahead  # 64-row tiles keep it
    assert default_mma_config(64, 4096, 14336, 4, 32).block_k == 32  # groups of 32: a step a group
    assert default_mma_config(64, 4096, 14336, 4, 64)[1:4] == (64, 4, 3)  # groups of 64: as before
    assert default_mma_config(64, 4096, 14336, 8, 14336).block_k == 128  # per channel: as before
    qw, prep = make_weight(4, 40, 64, 32)
    with pytest.raises(ValueError, match="1 to 128 rows"):
        quant_mma(rand_x(129, 64, torch.bfloat16), prep)
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
    configs = qm.mma_configs(rows, 4096, 4096, 4, 128)
    for cfg in configs[:9] + [c for c in configs[9:] if c.ahead][:3]:
        bm = qm.block_m_for(rows)
        consts = dict(GROUP=128, BITS=4, HAS_MIN=True, HAS_BIAS=False, SWIGLU=swiglu, OFFSET=128, DOT_FP32=False,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_M=bm, PER_ROW=False, SPLIT_K=cfg.split_k,
                      STAGES=cfg.stages, ONE_ROW=rows == 1 and swiglu, SCALE_W=cfg.scale_w, AHEAD=cfg.ahead,
                      DECODE32=cfg.scale_w, FENCE=1 if cfg.split_k > 1 else 0)
        row = compile_kernel(qm._quant_mma_kernel, types, consts, cfg.warps, cfg.stages)
        print(json.dumps({"rows": rows, "swiglu": swiglu, "config": list(cfg), **row}), flush=True)
cfg = qm.default_mma_config(64, 4096, 14336, 4, 128)  # a down-shaped layer's default: K steps of 64
for swiglu in (False, True):
    consts = dict(GROUP=128, BITS=4, HAS_MIN=True, HAS_BIAS=False, SWIGLU=swiglu, OFFSET=128, DOT_FP32=False,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_M=64, PER_ROW=False, SPLIT_K=cfg.split_k,
                  STAGES=cfg.stages, ONE_ROW=False, SCALE_W=cfg.scale_w, AHEAD=cfg.ahead, DECODE32=cfg.scale_w,
                  FENCE=1 if cfg.split_k > 1 else 0)
    row = compile_kernel(qm._quant_mma_kernel, types, consts, cfg.warps, cfg.stages)
    print(json.dumps({"rows": 64, "swiglu": swiglu, "config": list(cfg), "down": True, **row}), flush=True)
for dt in ("bf16", "fp16"):  # int8 per channel (the int8 head's layout): codes converted by _INT8_ASM
    t8 = types | {"x_ptr": "*" + dt, "b_ptr": "*" + dt, "y_ptr": "*" + dt, "q_ptr": "*i8"}
    for rows in (1, 64):
        for cfg in qm.mma_configs(rows, 4096, 4096, 8, 4096)[:3]:
            consts = dict(GROUP=4096, BITS=8, HAS_MIN=False, HAS_BIAS=False, SWIGLU=False, OFFSET=0, DOT_FP32=False,
                          BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_M=qm.block_m_for(rows), PER_ROW=True,
                          SPLIT_K=cfg.split_k, STAGES=cfg.stages, ONE_ROW=False, SCALE_W=False, AHEAD=False, DECODE32=False,
                          FENCE=1 if cfg.split_k > 1 else 0)
            row = compile_kernel(qm._quant_mma_kernel, t8, consts, cfg.warps, cfg.stages)
            print(json.dumps({"rows": rows, "swiglu": False, "config": list(cfg), "int8": dt, **row}), flush=True)
for cc, dt in ((80, "bf16"), (80, "fp16"), (89, "bf16")):  # the int8 assembly on Ampere and Ada too
    t8 = types | {"x_ptr": "*" + dt, "b_ptr": "*" + dt, "y_ptr": "*" + dt, "q_ptr": "*i8"}
    consts = dict(GROUP=4096, BITS=8, HAS_MIN=False, HAS_BIAS=False, SWIGLU=False, OFFSET=0, DOT_FP32=False,
                  BLOCK_N=64, BLOCK_K=128, BLOCK_M=64, PER_ROW=True, SPLIT_K=1, STAGES=3, ONE_ROW=False, SCALE_W=False,
                  AHEAD=False, DECODE32=False)
    row = compile_kernel(qm._quant_mma_kernel, t8, consts, 4, 3, cc)
    print(json.dumps({"rows": 64, "swiglu": False, "config": [64, 128, 4, 3, 1, False, False], "int8": dt, "cc": cc,
                      **row}))
"""


@pytest.mark.slow
def test_compiles_for_sm90_on_wgmma_without_spills():
    """The GPU build (not the interpreter) at Llama-8B settings: the listed configs."""
    from tests.kernels.sm90_compile import compiled_rows

    rows = compiled_rows(_COMPILE, 900)
    assert len(rows) >= 12
    for row in rows:
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, row
        assert row["pipelined"], row
        if row["config"][0] >= 64 and not row.get("cc"):  # sm_80/89 have no wgmma
            assert row["wgmma"], row
    assert len([row for row in rows if row.get("cc")]) == 3  # compiled for sm_80/89 too
    assert len([row for row in rows if row["config"][6] and not row.get("down")]) == 16  # scales ahead: the default and three more, each row count
    assert [row["config"][1] for row in rows if row.get("down")] == [64, 64]  # the down-shaped default, compiled
    for row in rows:  # the int8 decode gets neighbouring K columns, even first
        if row.get("int8"):
            assert row["asm_pairs"] is True, row
