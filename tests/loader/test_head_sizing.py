"""The pre-flight size (check_model) of quantized loads of a model with an untied LM head
against what the load holds: int8/int4 make the head int8 (unless --float-head); a first
awq/gptq load of float weights is sized as int4 with the head float, as the calibrated
checkpoint keeps it."""

from __future__ import annotations

import pytest

from engine.api import Engine, check_model

OPTIONS = dict(device="cpu", dtype="float32", attention="torch", max_model_len=64)


@pytest.mark.parametrize("quant,float_head", [("int4", False), ("int8", False), ("int4", True)])
def test_int_check_matches_the_load_with_an_untied_head(tiny_models, quant, float_head):
    model = str(tiny_models["llama3"])
    check = check_model(model, quantization=quant, float_head=float_head, **OPTIONS)
    engine = Engine.load(model, quantization=quant, float_head=float_head, **OPTIONS)
    try:
        assert check.weights_bytes == engine.model_info.weight_bytes
        assert ("int8 channel" in engine.model_info.quant_detail) == (quant == "int8" or not float_head)
    finally:
        engine.shutdown()


def test_awq_check_matches_the_load_with_an_untied_head(tiny_models, monkeypatch, tmp_path):
    from engine.quant import export

    monkeypatch.setattr(export, "CALIBRATION_SEQ_LEN", 64)
    monkeypatch.setattr(export, "CALIBRATION_SEQUENCES", 2)
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path / "cache"))
    model = str(tiny_models["llama3"])
    check = check_model(model, quantization="awq", **OPTIONS)
    engine = Engine.load(model, quantization="awq", **OPTIONS)
    try:
        assert check.weights_bytes == engine.model_info.weight_bytes
    finally:
        engine.shutdown()
