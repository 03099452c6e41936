"""Readable names of model references (what the load dialog's Model field shows)."""

from __future__ import annotations

import pytest

from app.services.model_names import DEFAULT_MODEL_LABEL, hub_cache_repo_id, readable_model_name

SNAPSHOT = "/home/u/.cache/huggingface/hub/models--acme--tiny-chat/snapshots/f374231cc2e0a1b2c3d4e5f60718293a4b5c6d7e"


@pytest.mark.parametrize("ref, name", [
    (SNAPSHOT, "acme/tiny-chat"),
    (SNAPSHOT + "/", "acme/tiny-chat"),
    ("/cache/hub/models--acme--tiny-chat-GGUF/snapshots/abc123/tiny-chat.Q8_0.gguf", "acme/tiny-chat-GGUF/tiny-chat.Q8_0.gguf"),
    ("/cache/hub/models--acme--x/snapshots/abc/q4/model.gguf", "acme/x/q4/model.gguf"),
    ("/cache/hub/models--HuggingFaceTB--SmolLM2-135M--Instruct/snapshots/abc", "HuggingFaceTB/SmolLM2-135M--Instruct"),
    ("/models/my-llama", "my-llama"),
    ("/models/my-llama/", "my-llama"),
    ("/models/Llama-3.2-1B.Q4_K_M.gguf", "Llama-3.2-1B.Q4_K_M.gguf"),
    ("~/models/tiny", "tiny"),
    ("./tiny", "tiny"),
    ("mine.gguf", "mine.gguf"),
    ("acme/tiny-chat", "acme/tiny-chat"),
    ("default", DEFAULT_MODEL_LABEL),
    ("", DEFAULT_MODEL_LABEL),
    (None, DEFAULT_MODEL_LABEL),
])
def test_readable_model_name(ref, name):
    assert readable_model_name(ref) == name


def test_hub_cache_repo_id():
    assert hub_cache_repo_id(SNAPSHOT) == ("acme/tiny-chat", "")
    assert hub_cache_repo_id("/models/acme/tiny-chat") is None
    # A folder called models--x that is not inside a snapshot is left alone.
    assert hub_cache_repo_id("/data/models--x/weights") is None
