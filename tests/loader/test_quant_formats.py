"""The published checkpoint layouts, read from hand-built tensors with known bit patterns
(written from the layouts' public descriptions, not from Hearth's packers), and
dequantized against a float64 computation straight from the raw fields."""

from __future__ import annotations

import pytest
import torch

from engine.errors import UnsupportedModelError
from engine.quant.formats import (
    CheckpointQuant,
    parse_quantization_config,
    read_awq,
    read_checkpoint_weight,
    read_compressed_tensors,
    read_gptq,
)

WORD = 0x76543210  # nibble i (bits 4i..4i+3) holds the value i


def _q(method: str, bits: int = 4, group_size: int | None = 32, *, sym: bool = True,
       desc_act: bool = False, fmt: str | None = None) -> CheckpointQuant:
    if method == "awq":
        qc = {"quant_method": "awq", "bits": bits, "group_size": group_size or -1, "version": "gemm",
              "zero_point": True}
    elif method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size or -1, "sym": sym,
              "desc_act": desc_act}
        if fmt:
            qc["checkpoint_format"] = fmt
    else:
        weights = {"num_bits": bits, "type": "int", "symmetric": sym,
                   "strategy": "group" if group_size else "channel", "group_size": group_size,
                   "actorder": "group" if desc_act else None}
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                            "input_activations": None}}}
    return parse_quantization_config({"quantization_config": qc}, "test")


def _i32(word: int) -> int:
    """The int32 value with the 32-bit pattern ``word``."""
    return word - (1 << 32) if word >= 1 << 31 else word


def _words(rows: int, cols: int, fill: int = 0) -> torch.Tensor:
    """An int32 [rows, cols] filled with the 32-bit pattern ``fill``."""
    return torch.full((rows, cols), _i32(fill), dtype=torch.int32)


# --- (a) known bit patterns -------------------------------------------------------------


