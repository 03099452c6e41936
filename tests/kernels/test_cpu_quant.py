"""hearth_kernels.cpu_quant (the C int4/int8 matmul) against float64 references.

The kernel quantizes activations to int8 blocks of 32 (d = max|x|/127, code = round(x/d))
and returns W . x_hat. So it is checked two ways:
- tightly against a float64 emulation: W (QuantizedWeight.dequantize, float64) times the
  float64 x_hat, within 1e-5 of the sum of the magnitudes of the terms (fp32 accumulation);
- loosely against the unquantized W . x: |error| <= |W| . |x - x_hat| <= |W| . (d/2) per
  block (plus the same fp32 slack), the bound the module documents.
Both the AVX2 path (when this CPU has it) and the portable scalar path run every case, at
small odd shapes: N not a multiple of the 4-row unroll, several groups, 1-3 rows.
"""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from engine.quant.qweight import QuantizedWeight, pack_int4
from engine.quant.rtn import quantize_int4, quantize_int8
from hearth_kernels import cpu_quant

# Skipped only where nothing can build it: with a compiler here, a failed build fails the
# tests (clang once refused the AVX2 source, and every test here was skipped, not failed).
pytestmark = pytest.mark.skipif(cpu_quant.available() is not None and cpu_quant._compiler() is None,
                                reason=f"CPU quantized kernel unavailable: {cpu_quant.available()}")


def _isas() -> list[str]:
    """The portable path always; the AVX2 one where this CPU runs it."""
    if cpu_quant.available() is None and cpu_quant._library().hq_best_isa() == 2:
        return ["scalar", "avx2"]
    return ["scalar"]


ISAS = pytest.mark.parametrize("isa", _isas())


