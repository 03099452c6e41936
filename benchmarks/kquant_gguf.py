"""Writing a GGUF file in llama.cpp's Q4_K_M mix with random super-blocks, for speed benchmarks
(``kquant_gguf_cpu.py``, ``kquant_gguf_gpu.py``) and a test.

A Llama shape whose widths are multiples of 256 (K-quant super-blocks), types as llama.cpp's
``Q4_K_M`` chooses them: Q4_K everywhere but ``attn_v`` and ``ffn_down`` in the layers its
``use_more_bits`` picks (the first and last eighth and every third between: Q6_K) and the
output head (Q6_K). The tokenizer and general metadata come from another GGUF file (the
bundled SmolLM2 by default, or its metadata-only copy from ``write_metadata_only``); its
vocabulary can be padded with unused tokens up to a model's row count (Llama 3's 128,256),
so the embedding and head are as large as the real model's and the bench's random prompt
ids span them. Random weights: speed only (the text is noise).

The tensors are streamed to the file one at a time (gguf's ``add_tensor_info`` then
``write_tensor_data``), so an 8B file of ~5 GB never sits in memory whole.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M (general.file_type; llama.cpp only prints it).
_FILE_TYPE_Q4_K_M = 15


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get Q6_K in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclasses.dataclass(frozen=True)
class KQuantShape:
    """The file's model shape. ``vocab`` None keeps the tokenizer file's own vocabulary;
    ``rope_theta`` / ``rms_eps`` None keep the tokenizer file's values."""

    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int | None = None
    context: int = 4096
    rope_theta: float | None = None
    rms_eps: float | None = None

    def __post_init__(self) -> None:
        if self.hidden % 256 or self.ffn % 256:
            raise ValueError(f"hidden {self.hidden} and ffn {self.ffn} must be multiples of 256 (K-quant "
                             "super-blocks)")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden}, heads {self.heads}, kv heads {self.kv_heads} don't divide")

    @classmethod
    def from_hearth_shape(cls, name: str, context: int = 8192) -> KQuantShape:
        """A shape of ``engine.shapes`` (``llama-8b``: what ``hearth bench --shape`` builds),
        so the GGUF and the bf16 random-weight bench are the same model. (Its llama3 rope
        scaling is left out: a GGUF stores it as a ``rope_freqs`` tensor, and it does not
        change a decode step's work.)"""
        from engine.shapes import shape_config

        c = shape_config(name)
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], ffn=c["intermediate_size"],
                   heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"], vocab=c["vocab_size"],
                   context=context, rope_theta=c.get("rope_theta"), rms_eps=c.get("rms_norm_eps"))