def test_gptq_word_decodes_sequentially_along_k_and_v1_zero_is_stored_minus_one():
    n, k = 8, 32
    qweight = _words(k // 8, n)
    qweight[0, 0] = WORD  # inputs 0..7 of output 0
    tensors = {"qweight": qweight, "qzeros": _words(1, n // 8, 0x77777777),
               "scales": torch.ones(1, n, dtype=torch.float16)}
    qw = read_gptq(tensors, _q("gptq"))
    assert qw.codes()[0, :8].tolist() == list(range(8))
    assert qw.codes()[0, 8:].eq(0).all() and qw.codes()[1:].eq(0).all()
    assert qw.mins.eq(-8).all()  # stored 7 -> z = 8
    assert qw.dequantize()[0, :8].tolist() == [float(i - 8) for i in range(8)]


def test_gptq_v2_zero_is_stored_as_is():
    tensors = {"qweight": _words(4, 8), "qzeros": _words(1, 1, 0x77777777),
               "scales": torch.ones(1, 8, dtype=torch.float16)}
    assert read_gptq(tensors, _q("gptq", fmt="gptq_v2")).mins.eq(-7).all()


def test_gptq_zeros_pack_along_n():
    tensors = {"qweight": _words(4, 8), "qzeros": _words(1, 1, WORD),
               "scales": torch.ones(1, 8, dtype=torch.float16)}
    qw = read_gptq(tensors, _q("gptq", fmt="gptq_v2"))
    assert (-qw.mins[:, 0]).tolist() == [float(i) for i in range(8)]  # output n has zero n


def test_awq_word_decodes_in_awq_order_along_n():
    n, k = 8, 32
    qweight = _words(k, n // 8)
    qweight[0, 0] = WORD  # input 0 of outputs 0..7
    tensors = {"qweight": qweight, "qzeros": _words(1, 1, WORD),
               "scales": torch.ones(1, n, dtype=torch.float16)}
    qw = read_awq(tensors, _q("awq"))
    # word slot i holds output [0, 2, 4, 6, 1, 3, 5, 7][i], so output j reads slot [0, 4, 1, 5, 2, 6, 3, 7][j]
    assert qw.codes()[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert qw.codes()[:, 1:].eq(0).all()
    assert (-qw.mins[:, 0]).tolist() == [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]  # zeros: same order, as is


def test_compressed_tensors_word_decodes_along_k_with_offset_codes():
    n, k = 2, 32
    packed = _words(n, k // 8, 0x88888888)  # unsigned 8 = signed 0
    packed[1, 0] = WORD  # inputs 0..7 of output 1
    tensors = {"weight_packed": packed, "weight_shape": torch.tensor([n, k]),
               "weight_scale": torch.full((n, 1), 0.5, dtype=torch.bfloat16)}
    qw = read_compressed_tensors(tensors, _q("compressed-tensors", group_size=None))
    assert qw.group_size == k
    assert qw.codes()[1, :8].tolist() == list(range(8))
    assert qw.dequantize()[1, :8].tolist() == [(i - 8) * 0.5 for i in range(8)]
    assert qw.dequantize()[0].eq(0).all() and qw.dequantize()[1, 8:].eq(0).all()
    assert qw.scales.dtype == torch.float16


def test_compressed_tensors_packed_zero_points_run_along_n_with_offset():
    n, k = 8, 32
    tensors = {"weight_packed": _words(n, k // 8, 0xFFFFFFFF), "weight_shape": torch.tensor([n, k]),
               "weight_scale": torch.ones(n, 1, dtype=torch.float16),
               "weight_zero_point": _words(1, 1, WORD)}  # [ceil(N/8), K/G]: unsigned zero n for output n
    qw = read_compressed_tensors(tensors, _q("compressed-tensors", group_size=None, sym=False))
    assert (-qw.mins[:, 0]).tolist() == [float(i) for i in range(8)]
    assert qw.dequantize()[:, 0].tolist() == [float(15 - i) for i in range(8)]


def test_compressed_tensors_unpacked_signed_zero_points():
    n, k = 8, 32
    zp = torch.arange(-4, 4, dtype=torch.int8).view(n, 1)  # older layout: [N, K/G], signed
    tensors = {"weight_packed": _words(n, k // 8, 0x88888888), "weight_shape": torch.tensor([n, k]),
               "weight_scale": torch.ones(n, 1, dtype=torch.float16), "weight_zero_point": zp}
    qw = read_compressed_tensors(tensors, _q("compressed-tensors", group_size=None, sym=False))
    assert qw.dequantize()[:, 0].tolist() == [float(-z) for z in range(-4, 4)]  # u=8: (8 - (zp+8)) * 1


def test_eight_bit_words():
    n, k = 4, 8
    # GPTQ 8-bit: bytes of a word are 4 consecutive inputs; symmetric v1 zero 128 stored as 127
    qweight = _words(k // 4, n, 0x80808080)
    qweight[0, 0] = _i32(0x83828180)
    tensors = {"qweight": qweight, "qzeros": _words(1, 1, 0x7F7F7F7F),
               "scales": torch.ones(1, n, dtype=torch.float16)}
    qw = read_gptq(tensors, _q("gptq", bits=8, group_size=None))
    assert qw.bits == 8 and qw.mins is None  # symmetric: signed codes, no mins
    assert qw.qweight.dtype == torch.int8 and qw.qweight[0, :4].tolist() == [0, 1, 2, 3]
    # compressed-tensors 8-bit: same byte order along K, offset 128
    packed = _words(n, k // 4, 0x80808080)
    packed[2, 1] = _i32(0x0100FF7F)
    tensors = {"weight_packed": packed, "weight_shape": torch.tensor([n, k]),
               "weight_scale": torch.ones(n, 1, dtype=torch.float16)}
    qw = read_compressed_tensors(tensors, _q("compressed-tensors", bits=8, group_size=None))
    assert qw.qweight[2, 4:].tolist() == [-1, 127, -128, -127]
    assert qw.mins is None


def test_eight_bit_asymmetric_zero_points():
    n, k = 4, 8
    tensors = {"qweight": _words(k // 4, n, 0xFFFFFFFF), "qzeros": _words(1, 1, 0x0A000009),
               "scales": torch.full((1, n), 0.25, dtype=torch.float16)}
    qw = read_gptq(tensors, _q("gptq", bits=8, group_size=None, sym=False))
    # v1 stored z - 1: zeros 10, 1, 1, 11 for outputs 0..3; codes all 255
    assert qw.dequantize()[:, 0].tolist() == [(255 - z) * 0.25 for z in (10, 1, 1, 11)]
    assert qw.mins is not None and qw.qweight.eq(127).all()


def test_act_order_g_idx_becomes_a_sorting_perm():
    n, k, g = 8, 64, 32
    g_idx = torch.tensor([(i + 1) % 2 for i in range(k)], dtype=torch.int32)  # even inputs in group 1
    qweight = _words(k // 8, n)
    qweight[:, 0] = WORD  # input k of output 0 has code k % 8
    scales = torch.ones(2, n, dtype=torch.float16)
    scales[1] = 2
    tensors = {"qweight": qweight, "qzeros": _words(2, 1, 0x77777777), "scales": scales, "g_idx": g_idx}
    qw = read_gptq(tensors, _q("gptq", group_size=g, desc_act=True))
    assert qw.perm.tolist() == list(range(1, k, 2)) + list(range(0, k, 2))
    expected = [(i % 8 - 8) * (2.0 if i % 2 == 0 else 1.0) for i in range(k)]
    assert qw.dequantize(unpermute=True)[0].tolist() == expected
    assert qw.dequantize()[0, :g].tolist() == [float(i % 8 - 8) for i in range(1, k, 2)]


def test_compressed_tensors_actorder_group():
    n, k, g = 2, 64, 32
    g_idx = torch.cat((torch.ones(32, dtype=torch.int32), torch.zeros(32, dtype=torch.int32)))
    packed = _words(n, k // 8, WORD)
    scale = torch.tensor([[1.0, 3.0], [1.0, 3.0]], dtype=torch.float16)
    tensors = {"weight_packed": packed, "weight_shape": torch.tensor([n, k]), "weight_scale": scale,
               "weight_g_idx": g_idx}
    qw = read_compressed_tensors(tensors, _q("compressed-tensors", group_size=g, desc_act=True))
    assert qw.perm.tolist() == list(range(32, 64)) + list(range(32))
    expected = [(i % 8 - 8) * (3.0 if i < 32 else 1.0) for i in range(k)]
    assert qw.dequantize(unpermute=True)[1].tolist() == expected


def test_trivial_g_idx_gives_no_perm():
    tensors = {"qweight": _words(8, 8), "qzeros": _words(2, 1, 0x77777777),
               "scales": torch.ones(2, 8, dtype=torch.float16),
               "g_idx": torch.arange(64, dtype=torch.int32) // 32}
    assert read_gptq(tensors, _q("gptq", desc_act=True)).perm is None


def test_uneven_g_idx_groups_are_refused():
    g_idx = torch.tensor([0] * 33 + [1] * 31, dtype=torch.int32)  # static_groups-style edge
    tensors = {"qweight": _words(8, 8), "qzeros": _words(2, 1), "scales": torch.ones(2, 8, dtype=torch.float16),
               "g_idx": g_idx}
    with pytest.raises(UnsupportedModelError, match="33 inputs in group 0"):
        read_gptq(tensors, _q("gptq", desc_act=True), name="model.layers.0.mlp.up_proj")


def test_int4_input_features_not_a_multiple_of_32_are_refused_naming_the_shape():
    tensors = {"qweight": _words(6, 8), "qzeros": _words(3, 1), "scales": torch.ones(3, 8, dtype=torch.float16)}
    with pytest.raises(UnsupportedModelError, match=r"\[8, 48\].*multiples of 32"):
        read_gptq(tensors, _q("gptq", group_size=16), name="model.layers.0.self_attn.q_proj")


def test_mismatched_tensor_shapes_are_refused():
    tensors = {"qweight": _words(32, 1), "qzeros": _words(2, 1), "scales": torch.ones(1, 8, dtype=torch.float16)}
    with pytest.raises(UnsupportedModelError, match="qzeros has shape"):
        read_awq(tensors, _q("awq"))
    with pytest.raises(UnsupportedModelError, match="no scales tensor"):
        read_awq({"qweight": _words(32, 1), "qzeros": _words(1, 1)}, _q("awq"))


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors"])
def test_the_model_shape_is_checked_when_given(method):
    n, k = 8, 32
    tensors = {"awq": {"qweight": _words(k, 1), "qzeros": _words(1, 1), "scales": torch.ones(1, n)},
               "gptq": {"qweight": _words(4, n), "qzeros": _words(1, 1), "scales": torch.ones(1, n)},
               "compressed-tensors": {"weight_packed": _words(n, 4), "weight_shape": torch.tensor([n, k]),
                                      "weight_scale": torch.ones(n, 1)}}[method]
    q = _q(method)
    assert read_checkpoint_weight(tensors, q, shape=(n, k)).out_features == n
    with pytest.raises(UnsupportedModelError, match=r"\[8, 32\].*expects \[16, 32\]"):
        read_checkpoint_weight(tensors, q, name="model.layers.0.self_attn.o_proj", shape=(16, k))


# --- (c) dequantized values against float64 from the raw fields ------------------------


def _nibble(word: int, i: int, bits: int = 4) -> int:
    return (word >> (bits * i)) & ((1 << bits) - 1)


def _random_words(*shape: int) -> torch.Tensor:
    return torch.randint(-(1 << 31), 1 << 31, shape, dtype=torch.int64).to(torch.int32)


def _rounding_bound(offset: torch.Tensor) -> torch.Tensor:
    """The canonical mins are ``offset`` rounded to float16 once: half an ulp, relative 2^-11."""
    return offset.abs() * 2.0 ** -11 + 1e-30


@pytest.mark.parametrize("bits,v2", [(4, False), (8, False), (4, True)])
def test_gptq_dequantize_matches_float64_from_raw_fields(bits, v2):
    torch.manual_seed(1)
    n, k, g = 16, 64, 32
    p = 32 // bits
    qweight, qzeros = _random_words(k // p, n), _random_words(k // g, n // p)
    scales = (torch.rand(k // g, n) * 0.1 + 0.01).to(torch.float16)
    g_idx = torch.randperm(k) % (k // g)
    qw = read_gptq({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32)},
                   _q("gptq", bits=bits, group_size=g, sym=False, desc_act=True,
                      fmt="gptq_v2" if v2 else None))
    ref, offset = torch.empty(n, k, dtype=torch.float64), torch.empty(n, k, dtype=torch.float64)
    words, zwords = qweight.tolist(), qzeros.tolist()
    for nn in range(n):
        for kk in range(k):
            grp = int(g_idx[kk])
            u = _nibble(words[kk // p][nn] & 0xFFFFFFFF, kk % p, bits)
            z = _nibble(zwords[grp][nn // p] & 0xFFFFFFFF, nn % p, bits) + (0 if v2 else 1)
            s = float(scales[grp, nn])
            ref[nn, kk] = (u - z) * s
            offset[nn, kk] = ((1 << (bits - 1)) - z if bits == 8 else -z) * s
    got = qw.dequantize(torch.float64, unpermute=True)
    assert ((got - ref).abs() <= _rounding_bound(offset)).all()


def test_awq_dequantize_matches_float64_from_raw_fields():
    torch.manual_seed(2)
    n, k, g = 16, 64, 32
    qweight, qzeros = _random_words(k, n // 8), _random_words(k // g, n // 8)
    scales = (torch.rand(k // g, n) * 0.1 + 0.01).to(torch.float16)
    qw = read_awq({"qweight": qweight, "qzeros": qzeros, "scales": scales}, _q("awq", group_size=g))
    slot_of = [0, 4, 1, 5, 2, 6, 3, 7]  # output j of each 8 lives in word slot slot_of[j]
    ref, offset = torch.empty(n, k, dtype=torch.float64), torch.empty(n, k, dtype=torch.float64)
    words, zwords = qweight.tolist(), qzeros.tolist()
    for nn in range(n):
        for kk in range(k):
            u = _nibble(words[kk][nn // 8] & 0xFFFFFFFF, slot_of[nn % 8])
            z = _nibble(zwords[kk // g][nn // 8] & 0xFFFFFFFF, slot_of[nn % 8])
            s = float(scales[kk // g, nn])
            ref[nn, kk], offset[nn, kk] = (u - z) * s, -z * s
    assert ((qw.dequantize(torch.float64) - ref).abs() <= _rounding_bound(offset)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_dequantize_matches_float64_from_raw_fields(bits):
    torch.manual_seed(3)
    n, k, g = 16, 64, 32
    p = 32 // bits
    packed, zp = _random_words(n, k // p), _random_words(n // p, k // g)
    scale = (torch.rand(n, k // g) * 0.1 + 0.01).to(torch.bfloat16)
    tensors = {"weight_packed": packed, "weight_shape": torch.tensor([n, k]), "weight_scale": scale,
               "weight_zero_point": zp}
    qw = read_compressed_tensors(tensors, _q("compressed-tensors", bits=bits, group_size=g, sym=False))
    ref, offset = torch.empty(n, k, dtype=torch.float64), torch.empty(n, k, dtype=torch.float64)
    words, zwords = packed.tolist(), zp.tolist()
    for nn in range(n):
        for kk in range(k):
            u = _nibble(words[nn][kk // p] & 0xFFFFFFFF, kk % p, bits)
            z = _nibble(zwords[nn // p][kk // g] & 0xFFFFFFFF, nn % p, bits)
            s = float(scale[nn, kk // g])
            ref[nn, kk] = (u - z) * s
            offset[nn, kk] = ((1 << (bits - 1)) - z if bits == 8 else -z) * s
    assert ((qw.dequantize(torch.float64) - ref).abs() <= _rounding_bound(offset)).all()


def test_compressed_tensors_strips_padding_of_k():
    n, k = 2, 6  # 8-bit: 6 inputs in 2 words, the last 2 bytes padding
    packed = _words(n, 2, 0x84838281)
    tensors = {"weight_packed": packed, "weight_shape": torch.tensor([n, k]),
               "weight_scale": torch.ones(n, 1, dtype=torch.float16)}
    qw = read_compressed_tensors(tensors, _q("compressed-tensors", bits=8, group_size=None))
    assert qw.in_features == 6 and qw.qweight[0].tolist() == [1, 2, 3, 4, 1, 2]