def _emulate_acts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, block scales) of the kernel's activation quantization, in float32 like the C
    (same operations, so bit-identical): x [M, K] -> codes [M, Kp], d [M, Kp/32]."""
    m, k = x.shape
    kp = -(-k // 32) * 32
    xp = torch.nn.functional.pad(x.float(), (0, kp - k)).view(m, kp // 32, 32)
    d = xp.abs().amax(dim=-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    codes = torch.round(xp * inv.unsqueeze(-1))
    return codes.view(m, kp).to(torch.int8), d


def _x_hat(x: torch.Tensor) -> torch.Tensor:
    codes, d = _emulate_acts(x)
    m, k = x.shape
    return (codes.double().view(m, -1, 32) * d.double().unsqueeze(-1)).view(m, -1)[:, :k]


def _check(y: torch.Tensor, qw: QuantizedWeight, x: torch.Tensor) -> None:
    w64 = qw.dequantize(torch.float64)
    xh = _x_hat(x)
    # magnitude of the terms the kernel sums in fp32 (code*scale and min parts separately:
    # they can cancel in W itself)
    n, k, g = qw.out_features, qw.in_features, qw.group_size
    scaled = (qw.codes().double().view(n, k // g, g) * qw.scales.double().unsqueeze(-1)).view(n, k)
    mag = xh.abs() @ scaled.abs().T
    if qw.mins is not None:
        mag = mag + xh.abs() @ qw.mins.double().repeat_interleave(g, dim=1).abs().T
    slack = 1e-5 * mag + 1e-30
    tight = (y.double() - xh @ w64.T).abs()
    assert (tight <= slack).all(), f"vs emulation: worst excess {(tight - slack).max().item():.3g}"
    # documented bound against the unquantized product
    _, d = _emulate_acts(x)
    half_step = (d.double() / 2).repeat_interleave(32, dim=1)[:, :k]
    bound = half_step @ w64.abs().T + slack
    loose = (y.double() - x.double() @ w64.T).abs()
    assert (loose <= bound).all(), f"vs float64 x: worst excess {(loose - bound).max().item():.3g}"


def _int4(n: int, k: int, g: int, kind: str, seed: int) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    if kind == "rtn":  # asymmetric, integer zero points
        return quantize_int4(torch.randn(n, k, generator=gen), g)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).half()
    if kind == "sym":  # GGUF Q4_0 / GPTQ sym: min = -8 * scale
        mins = (-8 * scales.float()).half()
    else:  # GGUF Q4_1: any float min
        mins = (torch.randn(n, k // g, generator=gen) * 0.3).half()
    return QuantizedWeight(4, g, pack_int4(codes), scales, mins)


def _int8(n: int, k: int, g: int, with_mins: bool, seed: int) -> QuantizedWeight:
    qw = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), g)
    qw.qweight[0, :3] = -128  # the one code whose magnitude doesn't fit int8 (the AVX2 sign trick)
    if with_mins:
        gen = torch.Generator().manual_seed(seed + 1)
        qw.mins = (torch.randn(qw.scales.shape, generator=gen) * 0.05).half()
    return qw


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 100))
    x[0, :5] *= 40  # an outlier block: a coarse activation scale where it sits
    if m > 1:
        x[1, 32:64] = 0  # an all-zero block (scale 0)
    return x


@ISAS
@pytest.mark.parametrize("kind", ["rtn", "sym", "q4_1"])
@pytest.mark.parametrize("n,k,g", [(37, 96, 32), (45, 128, 64), (13, 64, 64), (6, 192, 96), (3, 32, 32)])
def test_int4_matches_float64(isa, kind, n, k, g):
    qw = _int4(n, k, g, kind, seed=n * k)
    prepared = cpu_quant.prepare_int4(qw.qweight, qw.scales, qw.mins, g)
    for m in (1, 2, 3, 5):
        x = _x(m, k, seed=m)
        _check(cpu_quant.matmul(x, prepared, isa=isa, threads=2), qw, x)


@ISAS
@pytest.mark.parametrize("with_mins", [False, True])
@pytest.mark.parametrize("n,k,g", [(37, 96, 32), (21, 100, 100), (19, 128, 128), (11, 192, 64), (5, 7, 7)])
def test_int8_matches_float64(isa, with_mins, n, k, g):
    qw = _int8(n, k, g, with_mins, seed=n + k)
    prepared = cpu_quant.prepare_int8(qw.qweight, qw.scales, qw.mins, g)
    for m in (1, 2, 3, 5):
        x = _x(m, k, seed=m)
        _check(cpu_quant.matmul(x, prepared, isa=isa, threads=2), qw, x)


def _int8_g16(n: int, k: int, seed: int, with_mins: bool = False) -> QuantizedWeight:
    """GGUF Q6_K's shape: codes -32..31, one signed scale per 16 inputs (d * int8 sub-scale);
    with mins, a different min per 16 inputs (a Q4_K/Q6_K q/k/v in one form: Q4_K's codes
    0..15 with its mins, engine/loader/gguf.py)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-32, 32, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.randint(-128, 128, (n, k // 16), generator=gen).float() * 0.0007).half()
    mins = (torch.randn(n, k // 16, generator=gen) * 0.05).half() if with_mins else None
    return QuantizedWeight(8, 16, codes, scales, mins)


@ISAS
@pytest.mark.parametrize("with_mins", [False, True])
@pytest.mark.parametrize("n,k", [(37, 96), (5, 32), (13, 256), (6, 1536)])
def test_int8_in_groups_of_16_matches_float64(isa, n, k, with_mins):
    """Two scales (and mins) per activation block (its halves): decode (one row, 4-row
    unroll and the rest) and several rows (the per-row path: the tiles take groups of 32
    and up)."""
    qw = _int8_g16(n, k, seed=n + k, with_mins=with_mins)
    prepared = cpu_quant.prepare_int8(qw.qweight, qw.scales, qw.mins, 16)
    for m in (1, 2, 3, 5):
        x = _x(m, k, seed=m)
        _check(cpu_quant.matmul(x, prepared, isa=isa, threads=2), qw, x)
    w = cpu_quant.dequantize(prepared, torch.full((n, k), float("nan")), isa=isa)
    if with_mins:  # (code * scale + min: one fp32 rounding, the fused multiply-add's)
        assert torch.allclose(w.double(), qw.dequantize(torch.float64), rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(w.double(), qw.dequantize(torch.float64))


@ISAS
@pytest.mark.parametrize("k", [96, 100, 7])
def test_activation_quantization_is_the_documented_one(isa, k):
    x = _x(3, k, seed=k)
    codes, d, sums = cpu_quant.quantize_activations(x, group_size=k if k % 32 else 32, isa=isa)
    want_codes, want_d = _emulate_acts(x)
    assert torch.equal(codes, want_codes)
    assert torch.equal(d, want_d)
    if k % 32 == 0:  # group 32: a group's sum is its block's d * sum(codes)
        assert torch.allclose(sums.double(), d.double() * codes.double().view(3, -1, 32).sum(-1), rtol=1e-6)


@ISAS
def test_activation_rounding_ties_to_even(isa):
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -0.5])  # d = 1: exact ties
    codes, d, _ = cpu_quant.quantize_activations(x, group_size=32, isa=isa)
    assert d.item() == 1.0
    assert codes[0, :6].tolist() == [127, 2, -4, 0, 2, 0]


def test_paths_agree_and_threads_do_not_change_results():
    qw = _int4(301, 160, 32, "q4_1", seed=3)  # several row chunks per thread
    prepared = cpu_quant.prepare_int4(qw.qweight, qw.scales, qw.mins, 32)
    x = _x(2, 160, seed=1)
    one = cpu_quant.matmul(x, prepared, threads=1)
    for threads in (2, 3, 8):
        assert torch.equal(cpu_quant.matmul(x, prepared, threads=threads), one)
    cpu_quant.set_spin_us(0)  # helpers sleep between calls: woken (or left out), same result
    try:
        for _ in range(20):
            assert torch.equal(cpu_quant.matmul(x, prepared, threads=2), one)
    finally:
        cpu_quant.set_spin_us(100)
    _check(one, qw, x)


def test_concurrent_callers_get_their_own_results():
    qw = _int8(260, 64, 32, False, seed=9)
    prepared = cpu_quant.prepare_int8(qw.qweight, qw.scales, None, 32)
    xs = [_x(1, 64, seed=s) for s in range(4)]
    want = [cpu_quant.matmul(x, prepared, threads=1) for x in xs]
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}

    def call(i):
        for _ in range(50):
            got[i].append(cpu_quant.matmul(xs[i], prepared, threads=2))

    workers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for i in range(4):
        assert all(torch.equal(y, want[i]) for y in got[i])


@ISAS
@pytest.mark.parametrize("bits,n,k,g", [(4, 37, 96, 32), (4, 9, 128, 64), (8, 21, 100, 100), (8, 13, 64, 32)])
def test_dequantize_matches_qweight(isa, bits, n, k, g):
    qw = _int4(n, k, g, "q4_1", seed=k) if bits == 4 else _int8(n, k, g, True, seed=k)
    prepared = (cpu_quant.prepare_int4 if bits == 4 else cpu_quant.prepare_int8)(qw.qweight, qw.scales, qw.mins, g)
    w = cpu_quant.dequantize(prepared, torch.full((n, k), float("nan")), isa=isa)
    assert w.shape == (n, k)
    ref = qw.dequantize(torch.float64)
    assert torch.allclose(w.double(), ref, rtol=1e-6, atol=1e-6)


@ISAS
def test_every_fp16_scale_is_read_exactly(isa):
    # all 65536 fp16 bit patterns (subnormals, inf, NaN included) as scales of code-1 groups
    scales = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).view(2048, 32)
    prepared = cpu_quant.prepare_int8(torch.ones(2048, 1024, dtype=torch.int8), scales, None, 32)
    w = cpu_quant.dequantize(prepared, isa=isa)
    torch.testing.assert_close(w[:, ::32], scales.float(), rtol=0, atol=0, equal_nan=True)


def test_bias_out_and_leading_dims():
    qw = _int4(10, 64, 32, "rtn", seed=5)
    bias = torch.randn(10)
    prepared = cpu_quant.prepare_int4(qw.qweight, qw.scales, qw.mins, 32, bias=bias)
    plain = cpu_quant.prepare_int4(qw.qweight, qw.scales, qw.mins, 32)
    x = _x(2, 64, seed=2)
    out = torch.full((2, 10), float("nan"))
    y = cpu_quant.matmul(x, prepared, out)
    assert y is out
    assert torch.allclose(y, cpu_quant.matmul(x, plain) + bias, atol=1e-6)
    assert cpu_quant.matmul(x.view(2, 1, 64), plain).shape == (2, 1, 10)
    assert cpu_quant.matmul(x.t().contiguous().t(), plain).shape == (2, 10)  # non-contiguous x


def test_bound_call_reads_its_buffers_each_time():
    qw = _int4(40, 64, 32, "q4_1", seed=6)
    prepared = cpu_quant.prepare_int4(qw.qweight, qw.scales, qw.mins, 32)
    x, out = torch.empty(1, 64), torch.empty(1, 40)
    call = prepared.bind(x, out, threads=2)
    for seed in (1, 2):
        new_x = _x(1, 64, seed=seed)
        x.copy_(new_x)
        assert call() == 0
        assert torch.equal(out, cpu_quant.matmul(new_x, prepared, threads=2))
    with pytest.raises(ValueError, match="out must"):
        prepared.bind(x, torch.empty(1, 39))


def test_refusals_name_the_problem():
    assert cpu_quant.supports(4, 32, 576) is None
    assert cpu_quant.supports(8, 576, 576) is None
    assert "128" in cpu_quant.supports(4, 128, 576)  # SmolLM2's 576 inputs don't divide by 128
    assert cpu_quant.supports(8, 16, 64) is None  # GGUF Q6_K: int8 in groups of 16
    assert "multiple of 32" in cpu_quant.supports(8, 16, 48)  # whole blocks of 32 only
    assert "multiple of 32" in cpu_quant.supports(4, 16, 64)
    qw = _int4(4, 64, 32, "rtn", seed=1)
    with pytest.raises(ValueError, match="float16"):
        cpu_quant.prepare_int4(qw.qweight, qw.scales.float(), qw.mins, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_quant.prepare_int8(torch.zeros(4, 48, dtype=torch.int8), torch.ones(4, 3).half(), torch.ones(4, 3).half(),
                               16)
    prepared = cpu_quant.prepare_int4(qw.qweight, qw.scales, qw.mins, 32)
    with pytest.raises(ValueError, match="float32"):
        cpu_quant.matmul(torch.zeros(1, 64, dtype=torch.float64), prepared)
    with pytest.raises(ValueError, match="out must"):
        cpu_quant.matmul(torch.zeros(1, 64), prepared, torch.empty(1, 3))


def test_no_compiler_is_a_reason_not_an_exception(monkeypatch):
    monkeypatch.setattr(cpu_quant, "_lib", None)
    monkeypatch.setattr(cpu_quant, "_loaded", False)
    monkeypatch.setattr(cpu_quant, "_problem", None)
    monkeypatch.setattr(cpu_quant, "_compiler", lambda: None)
    reason = cpu_quant.available()
    assert reason and "compiler" in reason
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_quant.matmul(torch.zeros(1, 32), object())


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_the_kernel_builds_and_computes_with_each_compiler(monkeypatch, tmp_path, compiler):
    """gcc (Linux) and clang (macOS, BSDs, CC=clang): the same sources build with each, and
    compute the same (clang takes only a constant rounding mode in _mm256_round_ps)."""
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed here")
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_quant, "_PREBUILT_DIR", tmp_path / "none")
    monkeypatch.setattr(cpu_quant, "_lib", None)
    monkeypatch.setattr(cpu_quant, "_loaded", False)
    monkeypatch.setattr(cpu_quant, "_problem", None)
    assert cpu_quant.available() is None
    assert list((tmp_path / "hearth_kernels").glob("*.so"))  # built here, by this compiler
    qw, x = _int4(13, 96, 32, "q4_1", 3), _x(3, 96, 3)
    for isa in _isas():
        _check(cpu_quant.matmul(x, cpu_quant.prepare_int4(qw.qweight, qw.scales, qw.mins, 32), isa=isa), qw, x)


def test_a_failed_build_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_quant, "_lib", None)
    monkeypatch.setattr(cpu_quant, "_loaded", False)
    monkeypatch.setattr(cpu_quant, "_problem", None)
    monkeypatch.setattr(cpu_quant, "_FLAGS", (*cpu_quant._FLAGS, "-DHQ_FORCE_BUILD_ERROR=1", "-Werror=undef",
                                              "-include", "/nonexistent/header.h"))
    reason = cpu_quant.available()
    assert reason and "compiling" in reason
    assert not list((tmp_path / "hearth_kernels").glob("*.so"))  # no half-written library left behind


