"""A load never changes the caller's config: the KV block size a backend needs goes into
the load's own copy (the bench reuses one config for several loads)."""

from __future__ import annotations

import engine.loader.engine_loader as engine_loader
from engine.api import Engine, Request, SamplingParams, load_config


def test_a_backends_block_size_goes_into_the_loads_own_config(monkeypatch):
    monkeypatch.setattr(engine_loader, "kv_block_size", lambda attention, block_size: 32)
    config = load_config("shape:tiny", device="cpu", block_size=16, max_model_len=256, num_blocks=16)
    with Engine.from_config(config) as eng:
        assert eng.config.cache.block_size == 32 and eng.block_manager.block_size == 32
        assert eng.runner.block_size == 32
        done = eng.submit(Request(prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=40))).result()
        assert done.completion_tokens == 40  # across a block boundary of the larger blocks
    assert config.cache.block_size == 16
