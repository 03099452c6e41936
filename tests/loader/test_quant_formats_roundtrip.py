"""Writers: read(write(qw)) == qw exactly (through safetensors) for RTN int4/int8 and
hand-built symmetric/asymmetric/act-order weights, the writers' refusals, and the
compressed-tensors package's own pack/unpack as an independent reference where installed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from engine.quant.formats import (
    is_symmetric,
    parse_quantization_config,
    quantization_config,
    read_checkpoint_weight,
    write_awq,
    write_checkpoint_weight,
    write_compressed_tensors,
    write_gptq,
)
from engine.quant.qweight import QuantizedWeight, pack_int4
from engine.quant.rtn import quantize_int4, quantize_int8

N, K = 48, 256


def _int4(group: int, *, sym: bool, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), generator=g)
    scales = (torch.rand(N, K // group, generator=g) * 0.05 + 1e-3).to(torch.float16)
    # asymmetric zero points 1..15: GPTQ v1 can't store 0 (test_gptq_v2_stores_zero_as_is...)
    z = torch.full_like(scales, 8.0) if sym else torch.randint(1, 16, scales.shape, generator=g).float()
    return QuantizedWeight(4, group, pack_int4(codes), scales, (-z * scales.float()).to(torch.float16))


def _int8(group: int, *, sym: bool, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (N, K), generator=g).to(torch.int8)
    scales = (torch.rand(N, K // group, generator=g) * 0.05 + 1e-3).to(torch.float16)
    if sym:
        return QuantizedWeight(8, group, q, scales)
    z = torch.randint(1, 256, scales.shape, generator=g).float()  # unsigned zero points (not 0: GPTQ v1)
    return QuantizedWeight(8, group, q, scales, ((128 - z) * scales.float()).to(torch.float16))


def _with_group_perm(qw: QuantizedWeight, seed: int = 0) -> QuantizedWeight:
    """An act-order weight whose perm lists each group's inputs in ascending order (what a
    g_idx can express exactly: the order inside a group is not stored)."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randperm(K, generator=g) // qw.group_size  # group of each checkpoint input
    perm = torch.argsort(groups, stable=True)
    return QuantizedWeight(qw.bits, qw.group_size, qw.qweight, qw.scales, qw.mins, perm)


def _assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert (a.bits, a.group_size) == (b.bits, b.group_size)
    assert a.qweight.dtype == b.qweight.dtype and torch.equal(a.qweight, b.qweight)
    assert a.scales.dtype == b.scales.dtype and torch.equal(a.scales, b.scales)
    assert (a.mins is None) == (b.mins is None)
    assert a.mins is None or torch.equal(a.mins, b.mins)
    assert (a.perm is None) == (b.perm is None)
    assert a.perm is None or torch.equal(a.perm, b.perm)


def _round_trip(qw: QuantizedWeight, method: str, *, group_size: int | None = None) -> QuantizedWeight:
    sym = is_symmetric(qw)
    cfg = quantization_config(method, qw.bits, group_size or qw.group_size, sym, qw.perm is not None)
    q = parse_quantization_config({"quantization_config": cfg}, "round trip")
    tensors = write_checkpoint_weight(qw, method, sym=sym)
    assert set(q.tensor_names) <= set(tensors) <= set(q.tensor_names + q.optional_tensor_names)
    reloaded = load(save({f"model.layers.0.mlp.up_proj.{k}": v for k, v in tensors.items()}))
    tensors = {k.rsplit(".", 1)[1]: v for k, v in reloaded.items()}
    return read_checkpoint_weight(tensors, q, name="model.layers.0.mlp.up_proj")


INT4_METHODS = ["awq", "gptq", "compressed-tensors"]
INT8_METHODS = ["gptq", "compressed-tensors"]


@pytest.mark.parametrize("method", INT4_METHODS)
@pytest.mark.parametrize("group", [32, 64, 128, K])
def test_rtn_int4_round_trips_exactly(method, group):
    torch.manual_seed(group)
    w = torch.randn(N, K)
    w[:, :group] += 0.5  # a group of all-positive weights would have zero point 0 (see the v1 test)
    qw = quantize_int4(w, group)
    if method == "gptq" and int((-qw.mins.float() / qw.scales.float()).round().min()) == 0:
        pytest.skip("zero point 0 can't be stored in GPTQ v1")
    _assert_same(qw, _round_trip(qw, method, group_size=None if group == K else group))


@pytest.mark.parametrize("method", INT8_METHODS)
@pytest.mark.parametrize("group", [None, 64])
def test_rtn_int8_round_trips_exactly(method, group):
    torch.manual_seed(0)
    qw = quantize_int8(torch.randn(N, K), group)
    assert qw.mins is None
    back = _round_trip(qw, method, group_size=group)
    _assert_same(qw, back)


@pytest.mark.parametrize("method", INT4_METHODS)
@pytest.mark.parametrize("sym", [True, False])
def test_int4_sym_and_asym_round_trip(method, sym):
    qw = _int4(64, sym=sym)
    assert is_symmetric(qw) == sym
    _assert_same(qw, _round_trip(qw, method))