def test_a_prebuilt_library_loads_without_a_compiler(monkeypatch, tmp_path):
    # What the PyInstaller bundle relies on: the library packaging/bundle.sh builds ahead
    # of time is found beside the sources and computes, with no compiler on the machine.
    path = cpu_quant.build_prebuilt(tmp_path)
    assert path.name == cpu_quant.prebuilt_name()
    monkeypatch.setattr(cpu_quant, "_PREBUILT_DIR", tmp_path)
    monkeypatch.setattr(cpu_quant, "_lib", None)
    monkeypatch.setattr(cpu_quant, "_loaded", False)
    monkeypatch.setattr(cpu_quant, "_problem", None)
    monkeypatch.setattr(cpu_quant, "_compiler", lambda: None)
    assert cpu_quant.available() is None
    qw, x = _int4(13, 64, 32, "q4_1", 7), _x(2, 64, 7)
    _check(cpu_quant.matmul(x, cpu_quant.prepare_int4(qw.qweight, qw.scales, qw.mins, 32)), qw, x)


def test_a_prebuilt_library_of_other_sources_is_ignored(monkeypatch, tmp_path):
    # A library built from older sources must not be loaded: its name carries their hash.
    cpu_quant.build_prebuilt(tmp_path)
    monkeypatch.setattr(cpu_quant, "_PREBUILT_DIR", tmp_path)
    monkeypatch.setattr(cpu_quant, "_FLAGS", (*cpu_quant._FLAGS, "-DHQ_OTHER_SOURCES=1"))
    monkeypatch.setattr(cpu_quant, "_lib", None)
    monkeypatch.setattr(cpu_quant, "_loaded", False)
    monkeypatch.setattr(cpu_quant, "_problem", None)
    monkeypatch.setattr(cpu_quant, "_compiler", lambda: None)
    assert "compiler" in (cpu_quant.available() or "")


