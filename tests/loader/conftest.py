"""Fixtures for loader tests: tiny random models, the converted default model, a fake Hub.

Heavy things (the default model's conversion, tiny checkpoints) are built once per test
session; tests that damage a model work on a copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.hub_server import HubServer

TINY_REPO = "hearth-test/tiny-llama"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,  # matches the SmolLM2 tokenizer saved beside it
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random-weight Llama model object (bf16, untied head, ~6M parameters)."""
    return _tiny_llama()


def _save(model, folder: Path, tokenizer_files: dict[str, bytes], **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    for name, data in tokenizer_files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_llama, tokenizer_files) -> Path:
    """The tiny model saved as a single model.safetensors plus tokenizer."""
    return _save(tiny_llama, tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer_files)


@pytest.fixture(scope="session")
def sharded_model_dir(tmp_path_factory, tiny_llama, tokenizer_files) -> Path:
    """The tiny model saved in several safetensors shards with an index."""
    return _save(
        tiny_llama, tmp_path_factory.mktemp("sharded") / "tiny-sharded", tokenizer_files, max_shard_size="4MB"
    )


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A private copy of the tiny model that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def sharded_copy(tmp_path, sharded_model_dir) -> Path:
    """A private copy of the sharded tiny model that a test may damage."""
    return Path(shutil.copytree(sharded_model_dir, tmp_path / "sharded"))


@pytest.fixture
def hub_server(tmp_path, monkeypatch, tiny_model_dir):
    """A local fake Hub serving ``hearth-test/tiny-llama``, with huggingface_hub pointed at it.

    huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once at
    import, so besides the environment its ``constants`` are patched for the test.
    """
    from huggingface_hub import constants

    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    # Files a download must skip: pickle weights and docs.
    files["pytorch_model.bin"] = b"not really a pickle"
    files["README.md"] = b"# tiny llama\n"
    server = HubServer({TINY_REPO: files}).start()

    hf_home = tmp_path / "hf-home"
    hub_cache = hf_home / "hub"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    try:
        yield server
    finally:
        server.stop()
