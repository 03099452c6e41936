"""Model names for people: the repo id, the file's name or the folder's, never a hash."""

from __future__ import annotations

import shutil

import pytest

from engine.loader.names import DEFAULT_MODEL_NAME, hub_cache_repo_id, model_display_name
from engine.loader.resolve import resolve_model

SNAPSHOT = "/home/u/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-360M-Instruct/snapshots/" + "f3" * 20


@pytest.mark.parametrize("ref, name", [
    (None, DEFAULT_MODEL_NAME),
    ("default", DEFAULT_MODEL_NAME),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct"),
    (SNAPSHOT, "HuggingFaceTB/SmolLM2-360M-Instruct"),
    (SNAPSHOT + "/", "HuggingFaceTB/SmolLM2-360M-Instruct"),
    ("/c/hub/models--gpt2/snapshots/" + "a" * 40, "gpt2"),  # a repo without an owner
    ("/c/hub/models--org--multi/snapshots/" + "a" * 40 + "/text-model", "org/multi/text-model"),
    ("/c/hub/models--org--tiny-GGUF/snapshots/" + "a" * 40 + "/q4/tiny.Q4_K_M.gguf", "tiny.Q4_K_M.gguf"),
    ("/models/llama-3.2-1b.Q8_0.gguf", "llama-3.2-1b.Q8_0.gguf"),
    ("/c/hearth/models/default-SmolLM2-135M-Instruct", DEFAULT_MODEL_NAME),
    ("/c/hearth/models/gguf/tiny-chat.Q8_0-0123456789ab", "tiny-chat.Q8_0.gguf"),
    ("/data/models/My-Model/", "My-Model"),
    ("./models/My-Model", "My-Model"),
    ("shape:llama-8b", "shape:llama-8b"),
])
def test_display_names(ref, name):
    assert model_display_name(ref) == name


def test_hub_cache_repo_id_is_none_outside_the_cache():
    assert hub_cache_repo_id("/data/snapshots/abc") is None
    assert hub_cache_repo_id("/data/models--x--y") is None


def test_a_hub_cache_snapshot_folder_loads_under_its_repo_id(tmp_path, tiny_model_dir):
    """The Library loads Hub models by their snapshot folder: the name must be the repo id,
    the path the folder itself."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / ("f374231cc2e0" + "0" * 28)
    shutil.copytree(tiny_model_dir, snapshot)
    resolved = resolve_model(str(snapshot))
    assert (resolved.name, resolved.source, resolved.path) == ("acme/tiny-chat", "local", snapshot.resolve())


def test_a_gguf_in_the_hub_cache_is_named_by_its_file_not_its_blob(tmp_path, hearth_cache, monkeypatch):
    """Hub cache files are links to blobs named by their hash: name the link."""
    import engine.loader.resolve as resolve_mod

    monkeypatch.setattr(resolve_mod, "_ensure_converted", lambda *a: None)  # naming only
    blob = tmp_path / "hub" / "models--acme--tiny-GGUF" / "blobs" / ("9b" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"GGUF")
    link = blob.parent.parent / "snapshots" / ("c" * 40) / "tiny-chat.Q8_0.gguf"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    resolved = resolve_model(str(link))
    assert (resolved.name, resolved.source) == ("tiny-chat.Q8_0.gguf", "gguf")


def test_check_model_finds_a_broken_model_without_loading_it(model_copy):
    """What the bridge asks before unloading a GPU model to make room for another."""
    from engine.api import ModelLoadError, check_model

    assert check_model(str(model_copy)).name == "model"
    assert check_model("shape:tiny").name == "shape:tiny"
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        check_model(str(model_copy))
