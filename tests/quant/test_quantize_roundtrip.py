"""``hearth quantize`` round trip: a tiny model quantized by Hearth, written in each
published layout (compressed-tensors, GPTQ, AWQ), loads back (quantization ``auto`` reads
the checkpoint's own) with the same logits as the direct quantized load, bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch

from app.cli import main
from engine.errors import InvalidRequestError
from engine.quant.export import quantize_model
from engine.runner.lifecycle import release_runner
from tests.quant.test_quantized_models import hearth_logits, load


@pytest.fixture(scope="module")
def direct(tiny_models):
    out = {}
    for quant in ("int4", "int8"):
        # hearth quantize writes the untied head as the checkpoint has it (one format per file)
        loaded = load(tiny_models["llama3"], quantization=quant, float_head=True)
        out[quant] = hearth_logits(loaded.runner)
        release_runner(loaded.runner)
    return out


@pytest.mark.parametrize("quant,layout", [("int4", "gptq"), ("int4", "awq"), ("int8", "compressed-tensors"),
                                          ("int8", "gptq")])
def test_each_layout_loads_back_with_the_same_logits(tiny_models, tmp_path, direct, quant, layout):
    result = quantize_model(str(tiny_models["llama3"]), tmp_path / "q", quantization=quant, layout=layout)
    assert result.layers == 2 * 7  # q, k, v, o, gate, up, down of each of 2 layers
    back = load(result.out_dir)
    try:
        assert back.info.quantization == layout
        assert torch.equal(hearth_logits(back.runner), direct[quant])
    finally:
        release_runner(back.runner)
    cfg = json.loads((result.out_dir / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == layout


@pytest.mark.parametrize("quant,layout", [("int8", "compressed-tensors"), ("int4", "gptq"), ("awq", "awq")])
def test_a_quantized_projections_bias_is_written(tiny_models, tmp_path, quant, layout):
    """Qwen2's q/k/v biases (AWQ's folded into them) go into the checkpoint beside the
    quantized weights: they were dropped with the float weights, and the folder didn't load."""
    from safetensors import safe_open

    result = quantize_model(str(tiny_models["qwen2"]), tmp_path / "q", quantization=quant, layout=layout)
    with safe_open(str(result.out_dir / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.bias" in set(f.keys())
    back = load(result.out_dir)
    try:
        logits = hearth_logits(back.runner)
    finally:
        release_runner(back.runner)
    if quant != "awq":  # (AWQ's own load calibrates into the cache: the same path)
        direct = load(tiny_models["qwen2"], quantization=quant, float_head=True)
        try:
            assert torch.equal(logits, hearth_logits(direct.runner))
        finally:
            release_runner(direct.runner)


def test_hearth_quantize_command_writes_compressed_tensors(tiny_models, tmp_path, direct, capsys):
    out = tmp_path / "ct"
    assert main(["quantize", "--model", str(tiny_models["llama3"]), "--quant", "int4", "--out", str(out),
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["layout"] == "compressed-tensors" and row["quant"] == "int4" and row["file_bytes"] > 0
    if os.name == "posix":  # the weights as readable as the config beside them (safetensors writes 0600)
        assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777
    back = load(out)
    try:
        assert back.info.quantization == "compressed-tensors"
        assert torch.equal(hearth_logits(back.runner), direct["int4"])
    finally:
        release_runner(back.runner)
    # the folder exists now: refused, and nothing is overwritten
    assert main(["quantize", "--model", str(tiny_models["llama3"]), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    # a folder that can't be written: refused before the model is even looked for
    (tmp_path / "file").write_text("x")
    assert main(["quantize", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "file" / "q")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Not a directory" in err and "(--out)" in err, err


def test_a_cancelled_write_leaves_no_folders_it_made(tiny_models, tmp_path, monkeypatch):
    """Ctrl-C while the file is written: neither the temporary folder nor the missing
    folders on the way to --out (made for it) are left behind."""
    import safetensors.torch

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(str(tiny_models["llama3"]), tmp_path / "new" / "deeper" / "q", quantization="int8")
    assert list(tmp_path.iterdir()) == []


def test_an_out_under_a_dangling_link_is_refused_before_anything_loads(tmp_path, capsys):
    """(the link was passed over as a folder to make, and the write failed as 'File exists' at the end)"""
    (tmp_path / "gone").symlink_to(tmp_path / "no-such-folder")
    assert main(["quantize", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "gone" / "q")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "(--out)" in err and "no such file or folder" not in err, err


def test_an_empty_out_is_refused_as_empty(tmp_path, capsys):
    """--out "" is the current folder to Path, which exists: it was refused as " exists"."""
    assert main(["quantize", "--model", str(tmp_path / "no-such-model"), "--out", ""]) == 2
    err = capsys.readouterr().err
    assert "--out is empty" in err and "Traceback" not in err, err


def test_a_prequantized_checkpoint_refuses_another_quantization(tiny_models, tmp_path):
    result = quantize_model(str(tiny_models["llama3"]), tmp_path / "g", quantization="int4", layout="gptq")
    with pytest.raises(InvalidRequestError, match="already quantized with gptq"):
        load(result.out_dir, quantization="int8")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_of_a_float_model_calibrate_once_then_load_the_checkpoint(tiny_models, method):
    from engine.config import load_config
    from engine.loader.engine_loader import load_model

    def load_with(said):
        config = load_config(str(tiny_models["llama-tied"]), device="cpu", dtype="float32", attention="torch",
                             num_blocks=8, max_model_len=128, quantization=method)
        return load_model(config, progress=said.append)

    first: list[str] = []
    loaded = load_with(first)
    try:
        assert loaded.info.quantization == method and loaded.info.quant_detail == "8 x int4 g32"
        assert f"{method}: layer 2 of 2 quantized" in first
        from engine.paths import models_cache_dir
        from engine.quant.export import GPTQ_DAMP

        configs = [json.loads(p.read_text()) for p in (models_cache_dir() / "calibrated").glob("*/config.json")]
        written = [c["quantization_config"] for c in configs if c["hearth_quantized"]["method"] == method]
        assert written
        for qc in written:  # what GPTQ ran with is what its config says (it said damp 0.01)
            assert (qc.get("damp_percent"), qc.get("true_sequential")) == (
                (GPTQ_DAMP, True) if method == "gptq" else (None, None))
        assert any(m.startswith("note: on the CPU a float model's first calibration") for m in first)
        logits = hearth_logits(loaded.runner)
    finally:
        release_runner(loaded.runner)
    again: list[str] = []
    loaded = load_with(again)
    try:
        assert not any("calibrat" in m for m in again)  # the cached checkpoint loads as it is
        assert torch.equal(hearth_logits(loaded.runner), logits)
    finally:
        release_runner(loaded.runner)


@pytest.mark.parametrize("method", ["int4", "gptq", "awq"])
def test_a_group_size_not_offered_is_refused_before_anything_loads(tiny_models, tmp_path, monkeypatch, method):
    """(gptq and awq found it out in their first layer's calibration)"""
    import engine.quant.export as export

    monkeypatch.setattr(export, "calibrated_model", lambda *a, **k: pytest.fail("calibrated before checking"))
    with pytest.raises(InvalidRequestError, match=r"group size \(--group-size\) must be 32, 64, 128 or 256, got 48"):
        quantize_model(str(tiny_models["llama3"]), tmp_path / "out", quantization=method, group_size=48)
    assert not (tmp_path / "out").exists()


def test_symmetric_int8_is_written_as_gptq_v1(tiny_models, tmp_path):
    """Its unsigned zero points are 128, which v1 (stored minus one) holds: the layout every
    GPTQ loader reads, not gptq_v2 (it was chosen on the signed zero points, 0)."""
    from safetensors.torch import load_file

    result = quantize_model(str(tiny_models["llama3"]), tmp_path / "g8", quantization="int8", layout="gptq")
    qc = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]
    assert qc["sym"] is True and qc.get("checkpoint_format", "gptq") == "gptq"
    assert "damp_percent" not in qc and "true_sequential" not in qc  # rounded to nearest: no GPTQ run to record
    tensors = load_file(str(next(result.out_dir.glob("*.safetensors"))))
    zeros = [t for name, t in tensors.items() if name.endswith(".qzeros")]
    assert zeros and all(bool(z.eq(0x7F7F7F7F).all()) for z in zeros)


@pytest.mark.parametrize("method", ["awq", "int8"])
def test_quantize_of_a_prequantized_checkpoint_names_the_method_asked_for(tiny_models, tmp_path, method):
    """(a calibrated method loaded the source as none, and the refusal said "to use none";
    either said "--quant auto", which hearth quantize doesn't take)"""
    source = quantize_model(str(tiny_models["llama3"]), tmp_path / "g", quantization="int4", layout="gptq")
    with pytest.raises(InvalidRequestError) as e:
        quantize_model(str(source.out_dir), tmp_path / "again", quantization=method)
    assert str(e.value) == (f"this checkpoint is already quantized with gptq: hearth quantize writes {method} from "
                            "the model's unquantized original; point --model at that.")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("layout,part", [("compressed-tensors", "weight_packed"), ("gptq", "qweight")])
def test_a_damaged_checkpoint_names_the_layer_that_is(tiny_models, tmp_path, layout, part):
    """q_proj's packed weight missing: reported missing (it made k_proj's "unexpected", the
    first shard deciding whether a fused layer is quantized); its scale of the wrong shape:
    the error names the layer and what to do."""
    from safetensors.torch import load_file, save_file

    from engine.errors import ModelLoadError

    result = quantize_model(str(tiny_models["llama3"]), tmp_path / "q", quantization="int4", layout=layout)
    (file,) = result.out_dir.glob("*.safetensors")
    good = load_file(str(file))
    q = "model.layers.0.self_attn.q_proj"
    save_file({k: v for k, v in good.items() if k != f"{q}.{part}"}, str(file), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"tensors are missing from the checkpoint \(first: {q}\.{part}\)"):
        load(result.out_dir)
    scale = "weight_scale" if layout == "compressed-tensors" else "scales"
    save_file({**good, f"{q}.{scale}": good[f"{q}.{scale}"][:1]}, str(file), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"layer '{q}': .*{scale} has shape.*download it again"):
        load(result.out_dir)


def test_a_prequantized_checkpoints_groups_are_its_own(tiny_models, tmp_path):
    """--group-size on it is refused (it was silently ignored); a group size in its config
    that doesn't fit the model is named as the config's, not fixed by a flag it can't take."""
    from engine.errors import UnsupportedModelError

    result = quantize_model(str(tiny_models["llama3"]), tmp_path / "g", quantization="int4", layout="gptq",
                            group_size=32)
    with pytest.raises(InvalidRequestError, match="already quantized with gptq in groups of 32: .*drop --group-size"):
        load(result.out_dir, quantization="gptq", quant_group_size=64)
    release_runner(load(result.out_dir, quantization="gptq", quant_group_size=32).runner)  # its own groups: fine
    # asked for another method as well: that is what is wrong first
    with pytest.raises(InvalidRequestError, match="already quantized with gptq: load it as it is"):
        load(result.out_dir, quantization="int4", quant_group_size=64)
    cfg_path = result.out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["group_size"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"group size 48 does not divide .* quantization_config\.group_size"):
        load(result.out_dir)


def test_the_printed_load_command_works_for_a_folder_with_spaces(tiny_models, tmp_path, capsys):
    """'load it with --model DIR' is meant to be copied into a shell: quoted when it must be."""
    import shlex

    out = tmp_path / "my models" / "tiny int8"
    assert main(["quantize", "--model", str(tiny_models["llama3"]), "--quant", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(f"load it with --model {shlex.quote(str(out))}"), printed
    assert shlex.split(printed.rstrip().rsplit("--model ", 1)[1]) == [str(out)]


def test_a_methods_other_name_is_taken(tiny_models, tmp_path):
    """e4m3 is fp8 in every command (the load dialog, --quant of generate, eval, bench): quantize
    refused it as unknown."""
    result = quantize_model(str(tiny_models["llama3"]), tmp_path / "q", quantization="e4m3")
    assert result.quantization == "fp8"
    assert json.loads((result.out_dir / "config.json").read_text())["hearth_quantized"]["method"] == "fp8"
