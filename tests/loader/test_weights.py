"""weight_files / iter_weights / read_metadata on tiny checkpoints, healthy and damaged."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import ModelLoadError, UnsupportedModelError
from engine.loader.weights import iter_weights, read_metadata, weight_files


def test_single_file(tiny_model_dir, tiny_llama):
    files = weight_files(tiny_model_dir)
    assert [f.name for f in files] == ["model.safetensors"]
    got = dict(iter_weights(tiny_model_dir))
    expected = tiny_llama.state_dict()
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


def test_sharded_yields_every_tensor(sharded_model_dir, tiny_llama):
    files = weight_files(sharded_model_dir)
    assert len(files) > 1, "max_shard_size should have produced several shards"
    assert files == sorted(files)
    expected = tiny_llama.state_dict()
    seen = []
    for name, tensor in iter_weights(sharded_model_dir):
        assert torch.equal(tensor, expected[name]), name
        seen.append(name)
    assert len(seen) == len(set(seen)) == len(expected)


def test_read_metadata(sharded_model_dir, tiny_llama):
    meta = read_metadata(sharded_model_dir)
    sd = tiny_llama.state_dict()
    assert set(meta) == set(sd)
    for name, (shape, dtype) in meta.items():
        assert shape == tuple(sd[name].shape)
        assert dtype == "BF16"


def test_missing_shard_named(sharded_copy):
    index = json.loads((sharded_copy / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (sharded_copy / shard).unlink()
    with pytest.raises(ModelLoadError, match=shard):
        weight_files(sharded_copy)


def test_bad_index_json(sharded_copy):
    (sharded_copy / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json"):
        weight_files(sharded_copy)


@pytest.mark.parametrize("keep", [100, 5])
def test_truncated_file_named(model_copy, keep):
    file = model_copy / "model.safetensors"
    data = file.read_bytes()
    # keep=100 cuts the tensor data, keep=5 even the header length.
    file.write_bytes(data[:keep])
    with pytest.raises(ModelLoadError, match="model.safetensors") as info:
        list(iter_weights(model_copy))
    assert "delete" in str(info.value)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        read_metadata(model_copy)


def test_garbage_header(model_copy):
    file = model_copy / "model.safetensors"
    file.write_bytes((2**40).to_bytes(8, "little") + b"{}")  # absurd header size
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        list(iter_weights(model_copy))


def test_bin_only_is_unsupported(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="pytorch_model.bin"):
        weight_files(model_copy)


def test_no_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        weight_files(model_copy)
