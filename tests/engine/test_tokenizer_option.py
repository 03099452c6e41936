"""The ``tokenizer`` load option (``--tokenizer DIR``, as vLLM's): a folder of tokenizer
files used instead of the model's own. A random-weight shape takes that tokenizer's
vocabulary (so benchmarks of chat, JSON schemas and tool calls can run on it); a real
model must have an embedding row for every token the tokenizer makes."""

from __future__ import annotations

import pytest

from engine.api import Engine, InvalidRequestError, Request, SamplingParams
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


def test_a_missing_tokenizer_folder_is_refused_before_the_load_naming_the_option(tmp_path, smol_dir):
    from engine.api import check_model

    bad = str(tmp_path / "nowhere")
    for attempt in (lambda: check_model("shape:tiny", device="cpu", tokenizer=bad),
                    lambda: Engine.load("shape:tiny", device="cpu", tokenizer=bad)):
        with pytest.raises(InvalidRequestError, match="--tokenizer .*nowhere.* does not exist") as e:
            attempt()
        assert e.value.options == ("tokenizer",)
    # the pre-flight sizes the shape with the tokenizer's vocabulary (49,152 rows, not 32,000)
    plain = check_model("shape:tiny", device="cpu")
    wider = check_model("shape:tiny", device="cpu", tokenizer=str(smol_dir))
    assert wider.weights_bytes - plain.weights_bytes == (49152 - 32000) * 128 * 4


def test_a_tokenizer_file_or_a_folder_without_one_is_refused_saying_so(tmp_path, smol_dir):
    """A file was said not to exist; an empty folder got transformers' advice to install
    sentencepiece or tiktoken."""
    (tmp_path / "empty").mkdir()
    for given, said in ((smol_dir / "tokenizer.json", "is a file"), (tmp_path / "empty", "has no tokenizer files")):
        with pytest.raises(InvalidRequestError, match=said) as e:
            Engine.load("shape:tiny", device="cpu", tokenizer=str(given))
        assert e.value.options == ("tokenizer",)


def test_a_folder_written_from_a_shape_keeps_its_own_vocabulary(tmp_path, smol_dir):
    """Its weights are files with the shape's rows: a bigger tokenizer is refused as for
    any model, not given rows the checkpoint lacks."""
    from engine.loader.engine_loader import FoundModel, own_tokenizer
    from engine.shapes import shape_config

    found = FoundModel("shape:tiny", tmp_path, "shape", shape_config("tiny"), str(tmp_path / "config.json"))
    with pytest.raises(InvalidRequestError, match="49,152 tokens but shape:tiny has 32,000"):
        own_tokenizer(str(smol_dir), found)
    assert found.cfg["vocab_size"] == 32000