def test_the_libraries_of_the_old_cache_folder_are_deleted_and_nothing_else(monkeypatch, tmp_path):
    # before the rename to hearth_kernels, compiled libraries went to <cache>/kernels
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    old = tmp_path / "kernels"
    old.mkdir()
    for name in ("hq_quant-0123456789abcdef.so", ".hq_quant-tmp1.so"):
        (old / name).write_bytes(b"\x7fELF")
    cpu_quant._forget_old_cache()
    assert not old.exists()  # emptied: gone
    old.mkdir()
    (old / "hq_quant-fedcba9876543210.so").write_bytes(b"\x7fELF")
    (old / "notes.txt").write_text("someone else's")
    cpu_quant._forget_old_cache()
    assert [p.name for p in old.iterdir()] == ["notes.txt"]
    cpu_quant._forget_old_cache()  # nothing to do: no error


@pytest.mark.parametrize("k", [96, 100])
def test_round_activations_are_the_kernels_blocks(k):
    """``round_activations``: the int8 blocks ``matmul`` rounds x to, dequantized (bit for bit
    the documented rounding; K not a multiple of 32 keeps K columns)."""
    x = 3 * torch.randn(5, k, generator=torch.Generator().manual_seed(k))
    got = cpu_quant.round_activations(x)
    assert got.shape == (5, k) and got.dtype == torch.float32
    codes, d = _emulate_acts(x)  # (each code times its block's scale, rounded to fp32 once)
    assert torch.equal(got, (codes.float().view(5, -1, 32) * d.unsqueeze(-1)).view(5, -1)[:, :k])
    torch.testing.assert_close(got.double(), _x_hat(x), rtol=1e-7, atol=0)