def random_kquant_blocks(kind: str, rows: int, nb: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` x ``nb`` random super-blocks of ``kind`` (Q4_K, Q5_K, Q6_K) as a uint8 array
    (rows, nb * block bytes). Every bit pattern is a valid block but for the fp16 super-block
    scales, set here to finite values in +-0.05 (as ``tests.quant.test_gguf_kquants``'
    ``random_blocks``, whose uint8 draws are ~4x slower: ~5 GB of them is the 8B file).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = GGML_QUANT_SIZES[getattr(GGMLQuantizationType, kind)][1]
    n = rows * nb * size
    raw = rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n].reshape(rows, nb, size)
    # Q4_K / Q5_K: d and dmin, the first 4 bytes; Q6_K: d, its last 2.
    k = 1 if kind == "Q6_K" else 2
    scale = (rng.random((rows, nb, k), dtype=np.float32) * 0.1 - 0.05).astype(np.float16).view(np.uint8)
    if kind == "Q6_K":
        raw[..., size - 2:] = scale
    else:
        raw[..., 0:4] = scale.reshape(rows, nb, 4)
    return raw.reshape(rows, nb * size)


def _tensor_plan(shape: KQuantShape, vocab: int) -> list[tuple[str, str, int, int]]:
    """(name, type, rows, cols) of every tensor, in file order; type F32 is a norm (cols 0)."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    plan = [("token_embd.weight", "Q4_K", vocab, shape.hidden), ("output_norm.weight", "F32", shape.hidden, 0),
            ("output.weight", "Q6_K", vocab, shape.hidden)]
    for i in range(shape.layers):
        more = "Q6_K" if use_more_bits(i, shape.layers) else "Q4_K"
        plan += [(f"blk.{i}.attn_norm.weight", "F32", shape.hidden, 0),
                 (f"blk.{i}.ffn_norm.weight", "F32", shape.hidden, 0),
                 (f"blk.{i}.attn_q.weight", "Q4_K", shape.hidden, shape.hidden),
                 (f"blk.{i}.attn_k.weight", "Q4_K", kv, shape.hidden),
                 (f"blk.{i}.attn_v.weight", more, kv, shape.hidden),
                 (f"blk.{i}.attn_output.weight", "Q4_K", shape.hidden, shape.hidden),
                 (f"blk.{i}.ffn_gate.weight", "Q4_K", shape.ffn, shape.hidden),
                 (f"blk.{i}.ffn_up.weight", "Q4_K", shape.ffn, shape.hidden),
                 (f"blk.{i}.ffn_down.weight", more, shape.hidden, shape.ffn)]
    return plan


def _copy_metadata(writer, reader, meta: dict, pad_to: int | None) -> None:
    """Every field of ``reader`` but gguf's own into ``writer``, ``meta``'s values replacing
    (or adding) fields; the token list, scores and types padded to ``pad_to`` entries
    (``<unused_N>`` tokens of type UNUSED, which transformers' reader leaves out of the
    added tokens: 78k added CONTROL tokens would take it minutes to load)."""
    import gguf

    have = len(reader.fields["tokenizer.ggml.tokens"].data)
    if pad_to is not None and pad_to < have:
        raise ValueError(f"vocab {pad_to} is smaller than the tokenizer's {have} tokens")
    extra = 0 if pad_to is None else pad_to - have
    pads = {"tokenizer.ggml.tokens": [f"<unused_{i}>" for i in range(extra)],
            "tokenizer.ggml.token_type": [int(gguf.TokenType.UNUSED)] * extra,
            "tokenizer.ggml.scores": [0.0] * extra}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in meta:
            continue
        value = field.contents()
        if extra and name in pads:
            value = list(value) + pads[name]
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for name, (value, vtype) in meta.items():
        writer.add_key_value(name, value, vtype)


def write_q4_k_m(path: Path, shape: KQuantShape, tokenizer_from: Path | None = None, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """Write the file (its tokenizer and general metadata from ``tokenizer_from``, the bundled
    SmolLM2 GGUF by default); returns its tensor types by count."""
    import gguf

    if tokenizer_from is None:
        from engine.loader.resolve import default_gguf_path

        tokenizer_from = default_gguf_path()
    reader = gguf.GGUFReader(str(tokenizer_from))
    vocab = shape.vocab or len(reader.fields["tokenizer.ggml.tokens"].data)
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    meta = {"llama.embedding_length": (shape.hidden, u32), "llama.block_count": (shape.layers, u32),
            "llama.feed_forward_length": (shape.ffn, u32), "llama.attention.head_count": (shape.heads, u32),
            "llama.attention.head_count_kv": (shape.kv_heads, u32),
            "llama.rope.dimension_count": (shape.hidden // shape.heads, u32),
            "llama.context_length": (shape.context, u32), "llama.vocab_size": (vocab, u32),
            "general.file_type": (_FILE_TYPE_Q4_K_M, u32)}
    if shape.rope_theta is not None:
        meta["llama.rope.freq_base"] = (float(shape.rope_theta), f32)
    if shape.rms_eps is not None:
        meta["llama.attention.layer_norm_rms_epsilon"] = (float(shape.rms_eps), f32)

    writer = gguf.GGUFWriter(str(path), arch="llama")
    _copy_metadata(writer, reader, meta, shape.vocab)
    del reader
    plan = _tensor_plan(shape, vocab)
    types: dict[str, int] = {}
    for name, kind, rows, cols in plan:
        if kind == "F32":
            writer.add_tensor_info(name, (rows,), np.dtype(np.float32), rows * 4)
        else:
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            nbytes = rows * (cols // 256) * gguf.GGML_QUANT_SIZES[qtype][1]
            writer.add_tensor_info(name, (rows, nbytes // rows), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        types[kind] = types.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    ones = None
    start, done = time.perf_counter(), 0
    for i, (name, kind, rows, cols) in enumerate(plan):
        if kind == "F32":
            ones = ones if ones is not None and len(ones) == rows else np.ones(rows, dtype=np.float32)
            writer.write_tensor_data(ones)
            continue
        data = random_kquant_blocks(kind, rows, cols // 256, rng)
        writer.write_tensor_data(data)
        done += data.nbytes
        if progress and (i % 45 == 2 or i == len(plan) - 1):
            progress(f"{done / 2**30:.2f} GiB of tensors written, {time.perf_counter() - start:.1f} s")
    writer.close()
    return types


def write_metadata_only(src: Path, dst: Path) -> None:
    """``src``'s metadata (tokenizer.*, general.*, llama.*) in a GGUF file of no tensors: what
    ``write_q4_k_m`` needs of a tokenizer file, small enough to carry to a machine without
    the package that holds the bundled GGUF (SmolLM2's: ~2 MB of its 98)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=str(reader.fields["general.architecture"].contents()))
    _copy_metadata(writer, reader, {}, None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