@pytest.mark.parametrize("method", INT8_METHODS)
@pytest.mark.parametrize("sym", [True, False])
def test_int8_sym_and_asym_round_trip(method, sym):
    qw = _int8(32, sym=sym)
    _assert_same(qw, _round_trip(qw, method))


@pytest.mark.parametrize("method", INT8_METHODS)
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_act_order_round_trips(method, bits, sym):
    qw = _with_group_perm((_int4 if bits == 4 else _int8)(32, sym=sym))
    back = _round_trip(qw, method)
    _assert_same(qw, back)
    assert back.perm is not None


def test_any_perm_round_trips_to_the_same_weight():
    """A GPTQ perm orders inputs inside a group too (by the Hessian); g_idx can't carry that,
    so the reader's perm differs inside groups but the weight is the same."""
    qw = _int4(32, sym=False)
    qw.perm = torch.randperm(K, generator=torch.Generator().manual_seed(5))
    for method in INT8_METHODS:
        back = _round_trip(qw, method)
        assert torch.equal(back.dequantize(torch.float64, unpermute=True),
                           qw.dequantize(torch.float64, unpermute=True))


def test_gptq_v2_stores_zero_as_is_and_v1_refuses_zero_zero_points():
    qw = _int4(32, sym=False)
    qw.mins[0, 0] = 0.0  # zero point 0
    with pytest.raises(ValueError, match="zero point of 0"):
        write_gptq(qw)
    tensors = write_gptq(qw, checkpoint_format="gptq_v2")
    cfg = quantization_config("gptq", 4, 32, False)
    cfg["checkpoint_format"] = "gptq_v2"
    _assert_same(qw, read_checkpoint_weight(tensors, parse_quantization_config(cfg)))


def test_gptq_v1_symmetric_zeros_are_written_minus_one():
    assert write_gptq(_int4(32, sym=True))["qzeros"].eq(0x77777777).all()
    assert write_gptq(_int8(32, sym=True))["qzeros"].eq(0x7F7F7F7F).all()


def test_non_integer_offsets_are_refused_by_every_writer():
    qw = _int4(32, sym=False)
    qw.mins = (qw.mins.float() + qw.scales.float() * 0.3).to(torch.float16)  # GGUF Q4_1-style min
    for write in (write_awq, write_gptq, write_compressed_tensors):
        with pytest.raises(ValueError, match="not integer zero points"):
            write(qw, name="blk.0.ffn_up")


def test_writer_refusals():
    with pytest.raises(ValueError, match="AWQ checkpoints are 4-bit"):
        write_awq(_int8(32, sym=True))
    with pytest.raises(ValueError, match="act-order"):
        write_awq(_with_group_perm(_int4(32, sym=False)))
    with pytest.raises(ValueError, match="symmetric"):
        write_compressed_tensors(_int4(32, sym=False), sym=True)


def test_compressed_tensors_symmetric_writes_no_zero_points():
    out = write_compressed_tensors(_int4(32, sym=True))
    assert "weight_zero_point" not in out
    assert out["weight_shape"].tolist() == [N, K] and out["weight_packed"].shape == (N, K // 8)


# --- the compressed-tensors package as an independent reference -------------------------


@pytest.mark.slow  # importing compressed_tensors (it imports transformers) takes about 10 s here
@pytest.mark.parametrize("bits,sym,group", [(4, True, 32), (4, False, 64), (8, True, K), (8, False, 32)])
def test_compressed_tensors_package_agrees(bits, sym, group):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    qw = (_int4 if bits == 4 else _int8)(group, sym=sym)
    out = write_compressed_tensors(qw, sym=sym)
    cfg = quantization_config("compressed-tensors", bits, None if group == K else group, sym)
    parsed = QuantizationConfig.model_validate(cfg)  # the package accepts the config we write
    scheme = parsed.config_groups["group_0"]
    assert scheme.weights.num_bits == bits and scheme.weights.symmetric == sym

    signed = (qw.codes().to(torch.int32) - (8 if bits == 4 else 0)).to(torch.int8)  # int8 codes are signed
    assert torch.equal(unpack_from_int32(out["weight_packed"], bits, torch.Size((N, K))), signed)
    assert torch.equal(pack_to_int32(signed, bits), out["weight_packed"])
    if not sym:
        mid = 1 << (bits - 1)
        zp = (torch.round(-qw.mins.float() / qw.scales.float()) + (0 if bits == 4 else mid) - mid).to(torch.int8)
        assert torch.equal(pack_to_int32(zp, bits, packed_dim=0), out["weight_zero_point"])

    state = {k: v for k, v in out.items()}
    state["weight_scale"] = out["weight_scale"].float()  # float32 so the package's dequantize is exact
    dense = PackedQuantizationCompressor.decompress(state, scheme)["weight"].double()
    ours = qw.dequantize(torch.float64)
    offset = ((qw.mins.double() if qw.mins is not None else torch.zeros_like(qw.scales, dtype=torch.float64))
              .repeat_interleave(group, dim=1))
    assert ((ours - dense).abs() <= offset.abs() * 2.0 ** -11 + 1e-30).all()
    assert ct is not None

