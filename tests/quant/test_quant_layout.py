"""Hearth's canonical quantized layout, round-to-nearest, and GGUF's blocks repacked into it.

References: GGUF blocks against the gguf package's own ``dequantize`` (bit for bit) and a
hand-built block of known bytes; round-to-nearest against a float64 re-implementation of
its rules written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.quant.gguf_blocks import blocks_to_weight, permute_rows, row_permutation
from engine.quant.qweight import QuantizedWeight, check_shape, pack_int4, unpack_int4
from engine.quant.rtn import quantize_int4, quantize_int8, zero_points


def test_int4_packing_is_ggufs_nibble_order():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 0], codes[0, 16], codes[0, 1], codes[0, 31] = 3, 12, 7, 15
    packed = pack_int4(codes)
    assert packed.shape == (1, 16)
    assert packed[0, 0] == 0xC3 and packed[0, 1] == 0x07 and packed[0, 15] == 0xF0
    assert torch.equal(unpack_int4(packed), codes)
    rand = torch.randint(0, 16, (5, 96))
    assert torch.equal(unpack_int4(pack_int4(rand)).long(), rand)


def test_shape_rules_name_the_problem():
    assert check_shape(4, 128, 10, 576) and "does not divide" in check_shape(4, 128, 10, 576)
    assert check_shape(4, 64, 10, 576) is None and check_shape(4, 32, 10, 96) is None
    assert "multiples of 32" in check_shape(4, 48, 10, 48)
    assert check_shape(8, 48, 10, 48) is None


def _rtn_int4_reference(w: torch.Tensor, g: int) -> torch.Tensor:
    """Round-to-nearest int4 (asymmetric, integer zero, float16 scale): codes chosen in
    float32 (the documented arithmetic: a float64 division rounds some halves the other
    way), values in float64."""
    x = w.float().reshape(w.shape[0], -1, g)
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).half().clamp_min(2.0 ** -24).float()
    z = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(x / s.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, 15)
    m = (-z * s).half().double()
    return (q.double() * s.double().unsqueeze(-1) + m.unsqueeze(-1)).reshape(w.shape)


@pytest.mark.parametrize("g", [32, 64, 96])
def test_int4_round_to_nearest_matches_a_float64_reference(g):
    w = torch.randn(24, 192, generator=torch.Generator().manual_seed(g)) * 0.05
    w[3, :g] = 0.0  # an all-zero group still dequantizes to zeros
    qw = quantize_int4(w, g)
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (24, 96) and qw.scales.shape == (24, 192 // g)
    ref = _rtn_int4_reference(w, g)
    got = qw.dequantize(torch.float64)
    # The same codes: equal up to float32 vs float64 arithmetic of one multiply-add.
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert torch.all(got[3, :g] == 0)
    assert (got - w.double()).abs().max() <= qw.scales.double().max() * 0.5 + 1e-3
    z = zero_points(qw)
    assert z.dtype == torch.int32 and int(z.min()) >= 0 and int(z.max()) <= 15


def test_int8_round_to_nearest_per_channel_and_grouped():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    qw = quantize_int8(w)
    assert qw.group_size == 64 and qw.mins is None and qw.scales.shape == (16, 1)
    s = (w.abs().amax(1, keepdim=True) / 127).half().clamp_min(2.0 ** -24).double()
    ref = torch.round(w.double() / s).clamp(-128, 127) * s
    assert torch.allclose(qw.dequantize(torch.float64), ref, atol=1e-7)
    assert quantize_int8(w, 32).scales.shape == (16, 2)


def _gguf_raw(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random but valid blocks: sane float16 d (and m), random code bytes."""
    rng = np.random.default_rng(seed)
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[type_name]
    raw = rng.integers(0, 256, size=(rows, k // 32, size), dtype=np.uint8)
    raw[:, :, 0:2] = rng.uniform(0.001, 0.1, (rows, k // 32)).astype(np.float16).view(np.uint8).reshape(
        rows, k // 32, 2)
    if type_name == "Q4_1":
        raw[:, :, 2:4] = rng.uniform(-0.5, 0.5, (rows, k // 32)).astype(np.float16).view(np.uint8).reshape(
            rows, k // 32, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_repack_without_loss(type_name):
    import gguf

    raw = _gguf_raw(type_name, 7, 96)
    qtype = gguf.GGMLQuantizationType[type_name]
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    qw = blocks_to_weight(raw, type_name)
    assert qw.group_size == 32 and qw.in_features == 96 and qw.out_features == 7
    assert torch.equal(qw.dequantize(torch.float32), reference.float())


def test_a_q4_1_block_of_known_bytes():
    block = np.zeros(20, dtype=np.uint8)
    block[0:2] = np.array([2.0], dtype=np.float16).view(np.uint8)  # d
    block[2:4] = np.array([-1.0], dtype=np.float16).view(np.uint8)  # m
    block[4] = 0x53  # input 0: code 3, input 16: code 5
    qw = blocks_to_weight(block.reshape(1, 20), "Q4_1")
    w = qw.dequantize()
    assert w[0, 0] == 2 * 3 - 1 and w[0, 16] == 2 * 5 - 1 and w[0, 1] == -1


def test_a_row_permutation_is_found_exactly_or_not_at_all():
    qw = blocks_to_weight(_gguf_raw("Q4_1", 12, 64), "Q4_1")
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    target = qw.dequantize()[perm]
    found = row_permutation(target, qw.dequantize())
    assert torch.equal(permute_rows(qw, found).dequantize(), target)
    assert row_permutation(target + 1e-3, qw.dequantize()) is None


def test_dequantize_undoes_an_act_order_permutation():
    w = torch.randn(4, 64)
    qw = quantize_int8(w)
    perm = torch.randperm(64)
    stored = QuantizedWeight(8, 64, qw.qweight[:, perm], qw.scales, None, perm)
    assert torch.equal(stored.dequantize(unpermute=True), qw.dequantize())
