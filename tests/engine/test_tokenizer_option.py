"""The ``tokenizer`` load option (``--tokenizer DIR``, as vLLM's): a folder of tokenizer
files used instead of the model's own. A random-weight shape takes that tokenizer's
vocabulary (so benchmarks of chat, JSON schemas and tool calls can run on it); a real
model must have an embedding row for every token the tokenizer makes."""

from __future__ import annotations

import pytest

from engine.api import Engine, HearthError, InvalidRequestError, Request, SamplingParams
from tests.conftest import save_tiny
from tests.engine.conftest import build_tiny_tokenizer


def test_a_shape_with_a_tokenizer_takes_its_vocabulary_and_chats(smol_dir, smol_tok):
    engine = Engine.load("shape:tiny", device="cpu", tokenizer=str(smol_dir), max_model_len=256,
                         kv_cache_memory="8MiB")
    try:
        assert engine.model_info.vocab_size == smol_tok.vocab_size == 49152  # not the shape's 32000
        assert engine.model_info.name == "shape:tiny"
        assert engine.tokenizer.has_chat_template
        (out,) = engine.generate([Request(messages=[{"role": "user", "content": "Hi"}],
                                          params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))])
        assert out.completion_tokens == 4 and out.prompt_tokens > 3  # the template around "Hi"
        assert max(out.token_ids) < 49152 and isinstance(out.text, str)
    finally:
        engine.shutdown()


def test_a_model_refuses_a_tokenizer_with_more_tokens_than_its_rows(tmp_path, smol_dir, tiny_dir, tiny_tok):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    folder = build_tiny_tokenizer(save_tiny(cfg, tmp_path / "m", {}))  # its own: the small one
    with pytest.raises(InvalidRequestError, match="49,152 tokens but .* 512") as e:
        Engine.load(str(folder), device="cpu", tokenizer=str(smol_dir))
    assert "tokenizer" in e.value.options
    assert tiny_tok.vocab_size <= 512
    engine = Engine.load(str(folder), device="cpu",
                         tokenizer=str(tiny_dir), kv_cache_memory="4MiB")
    try:
        assert engine.tokenizer.vocab_size == tiny_tok.vocab_size and engine.model_info.vocab_size == 512
    finally:
        engine.shutdown()


def test_a_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(HearthError, match="nowhere' does not exist"):
        Engine.load("shape:tiny", device="cpu", tokenizer=str(tmp_path / "nowhere"))
