"""A token's raw bytes (OpenAI's ``logprobs.bytes``): from byte-level and SentencePiece
vocabulary spellings, and through the real SmolLM2 tokenizer a character split over
several tokens comes back whole from their joined bytes."""

from __future__ import annotations

import pytest

from engine.token_bytes import byte_level_decoder, piece_bytes


def test_gpt2_byte_map_is_a_bijection_with_its_published_anchors():
    table = byte_level_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["!"] == 0x21 and table["ÿ"] == 0xFF
    assert table["Ā"] == 0x00  # the first shifted byte


@pytest.mark.parametrize("piece,byte_level,expected", [
    ("Ġhello", True, b" hello"),
    ("Ã©", True, "é".encode()),           # é's two bytes C3 A9 as stand-ins
    ("ä¸", True, b"\xe4\xb8"),            # the first two bytes of a CJK character
    ("<|im_start|>", True, b"<|im_start|>"),  # not stand-ins: kept as text
    ("▁hello", False, b" hello"),
    ("<0xE2>", False, b"\xe2"),
    ("é", False, "é".encode()),            # SentencePiece pieces are text: C3 A9, not E9
])
def test_pieces_spell_their_bytes(piece, byte_level, expected):
    assert piece_bytes(piece, byte_level) == expected


def test_split_characters_come_back_whole_from_the_tokens_bytes(tiny_models):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_models["llama-tied"])
    text = "héllo 中文 龘🫠 naïve"
    ids = tok.encode(text, add_special_tokens=False)
    singles = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles)  # some token holds part of a character
    assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8") == text
