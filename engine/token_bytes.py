"""A token's own bytes, from its vocabulary entry: what OpenAI's ``logprobs.bytes`` holds.

Decoding a single token that carries part of a multi-byte character gives U+FFFD, whose
UTF-8 is not the token's bytes; a client that joins the ``bytes`` of consecutive tokens
(to rebuild a character split over them, the field's purpose) needs the raw ones. The
vocabulary spells them in one of two ways:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): every byte is a printable stand-in
  character (GPT-2's ``bytes_to_unicode``: the printable Latin-1 bytes stand for
  themselves, the other 68 are shifted to U+0100 and up, so a space is "Ġ");
- SentencePiece (Llama 2, Mistral, Gemma): text with "▁" for a space, and byte-fallback
  pieces ``<0xE2>`` for bytes outside the vocabulary.

Which one is read off the tokenizer's decoder (a ``ByteLevel`` decoder means byte-level),
never guessed from the piece: "é" is byte 0xE9 in one and C3 A9 in the other.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's stand-in character -> byte map (the inverse of ``bytes_to_unicode``)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary entry stands for."""
    if byte_level:
        table = byte_level_decoder()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:  # an added token spelt as plain text (chat markers)
            return piece.encode("utf-8")
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def is_byte_level(hf_tokenizer) -> bool:
    """Whether a Hugging Face fast tokenizer's decoder is (or contains) ``ByteLevel``."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    parts = decoder.get("decoders") or [decoder]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


class TokenBytes:
    """Each token id's bytes for one tokenizer (cached; special and added tokens are their
    text's UTF-8)."""

    def __init__(self, hf_tokenizer, special_ids=frozenset()) -> None:
        self._tok = hf_tokenizer
        self._byte_level = is_byte_level(hf_tokenizer)
        self._special = special_ids
        added = getattr(hf_tokenizer, "added_tokens_decoder", None) or {}
        self._added = {int(i) for i in added}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        out = self._cache.get(token_id)
        if out is None:
            piece = self._tok.convert_ids_to_tokens(int(token_id))
            if piece is None:
                out = b""
            elif token_id in self._special or token_id in self._added:
                out = piece.encode("utf-8")
            else:
                out = piece_bytes(piece, self._byte_level)
            self._cache[token_id] = out
        return out
