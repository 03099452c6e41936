"""A local fake Hub with a few model repos, for the Models page's services and widgets.

Import the fixture into a test module (``from tests.app.hub_fixtures import fake_hub``)
so each test gets its own server, its own empty Hugging Face cache and its own
``HEARTH_DATA_DIR``, with the real huggingface_hub client pointed at 127.0.0.1.
Repos are made of small synthetic files (valid safetensors headers, GGUF magic), so
nothing heavy is built.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from tests.hub_server import HubServer

TINY = "acme/tiny-chat"
GGUF_REPO = "acme/tiny-chat-GGUF"
AWQ_REPO = "acme/mid-chat-AWQ"
BIG = "acme/big-chat"
VISION = "acme/vision-encoder"
GATED = "corp/gated-chat"
GOOD_TOKEN = "hf_goodtoken1234"

#: tiny-chat's config: 2 layers, 2 KV heads of 16 dims, untied embeddings of 1000 x 64.
TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 2048,
               "tie_word_embeddings": False}
#: The tensors of tiny-chat's model.safetensors (name -> shape), all float16.
TINY_TENSORS = {"model.embed_tokens.weight": (1000, 64), "lm_head.weight": (1000, 64),
                "model.layers.0.mlp.up_proj.weight": (128, 64), "model.layers.0.blob": (200_000,)}
TINY_README = """---
license: apache-2.0
pipeline_tag: text-generation
---
# Tiny chat

![badge](https://example.com/badge.svg)

A **tiny** chat model for [tests](https://example.com), trained on nothing at all.

## Usage

Load it with Hearth.
"""


def safetensors_bytes(tensors: dict[str, tuple[int, ...]], seed: int = 0) -> bytes:
    """A valid safetensors file of random float16 tensors of these shapes."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({name: rng.standard_normal(shape).astype(np.float16) for name, shape in tensors.items()})


@functools.cache
def repo_files() -> dict[str, dict[str, bytes]]:
    """Every fake repo's files (built once per test session)."""
    rng = np.random.default_rng(1)
    tiny = {
        "config.json": json.dumps(TINY_CONFIG).encode(),
        "model.safetensors": safetensors_bytes(TINY_TENSORS),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        "README.md": TINY_README.encode(),
        "pytorch_model.bin": b"pickle weights a download must skip",
    }
    gguf = {
        "tiny-chat.Q4_K_M.gguf": b"GGUF" + rng.bytes(150_000),
        "tiny-chat.Q8_0.gguf": b"GGUF" + rng.bytes(250_000),
        "README.md": b"---\nlicense: mit\n---\nGGUF builds of tiny-chat.\n",
    }
    awq = {"config.json": json.dumps({**TINY_CONFIG, "quantization_config": {"quant_method": "awq"}}).encode(),
           "model.safetensors": safetensors_bytes({"qweight": (64, 8)}, seed=2), "tokenizer.json": b"{}"}
    big = {"config.json": json.dumps({**TINY_CONFIG, "num_hidden_layers": 32}).encode(),
           "model.safetensors": safetensors_bytes({"w": (16, 16)}, seed=3), "tokenizer.json": b"{}"}
    vision = {"config.json": b'{"model_type": "vit"}', "model.safetensors": safetensors_bytes({"w": (4, 4)})}
    gated = {"config.json": json.dumps(TINY_CONFIG).encode(), "model.safetensors": safetensors_bytes({"w": (8, 8)}),
             "tokenizer.json": b"{}", "README.md": b"---\nlicense: llama3\n---\nAccept the terms first.\n"}
    return {TINY: tiny, GGUF_REPO: gguf, AWQ_REPO: awq, BIG: big, VISION: vision, GATED: gated}


def populate(server: HubServer) -> None:
    files = repo_files()
    text = "text-generation"
    server.add_repo(TINY, files[TINY], downloads=500, likes=40, pipeline_tag=text,
                    lastModified="2024-05-01T00:00:00.000Z", library_name="transformers",
                    tags=["transformers", "safetensors", "llama", text, "license:apache-2.0"])
    server.add_repo(GGUF_REPO, files[GGUF_REPO], downloads=900, likes=5, pipeline_tag=text,
                    lastModified="2024-03-01T00:00:00.000Z", library_name="gguf", tags=["gguf", text],
                    gguf={"total": 1_000_000, "architecture": "llama"})
    server.add_repo(AWQ_REPO, files[AWQ_REPO], downloads=300, likes=80, pipeline_tag=text,
                    lastModified="2024-06-01T00:00:00.000Z", tags=["safetensors", "awq", "4-bit", text])
    # Pretend size for the size filter: the Hub would count 70B parameters here.
    server.add_repo(BIG, files[BIG], downloads=100, likes=200, pipeline_tag=text,
                    lastModified="2024-01-15T00:00:00.000Z", tags=["safetensors", text],
                    safetensors={"parameters": {"BF16": 70_000_000_000}, "total": 70_000_000_000})
    server.add_repo(VISION, files[VISION], downloads=10_000, likes=1, pipeline_tag="image-classification",
                    tags=["safetensors", "vit"])
    server.add_repo(GATED, files[GATED], gated=True, allowed_tokens={GOOD_TOKEN}, downloads=50, likes=3,
                    pipeline_tag=text, tags=["safetensors", text])


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The fake Hub, running; huggingface_hub, HF cache and HEARTH_DATA_DIR all private to the test.

    huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once at
    import, so besides the environment its ``constants`` are patched for the test.
    """
    from huggingface_hub import constants

    server = HubServer()
    populate(server)
    server.start()
    hf_home = tmp_path / "hf-home"
    hub_cache = hf_home / "hub"
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HEARTH_DATA_DIR": str(tmp_path / "hearth-data")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    server.cache = hub_cache
    try:
        yield server
    finally:
        server.stop()
