"""GGUF K-quant blocks (Q4_K, Q5_K, Q6_K) read into codes and exact scales/mins: held to
the gguf package's reference dequantization bit for bit on random super-blocks, and to
hand-built blocks whose values are worked out from the published layout."""

from __future__ import annotations

import numpy as np
import pytest

from engine.quant.gguf_kquants import BLOCK_BYTES, QK_K, read_kquant

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402


def random_blocks(type_name: str, rows: int, nb: int, seed: int = 0) -> np.ndarray:
    """Random super-blocks (every bit pattern is a valid block) with finite fp16 d / dmin."""
    rng = np.random.default_rng(seed)
    size = BLOCK_BYTES[type_name]
    raw = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    scale = rng.uniform(-0.05, 0.05, size=(rows, nb, 2)).astype(np.float16).view(np.uint8)
    if type_name == "Q6_K":
        raw[..., 208:210] = scale[..., 0:2]
    else:
        raw[..., 0:4] = scale.reshape(rows, nb, 4)
    return raw.reshape(rows, nb * size)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("rows,nb", [(1, 1), (3, 2), (5, 7)])
def test_bit_for_bit_with_the_gguf_reference(type_name, rows, nb):
    raw = random_blocks(type_name, rows, nb, seed=rows * 10 + nb)
    got = read_kquant(raw, type_name)
    want = dequantize(raw, getattr(gguf.GGMLQuantizationType, type_name))
    assert want.shape == (rows, nb * QK_K)
    np.testing.assert_array_equal(got.dequantize().numpy(), want.astype(np.float32))
    lo, hi = {"Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (-32, 31)}[type_name]
    assert int(got.codes.min()) >= lo and int(got.codes.max()) <= hi
    assert got.scales.shape == (rows, nb * QK_K // got.group)
    assert (got.mins is None) == (type_name == "Q6_K")


def _k4_scale_bytes(sc: list[int], m: list[int]) -> bytes:
    """Pack eight 6-bit scales and mins the way Q4_K / Q5_K store them."""
    s = [0] * 12
    for j in range(4):
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        s[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6)
        s[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4)
    return bytes(s)


def test_a_hand_built_q4_k_block():
    sc = [1, 2, 3, 4, 17, 33, 50, 63]  # sub-blocks 4..7 use the high bits
    m = [0, 5, 10, 15, 20, 40, 48, 63]
    q = [(7 * i) % 16 for i in range(QK_K)]  # the code of input i
    qs = bytearray(128)
    for c in range(4):
        for lane in range(32):
            qs[32 * c + lane] = q[64 * c + lane] | (q[64 * c + 32 + lane] << 4)
    block = np.float16(0.5).tobytes() + np.float16(0.25).tobytes() + _k4_scale_bytes(sc, m) + bytes(qs)
    got = read_kquant(np.frombuffer(block, np.uint8).reshape(1, -1), "Q4_K").dequantize()[0]
    want = [0.5 * sc[i // 32] * q[i] - 0.25 * m[i // 32] for i in range(QK_K)]
    assert got.tolist() == want


def test_a_hand_built_q5_k_block_takes_bit_j_of_qh_for_sub_block_j():
    sc, m = [1] * 8, [0] * 8
    qh = bytearray(32)
    qh[3] = 0b0000_0101  # input 3 of sub-blocks 0 and 2 gets +16
    block = (np.float16(1.0).tobytes() + np.float16(0.0).tobytes() + _k4_scale_bytes(sc, m) + bytes(qh)
             + bytes([0x21] * 128))  # low nibble 1, high nibble 2
    got = read_kquant(np.frombuffer(block, np.uint8).reshape(1, -1), "Q5_K").codes[0].tolist()
    want = [1 if (i // 32) % 2 == 0 else 2 for i in range(QK_K)]
    want[3] += 16
    want[64 + 3] += 16
    assert got == want


def test_a_hand_built_q6_k_block():
    ql, qh = bytearray(128), bytearray(64)
    ql[5] = 0x3A  # half 0, l = 5: input 5 low nibble 0xA, input 69 (i = 2) high nibble 0x3
    qh[5] = 0b10_00_01_11  # input 5 high bits 3, input 37 (i = 1) 1, input 69 (i = 2) 0, input 101 (i = 3) 2
    scales = np.array([2] * 8 + [-3] * 8, np.int8).tobytes()
    block = bytes(ql) + bytes(qh) + scales + np.float16(0.5).tobytes()
    got = read_kquant(np.frombuffer(block, np.uint8).reshape(1, -1), "Q6_K")
    codes = got.codes[0].tolist()
    assert codes[5] == (0xA | (3 << 4)) - 32 and codes[37] == (1 << 4) - 32
    assert codes[69] == 0x3 - 32 and codes[101] == (2 << 4) - 32 and codes[0] == -32
    assert got.scales[0].tolist() == [1.0] * 8 + [-1.5] * 8
    assert got.dequantize()[0, 5].item() == 1.0 * codes[5]


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="Q3_K is not a K-quant read here"):
        read_kquant(np.zeros((1, 110), np.uint8), "Q3_K")
    with pytest.raises(ValueError, match="whole super-blocks of 144 bytes"):
        read_kquant(np.zeros((1, 100), np.uint8), "Q4_K")
