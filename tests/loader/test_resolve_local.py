"""resolve_model / validate_model_folder for local folders and bad inputs."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from engine.loader.resolve import ResolvedModel, resolve_model, validate_model_folder


def test_local_folder_ok(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved == ResolvedModel(path=tiny_model_dir.resolve(), source="local", name="tiny-llama")


def test_sharded_folder_ok(sharded_model_dir):
    assert resolve_model(str(sharded_model_dir)).source == "local"


def test_relative_path(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    assert resolve_model("./tiny-llama").path == tiny_model_dir.resolve()


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(str(model_copy))


def test_folder_of_gguf_files_names_them(tmp_path):
    """A folder of GGUF files (as LM Studio or a download keeps them) is not a model folder:
    the error names the files and how to pass one, quoted for a path with spaces."""
    folder = tmp_path / "my models"
    folder.mkdir()
    for name in ("b.Q8_0.gguf", "a.Q4_K_M.gguf"):
        (folder / name).write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"holds GGUF files \(a.Q4_K_M.gguf, b.Q8_0.gguf\): pass one of them, "
                                             r"e.g. --model '.*/my models/a.Q4_K_M.gguf'"):
        resolve_model(str(folder))


def test_bad_json_config(model_copy):
    (model_copy / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelLoadError, match="config.json"):
        validate_model_folder(model_copy)


def test_config_without_model_type(model_copy):
    (model_copy / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ModelLoadError, match="model_type"):
        validate_model_folder(model_copy)


def test_missing_shard(sharded_copy):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        resolve_model(str(sharded_copy))


def test_bin_only(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        resolve_model(str(model_copy))


def test_no_tokenizer(model_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        resolve_model(str(model_copy))


def test_truncated_weights_still_resolve_then_fail_on_read(model_copy):
    # Validation only checks presence (fast); reading finds the damage and names the file.
    from engine.loader.weights import iter_weights

    file = model_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    resolved = resolve_model(str(model_copy))
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        list(iter_weights(resolved.path))


@pytest.mark.parametrize("text", ["./no-such-model", "/no/such/folder", "~/no-such-model", "a/b/c", "model.gguf"])
def test_path_like_missing(text):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        resolve_model(text)


@pytest.mark.parametrize("url, repo", [
    ("https://huggingface.co/HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
    ("https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json", "Qwen/Qwen2.5-0.5B-Instruct"),
    ("hf.co/owner/name", "owner/name"),
])
def test_a_hub_web_address_names_the_repo_id_to_give(url, repo):
    """A pasted model page's address was told to check its path."""
    with pytest.raises(ModelLoadError, match=f"web address: give the Hub repo id instead \\({repo}\\)"):
        resolve_model(url)


def test_invalid_name():
    with pytest.raises(ModelLoadError, match="not a valid Hub repo id"):
        resolve_model("what is this?")


def test_empty_name():
    with pytest.raises(InvalidRequestError):
        resolve_model("  ")


def test_revision_for_local_folder(tiny_model_dir):
    with pytest.raises(InvalidRequestError, match="revision"):
        resolve_model(str(tiny_model_dir), revision="main")


def test_plain_file_is_not_a_model(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="folder"):
        resolve_model(str(tiny_model_dir / "config.json"))


@pytest.mark.parametrize("field, value, says", [("num_hidden_layers", -1, "num_hidden_layers must be positive"),
                                                ("num_key_value_heads", 3, "not a multiple"),
                                                ("num_attention_heads", 0, "num_attention_heads must be positive"),
                                                ("hidden_size", None, "wrong kind"),
                                                ("intermediate_size", "64x", "wrong kind")])
def test_a_damaged_config_is_a_load_error_not_a_fallback(model_copy, field, value, says):
    """A Llama config with an impossible field is reported as such (it once fell through to
    the transformers fallback, which then failed on something unrelated)."""
    import json

    from engine.api import Engine

    cfg = json.loads((model_copy / "config.json").read_text())
    cfg[field] = value
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=f"{says}.*download the model again"):
        Engine.load(str(model_copy), device="cpu")


def test_dangling_symlink_is_named_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """A link to a model that moved or was deleted: said so, not fetched from the Hub as
    a repo id (which offline ended in 'not in the local Hugging Face cache')."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "current").symlink_to(tmp_path / "gone-model")
    with pytest.raises(ModelLoadError, match=r"current is a symbolic link to .*gone-model, which does not exist"):
        resolve_model("current")