@pytest.mark.parametrize("bits,g,gated", [(4, 32, False), (4, 128, False), (8, 16, True), (8, 32, False),
                                          (8, 256, False)])
def test_a_rows_product_does_not_depend_on_how_many_rows_share_the_call(bits, g, gated):
    """``CpuQuant`` runs the C kernel for any number of rows: a row's product has the same
    bits alone, in a tile of a few rows, or among many (a prompt after a prefix-cache hit has
    fewer rows than the same prompt cold; the next layer rounds to int8 blocks, so any
    difference in the last bit can move a greedy token: it did on the bundled model while more
    than 12 rows went to torch's sgemm)."""
    from types import SimpleNamespace

    from engine.layers.linear_kernels import silu_and_mul_reference
    from engine.layers.quant_kernels import CpuQuant

    n, k = 48, 256
    gen = torch.Generator().manual_seed(bits + g)
    w = torch.randn(n, k, generator=gen) * 0.05
    qw = quantize_int4(w, g) if bits == 4 else quantize_int8(w, g)
    layer = SimpleNamespace(bits=bits, qweight=qw.qweight, scales=qw.scales, mins=qw.mins, group_size=g,
                            bias=torch.randn(n, generator=gen), perm=None,
                            act=silu_and_mul_reference if gated else None)
    kernel = CpuQuant().bind(layer)
    many = 23
    x = 2 * torch.randn(many, 2 * k if gated else k, generator=gen)
    together = kernel(x, layer)
    alone = torch.cat([kernel(x[i:i + 1], layer) for i in range(many)])
    assert torch.equal(together, alone)
    for first, count in ((0, 2), (3, 3), (5, 4), (9, 5), (1, 13)):  # tiles and their remainders
        assert torch.equal(kernel(x[first:first + count], layer), alone[first:first + count])
    # and it is the product it should be (int8 activation blocks: ~1e-3 of the scale)
    xin = silu_and_mul_reference(x) if gated else x
    want = xin @ qw.dequantize(torch.float32).T + layer.bias
    assert (want - alone).abs().max().item() < 2e-2 * want.abs().max().item()


