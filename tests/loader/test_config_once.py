"""config.json is parsed once per load, into the model spec (issue 13 item 4): the folder's
validation parses it and the load takes it from there (a pre-flight ``check_model`` is a
separate call and parses it once too); the summary the fit estimate sizes memory from is
the native spec's own numbers."""

from __future__ import annotations

import pytest

from engine.api import Engine, check_model, model_summary
from engine.loader import engine_loader
from engine.models.spec import ModelSpec, read_config
from engine.models.summary import SpecSummary


@pytest.fixture
def no_second_read(monkeypatch):
    def read_again(path):
        raise AssertionError(f"config.json of {path} was read a second time")

    monkeypatch.setattr(engine_loader, "read_config", read_again)


def test_a_load_and_its_check_read_config_json_once(tiny_model_dir, no_second_read, monkeypatch):
    from engine.loader import resolve

    parses = []
    real = resolve.validate_model_folder
    monkeypatch.setattr(resolve, "validate_model_folder", lambda path: parses.append(path) or real(path))
    check = check_model(str(tiny_model_dir), device="cpu", max_model_len=64, num_blocks=8)
    assert len(parses) == 1
    engine = Engine.load(str(tiny_model_dir), device="cpu", max_model_len=64, num_blocks=8)
    try:
        assert engine.model_info.model_type == "llama" and check.name == engine.model_info.name
        assert len(parses) == 2  # the load's own: one
    finally:
        engine.shutdown()


def test_the_summary_is_the_native_specs_numbers(tiny_model_dir):
    cfg = read_config(tiny_model_dir)
    spec = ModelSpec.from_config(cfg)
    summary = model_summary(tiny_model_dir)
    assert summary == model_summary(cfg) == SpecSummary.from_spec(spec)
    assert summary.native and summary.num_params == spec.num_params()
    assert summary.kv_bytes_per_token(2) == spec.kv_bytes_per_token(2)
    # An architecture the transformers fallback runs: read as the fallback's cache holds it.
    gpt2 = model_summary({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128,
                          "vocab_size": 100})
    assert not gpt2.native and "gpt2" in gpt2.not_native_reason
    assert (gpt2.num_layers, gpt2.num_kv_heads, gpt2.head_dim, gpt2.max_context) == (2, 4, 16, 128)
