"""Shared tokenizer fixtures for the engine tests (built once per session, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


# Words that get whole-word tokens in the tiny tokenizer; everything else falls back to
# single characters, then to UTF-8 byte tokens (<0xNN>) as sentencepiece models do.
TINY_WORDS = ["▁Hello", "▁world", "▁the", "ing", "▁caf", "é"]
TINY_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-") + ["▁"]


def build_tiny_tokenizer(folder: Path, chat_template: str | None = None,
                         generation_config: dict | None = None) -> Path:
    """Write a small sentencepiece-style (Metaspace + byte fallback) tokenizer to folder."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in TINY_CHARS:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in TINY_WORDS:
        for c in w:
            vocab.setdefault(c, len(vocab))
        cur = w[0]
        for c in w[1:]:
            merges.append((cur, c))
            cur = cur + c
            vocab.setdefault(cur, len(vocab))
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                       fuse_unk=True)
    rust = RustTokenizer(model)
    rust.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    rust.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    if chat_template is not None:
        hf.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(folder))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


@pytest.fixture(scope="session")
def smol_dir(request) -> Path:
    """A folder with the SmolLM2 tokenizer (byte-level BPE, chat template): the converted
    default model, or HEARTH_TEST_TOKENIZER_DIR where there is no GGUF reader (GPU box)."""
    import os

    folder = os.environ.get("HEARTH_TEST_TOKENIZER_DIR")
    return Path(folder) if folder else request.getfixturevalue("default_model").path


@pytest.fixture(scope="session")
def smol_tok(smol_dir):
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir):
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tiny_dir)