@ISAS
@pytest.mark.parametrize("n,k,bias", [(37, 37, True), (41, 13, False), (64, 96, True), (5, 1, False), (203, 100, True)])
def test_fp32_rows_have_the_same_bits_however_many_share_the_call(isa, n, k, bias):
    """``prepare_f32`` (the float LM head of a CPU load): each row's product is the one it
    gets alone, for any number of rows (pairs, odd counts), any offset, 1 or 2 threads, over
    N not a multiple of the 4-row blocks and K not of the 8-wide vectors, and it is W . x to
    fp32 accuracy (float64 reference). torch's CPU matmul differs between 1, 2-3 and 4+ rows."""
    gen = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    x = torch.randn(19, k, generator=gen)
    x[3] *= 1e4  # a large row beside small ones
    pw = cpu_quant.prepare_f32(w, b)
    for threads in (1, 2):
        alone = torch.cat([cpu_quant.matmul(x[i:i + 1], pw, isa=isa, threads=threads) for i in range(len(x))])
        for first, count in ((0, 2), (0, 3), (1, 4), (2, 5), (0, 19), (5, 14)):
            got = cpu_quant.matmul(x[first:first + count], pw, isa=isa, threads=threads)
            assert torch.equal(got, alone[first:first + count]), (threads, first, count)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    mag = x.double().abs() @ w.double().abs().T + (b.double().abs() if bias else 0)
    assert ((alone.double() - want).abs() <= 1e-6 * mag + 1e-30).all()


def test_fp32_rows_refuse_what_is_not_a_float32_matrix():
    with pytest.raises(ValueError, match="float32"):
        cpu_quant.prepare_f32(torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="float32"):
        cpu_quant.prepare_f32(torch.zeros(8))
    pw = cpu_quant.prepare_f32(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        cpu_quant.matmul(torch.zeros(2, 7), pw)
