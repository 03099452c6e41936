"""The Q4_K_M-mix GGUF writer of the K-quant benchmarks (benchmarks/kquant_gguf.py): what the
8B GPU bench loads must be a file gguf's own reader reads back as written (streamed tensors
at the right offsets, a padded vocabulary, llama.cpp's type mix, finite super-block scales).

A synthetic tokenizer of a few tokens stands in for SmolLM2's (gguf's reader takes seconds
over 49k tokens and merges)."""

from __future__ import annotations

import gguf
import numpy as np
from gguf.quants import dequantize

from benchmarks.kquant_gguf import KQuantShape, use_more_bits, write_metadata_only, write_q4_k_m


def _tokenizer_file(path):
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny-tokenizer")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "</s>", "a", "b", "ab"])
    w.add_token_types([int(gguf.TokenType.CONTROL)] * 2 + [int(gguf.TokenType.NORMAL)] * 3)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(1)
    w.add_context_length(2048)
    w.add_rope_freq_base(10000.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def test_a_padded_q4_k_m_file_reads_back(tmp_path):
    tok = tmp_path / "tok.gguf"
    _tokenizer_file(tok)
    meta_only = tmp_path / "meta.gguf"
    write_metadata_only(tok, meta_only)
    shape = KQuantShape(hidden=256, layers=8, ffn=512, heads=4, kv_heads=2, vocab=300, context=8192,
                        rope_theta=500000.0, rms_eps=1e-5)
    path = tmp_path / "q4km.gguf"
    types = write_q4_k_m(path, shape, meta_only, seed=3)

    r = gguf.GGUFReader(str(path))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[:5] == ["<s>", "</s>", "a", "b", "ab"] and tokens[-1] == "<unused_294>" and len(tokens) == 300
    token_types = r.fields["tokenizer.ggml.token_type"].contents()
    assert token_types[:2] == [int(gguf.TokenType.CONTROL)] * 2 and set(token_types[5:]) == {int(gguf.TokenType.UNUSED)}
    assert r.fields["tokenizer.ggml.merges"].contents() == ["a b"]
    assert r.fields["general.name"].contents() == "tiny-tokenizer"
    assert r.fields["llama.vocab_size"].contents() == 300
    assert r.fields["llama.context_length"].contents() == 8192
    assert r.fields["llama.rope.freq_base"].contents() == 500000.0
    assert r.fields["llama.attention.head_count_kv"].contents() == 2

    by_name = {t.name: t for t in r.tensors}
    assert by_name["token_embd.weight"].tensor_type.name == "Q4_K"
    assert list(by_name["token_embd.weight"].shape) == [256, 300]  # gguf lists columns first
    assert by_name["output.weight"].tensor_type.name == "Q6_K"
    more = [i for i in range(8) if use_more_bits(i, 8)]
    assert more == [0, 3, 6, 7]  # llama.cpp's pick for 8 layers: first and last eighth, every third between
    for i in range(8):
        want = "Q6_K" if i in more else "Q4_K"
        assert by_name[f"blk.{i}.attn_v.weight"].tensor_type.name == want
        assert by_name[f"blk.{i}.ffn_down.weight"].tensor_type.name == want
        assert list(by_name[f"blk.{i}.ffn_down.weight"].shape) == [512, 256]
        assert by_name[f"blk.{i}.attn_q.weight"].tensor_type.name == "Q4_K"
    counted = {}
    for t in r.tensors:
        counted[t.tensor_type.name] = counted.get(t.tensor_type.name, 0) + 1
    assert counted == types == {"Q4_K": 1 + 8 * 7 - 2 * len(more), "Q6_K": 1 + 2 * len(more), "F32": 1 + 2 * 8}

    # Each tensor where its header says: norms read back as ones, and the super-block scales
    # (d, dmin) finite and within +-0.05, so every weight is within 0.05 * 63 * 16 (Q4_K) or
    # 0.05 * 128 * 32 (Q6_K) and nothing is inf or NaN.
    assert np.array_equal(by_name["blk.7.ffn_norm.weight"].data, np.ones(256, np.float32))
    for name in ("token_embd.weight", "output.weight", "blk.7.ffn_down.weight", "blk.3.ffn_down.weight"):
        t = by_name[name]
        w = dequantize(t.data, t.tensor_type)
        assert w.shape == tuple(reversed(t.shape.tolist())) and np.isfinite(w).all()
        assert np.abs(w).max() <= (0.05 * 128 * 32 if t.tensor_type.name == "Q6_K" else 0.05 * 63 * 16)
        assert np.abs(w).max() > 0.5  # random, not zeros
