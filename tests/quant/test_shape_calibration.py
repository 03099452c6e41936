"""GPTQ and AWQ of a random-weight shape (``shape:tiny``): it has no files and no tokenizer,
so calibration reads the calibration text's UTF-8 bytes as token ids; the checkpoint lands
in the models cache under the shape's name (made once, then reused), loads as a shape (token
ids in, no text; also when its folder is named directly, as ``hearth bench --model`` and
``hearth compare --model`` do), and ``quant_detail`` says it is for speed only. The
calibration is cut to 2 x 64 ids to stay quick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.api import Engine, InvalidRequestError, Request, SamplingParams
from engine.loader.shape_model import SHAPE_CALIBRATION_NOTE
from engine.shapes import SHAPES

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=5)
PROMPT = [5, 17, 923, 31000, 4, 4, 77, 12000]
SEQ_LEN, SEQUENCES = 64, 2


@pytest.fixture
def small_calibration(monkeypatch, tmp_path):
    """A calibration of 2 x 64 ids, into a models cache of this test's own (so its first
    load is the one that calibrates)."""
    from engine.quant import export

    monkeypatch.setattr(export, "CALIBRATION_SEQ_LEN", SEQ_LEN)
    monkeypatch.setattr(export, "CALIBRATION_SEQUENCES", SEQUENCES)
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path / "cache"))


def load(model: str, said: list[str] | None = None, **options) -> Engine:
    return Engine.load(model, device="cpu", max_model_len=64, progress=None if said is None else said.append,
                       **options)


def generate(engine: Engine) -> list[int]:
    (c,) = engine.generate([Request(prompt_token_ids=PROMPT, params=GREEDY)])
    assert c.finish_reason == "length" and c.text == ""  # token ids in and out, no text
    return c.token_ids


@pytest.mark.slow  # calibrates (about 5 s on 2 busy cores)
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_a_shape_calibrates_once_on_the_texts_bytes_and_generates(small_calibration, monkeypatch, method):
    from engine.quant import calibrate as calibrate_module
    from resources.texts import calibration_text_path

    seen = []
    real = calibrate_module.calibrate

    def spy(model, sequences, **options):
        seen.append([s.tolist() for s in sequences])
        return real(model, sequences, **options)

    monkeypatch.setattr(calibrate_module, "calibrate", spy)
    said: list[str] = []
    engine = load("shape:tiny", said, quantization=method)
    try:
        info = engine.model_info
        assert (info.name, info.source, info.quantization) == ("shape:tiny", "shape", method)
        assert info.quant_detail == f"8 x int4 g32 ({SHAPE_CALIBRATION_NOTE})"
        assert any("UTF-8 bytes" in m and f"{SEQUENCES} x {SEQ_LEN}" in m for m in said), said
        assert f"{method}: layer 2 of 2 quantized" in said
        first = generate(engine)
    finally:
        engine.shutdown()
    # calibrated on the text's bytes, modulo the vocabulary: the ids compare sends a shape
    text = calibration_text_path().read_text(encoding="utf-8").encode("utf-8")
    vocab = SHAPES["tiny"]["vocab_size"]
    assert seen == [[[b % vocab for b in text[i * SEQ_LEN:(i + 1) * SEQ_LEN]] for i in range(SEQUENCES)]]
    folder = Path(info.path)
    assert folder.parent.name == "calibrated" and folder.name.startswith(f"shape-tiny-{method}-")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert cfg["hearth_shape"] == "tiny" and cfg["quantization_config"]["quant_method"] == method
    assert "bytes" in cfg["hearth_quantized"]["calibration"]
    assert not list(folder.glob("tokenizer*"))

    again: list[str] = []
    engine = load("shape:tiny", again, quantization=method)
    try:
        assert not any("calibrat" in m for m in again), again  # the cached checkpoint loads as it is
        assert len(seen) == 1
        assert engine.model_info.path == info.path and engine.model_info.quant_detail == info.quant_detail
        assert generate(engine) == first
    finally:
        engine.shutdown()


@pytest.mark.slow  # calibrates
def test_the_written_folder_loads_as_the_shape(small_calibration, tmp_path):
    """``hearth quantize`` of a shape writes a folder without a tokenizer; named directly
    (``--model FOLDER``), it loads as the shape does: token ids only, the speed-only note."""
    from engine.quant.export import quantize_model

    result = quantize_model("shape:tiny", tmp_path / "awq", quantization="awq")
    engine = load(str(result.out_dir))
    try:
        info = engine.model_info
        assert (info.name, info.source, info.quantization) == ("shape:tiny", "shape", "awq")
        assert SHAPE_CALIBRATION_NOTE in info.quant_detail
        assert len(generate(engine)) == GREEDY.max_tokens
        with pytest.raises(InvalidRequestError, match="token ids"):
            engine.submit(Request(prompt="hello", params=GREEDY))
    finally:
        engine.shutdown()


def test_round_to_nearest_of_a_shape_written_and_read_back_gives_the_same_tokens(small_calibration, tmp_path):
    """The shape's other tensors (embedding, norms) come from the loaded model itself."""
    from engine.quant.export import quantize_model

    direct = load("shape:tiny", quantization="int4")
    try:
        want = generate(direct)
    finally:
        direct.shutdown()
    result = quantize_model("shape:tiny", tmp_path / "int4", quantization="int4")
    back = load(str(result.out_dir))
    try:
        assert back.model_info.source == "shape" and back.model_info.quantization == "compressed-tensors"
        assert generate(back) == want
    finally:
        back.shutdown()


@pytest.mark.slow  # calibrates (about 5 s on 2 busy cores)
def test_a_group_size_asked_for_goes_into_the_calibration_and_its_checkpoint_loads(small_calibration):
    """The calibrated checkpoint's groups are its own: its load must not refuse the group size
    that made them (a pre-quantized checkpoint refuses --group-size), first load or cached."""
    for _ in range(2):
        engine = load("shape:tiny", quantization="gptq", quant_group_size=32)
        try:
            assert "int4 g32" in engine.model_info.quant_detail
        finally:
            engine.shutdown()


def test_a_group_size_that_does_not_fit_the_shape_is_refused_with_advice(small_calibration):
    with pytest.raises(InvalidRequestError, match=r"group size 256 does not divide.*--group-size"):
        load("shape:tiny", quantization="gptq", quant_group_size=256)


def test_hearth_compare_runs_awq_on_a_shape(small_calibration, capsys, tmp_path):
    from tests.app.test_cli import run_cli

    out = tmp_path / "out.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe capital of France is\n", encoding="utf-8")
    rc, _out, err = run_cli(capsys, "compare", "--model", "shape:tiny", "--device", "cpu", "--prompts", prompts,
                            "--max-tokens", "4", "--quants", "int4,awq", "--eval-tokens", "48", "--json", out)
    assert rc == 0, err
    int4, awq = json.loads(out.read_text(encoding="utf-8"))
    assert int4["error"] is None and awq["error"] is None
    assert awq["quant_used"] == "awq" and SHAPE_CALIBRATION_NOTE in awq["quant_detail"]
    assert awq["weight_bytes"] == int4["weight_bytes"]  # the same int4 g32 layers
    assert 0.0 <= awq["agreement"] <= 1.0 and awq["perplexity"] > 1
