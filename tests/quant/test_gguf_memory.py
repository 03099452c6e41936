"""What a GGUF file takes in memory once loaded (``engine.gguf_memory``, the fit estimate's
rule): its table of bits is held to the layout the loader really builds from each type's
blocks, its Q4_K_M figure to the committed 8B measurement, and the file-type label to the
names GGUF publishers use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import gguf_memory as gm
from engine.quant.gguf_blocks import blocks_to_weight
from engine.quant.gguf_kquants import read_kquant, to_weight
from tests.quant.test_gguf_kquants import random_blocks
from tests.quant.test_quant_layout import _gguf_raw

gguf = pytest.importorskip("gguf")
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.parametrize("type_name", sorted(gm.KEPT_BITS))
def test_the_bits_are_those_of_the_layout_the_loader_builds(type_name):
    rows, k = 3, 512
    if type_name in ("Q8_0", "Q4_0", "Q4_1"):
        raw = _gguf_raw(type_name, rows, k)
        qw = blocks_to_weight(raw, type_name)
    else:
        raw = random_blocks(type_name, rows, k // 256)
        qw = to_weight(read_kquant(raw, type_name))
    assert qw is not None and qw.out_features == rows and qw.in_features == k
    assert qw.nbytes() * 8 / (rows * k) == gm.KEPT_BITS[type_name]
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    assert raw.nbytes * 8 / (rows * k) == gm.FILE_BITS[type_name] == block_bytes * 8 / block


def test_the_mixes_are_whole_files_of_kept_types():
    for label, mix in gm.MIXES.items():
        assert sum(mix.values()) == pytest.approx(1.0, abs=1e-9), label
        for part in mix:
            assert (part[0] if isinstance(part, tuple) else part) in gm.KEPT_BITS, (label, part)
    assert gm.memory_ratio("Q8_0") == 1.0 and gm.memory_ratio("Q4_1") > 1.0  # its Q6_K head
    assert gm.memory_ratio("Q4_K") == gm.memory_ratio("Q4_K_M") > gm.memory_ratio("Q4_K_L") > 1.0
    assert gm.split_part("qwen2.5-7b-instruct-q5_k_m-00001-of-00002.gguf") == (1, 2)
    assert gm.split_part("qwen2.5-7b-instruct-q5_k_m.gguf") is None
    assert gm.memory_ratio("Q6_K") == pytest.approx(9 / 6.5625)
    assert gm.memory_ratio("Q5_K_M") > gm.memory_ratio("Q4_K_M") > gm.memory_ratio("Q4_0") > 1.0
    for not_kept in ("Q3_K_M", "Q2_K", "IQ4_XS", "Q5_0", "F16", "BF16", "TQ1_0", None, "Q4_K_XL"):
        assert gm.memory_ratio(not_kept) is None, not_kept


def test_the_q4_k_m_ratio_is_the_measured_one():
    """The 8B in llama.cpp's Q4_K_M mix: its file's bytes and what the load held on the H200."""
    summary = json.loads((RESULTS / "2026-12-05-i17-q4km-8b-summary-h100-e376f8b.json").read_text())
    bench = json.loads((RESULTS / "2026-12-05-i17-bench-8b-q4_k_m-gguf-h200-07fdb63.json").read_text())
    file_bytes = summary["file_bytes"]
    (row,) = bench["rows"]
    assert row["quant"] == "gguf" and file_bytes == 4_916_730_464
    assert gm.memory_ratio("Q4_K_M") == pytest.approx(row["weight_bytes"] / file_bytes, rel=0.01)


@pytest.mark.parametrize("name,label", [
    ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
    ("bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q8_0.gguf", "Q8_0"),
    ("tinyllama-1.1b-chat-v1.0.Q4_K_S.gguf", "Q4_K_S"),
    ("smollm2-135m-instruct-q4_1.gguf", "Q4_1"),
    ("qwen2.5-7b-instruct-q5_k_m-00001-of-00002.gguf", "Q5_K_M"),
    ("Mistral-7B-Instruct-v0.3.IQ4_XS.gguf", "IQ4_XS"),
    ("gemma-2-9b-it-f16.gguf", "F16"),
    ("phi-3-mini-4k-instruct-bf16.gguf", "BF16"),
    ("model-q4_0-Q6_K.gguf", "Q6_K"),
    ("Meta-Llama-3.1-8B-Instruct-Q4_K_L.gguf", "Q4_K_L"),  # bartowski's: Q8_0 embedding and head
    ("llama-2-7b.Q4_K.gguf", "Q4_K"),  # llama.cpp's short name of Q4_K_M
    ("Llama-3.2-3B-Instruct-Q4_K_M_imatrix.gguf", "Q4_K_M"),
    ("Qwen3-8B-UD-Q4_K_XL.gguf", "Q4_K_XL"),  # unsloth's own mix: not taken for another
    ("mistral-7b-fp16.gguf", "F16"),
    ("Qwen2-0.5B.gguf", None),
    ("my-model.gguf", None),
])
def test_the_label_is_read_from_the_file_name(name, label):
    assert gm.file_label(name) == label


def test_which_devices_keep_a_ggufs_own_weights(monkeypatch):
    from engine.loader import engine_loader

    assert gm.kept_on("cuda", None) and gm.kept_on("cuda", (8, 0)) and gm.kept_on("cuda", (9, 0))
    assert not gm.kept_on("cuda", (7, 5))
    for answer in (True, False):
        monkeypatch.setattr(engine_loader, "auto_keeps_gguf", lambda device, answer=answer: answer)
        assert gm.kept_on("cpu") is answer

