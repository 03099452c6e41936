"""A truncated GGUF file is called truncated, not blamed on its architecture (issue 12
item 9d: a cut-off download read as "cannot reshape array ... use a GGUF of an
architecture transformers supports")."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ModelLoadError
from engine.loader.gguf_check import truncation_problem
from engine.loader.resolve import resolve_model


def _tiny_gguf(path: Path) -> Path:
    """A small but real llama GGUF: a few KiB of header, 64 KiB of f32 tensor data."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_token_list([f"t{i}".encode() for i in range(256)])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((256, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return _tiny_gguf(tmp_path / "whole.gguf")


def _cut(src: Path, dst: Path, size: int) -> Path:
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def _assert_truncated(msg: str, name: str, have: int, total: int | None) -> None:
    assert name in msg and "truncated" in msg and "download it again" in msg.lower(), msg
    if total is not None:
        assert f"({have} of {total} bytes)" in msg, msg
    # Not blamed on the architecture or the quantization.
    assert not re.search(r"architecture|quantization|reshape", msg), msg


def test_a_whole_file_is_not_truncated(tiny_gguf):
    assert truncation_problem(tiny_gguf) is None


def test_a_file_cut_in_its_tensor_data(tiny_gguf, tmp_path, hearth_cache):
    total = tiny_gguf.stat().st_size
    cut = _cut(tiny_gguf, tmp_path / "cut-data.gguf", total - 1000)
    with pytest.raises(ModelLoadError) as info:
        resolve_model(str(cut))
    _assert_truncated(str(info.value), "cut-data.gguf", total - 1000, total)


def test_a_file_cut_in_its_header(tiny_gguf, tmp_path, hearth_cache):
    cut = _cut(tiny_gguf, tmp_path / "cut-header.gguf", 600)
    with pytest.raises(ModelLoadError) as info:
        resolve_model(str(cut))
    _assert_truncated(str(info.value), "cut-header.gguf", 600, None)
    assert "ends inside its header, after 600 bytes" in str(info.value)


def test_the_default_model_cut_in_half(default_model, tmp_path, hearth_cache):
    from engine.loader.resolve import default_gguf_path

    src = default_gguf_path()
    total = src.stat().st_size
    cut = tmp_path / "half.gguf"
    with src.open("rb") as fh:
        cut.write_bytes(fh.read(total // 2))
    with pytest.raises(ModelLoadError) as info:
        resolve_model(str(cut))
    _assert_truncated(str(info.value), "half.gguf", total // 2, total)


def test_a_whole_file_without_a_tokenizer_is_not_called_corrupt(tiny_gguf, hearth_cache):
    """A complete GGUF whose metadata names no tokenizer (tokenizer.ggml.model) says that,
    rather than 'truncated, corrupt or an unsupported quantization'."""
    with pytest.raises(ModelLoadError, match=r"whole.gguf: it has no tokenizer Hearth can read \(.*tokenizer None") as info:
        resolve_model(str(tiny_gguf))
    assert not re.search(r"truncated|corrupt|\w\.\. ", str(info.value)), str(info.value)


def test_a_killed_conversions_temp_folder_is_removed_by_the_next(tmp_path):
    """A conversion killed outright (SIGKILL, terminal closed, out of memory) runs no cleanup
    and leaves its hidden temp folder, gigabytes for a large model: the next conversion into
    the same place removes it, but not one whose process still runs."""
    import subprocess
    import sys

    from engine.loader.gguf import remove_stale_temps

    out = tmp_path / "model-abc123"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".model-abc123.tmp-{dead}-deadbeef"
    running = tmp_path / f".model-abc123.tmp-{os.getpid()}-0badf00d"
    other = tmp_path / f".model-abc1234.tmp-{dead}-deadbeef"  # another model's
    for folder in (stale, running, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    remove_stale_temps(out)
    assert not stale.exists() and running.exists() and other.exists()


def test_conversions_of_earlier_versions_of_a_file_are_removed(tmp_path):
    """Downloading a GGUF again (or editing it) gives it a new cache key; the conversions of
    its earlier versions can't be loaded any more and each is as large as the model: the
    new conversion removes them, and nothing of another file or of the other kind."""
    import json

    from engine.loader.resolve import remove_superseded_conversions

    gguf = tmp_path / "files" / "m.Q4_K_M.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "gguf"

    def conversion(name, source, size, kept=True):
        folder = cache / name
        folder.mkdir(parents=True)
        (folder / "hearth_source.json").write_text(json.dumps(
            {"source": str(source), "size": size, "mtime_ns": 1, "keep_quantized": kept}))
        return folder

    current = conversion("m.Q4_K_M-aaa-gguf-quant", gguf, 4)
    old = conversion("m.Q4_K_M-bbb-gguf-quant", gguf, 3)
    old_float = conversion("m.Q4_K_M-ccc", gguf, 3, kept=False)  # the other kind: its own current one
    elsewhere = conversion("m.Q4_K_M-ddd-gguf-quant", tmp_path / "other" / "m.Q4_K_M.gguf", 3)
    unrecorded = cache / "m.Q4_K_M-eee-gguf-quant"
    unrecorded.mkdir()
    remove_superseded_conversions(gguf, current)
    assert current.exists() and not old.exists()
    assert old_float.exists() and elsewhere.exists() and unrecorded.exists()
