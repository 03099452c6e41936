"""parse_quantization_config: what it reads from real-shaped configs, and every refusal
naming its field; quantization_config: what ``hearth quantize`` writes parses back."""

from __future__ import annotations

import pytest

from engine.errors import UnsupportedModelError
from engine.quant.formats import parse_quantization_config, quantization_config

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
       "modules_to_not_convert": ["visual"]}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "true_sequential": True, "static_groups": False}
CT_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
              "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}


def _ct(**weights) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**CT_WEIGHTS, **weights},
                                          "input_activations": None, "output_activations": None}}}


def _parse(qc: dict):
    return parse_quantization_config({"model_type": "llama", "quantization_config": qc}, "org/model")


def test_unquantized_config_is_none():
    assert parse_quantization_config({"model_type": "llama"}, "x") is None


def test_awq():
    q = _parse(AWQ)
    assert (q.method, q.bits, q.group_size, q.checkpoint_format, q.version) == ("awq", 4, 128, "gemm", "gemm")
    assert q.tensor_names == ("qweight", "qzeros", "scales") and not q.desc_act
    assert q.skips("model.visual.blocks.0.attn.qkv") and not q.skips("model.layers.0.mlp.up_proj")


def test_autoawq_quant_config_names():
    q = parse_quantization_config({"quant_method": "awq", "w_bit": 4, "q_group_size": 64,
                                   "zero_point": True, "version": "GEMM"}, "x")
    assert (q.bits, q.group_size) == (4, 64)


def test_gptq_defaults_to_v1_and_reads_quantize_config_json():
    q = _parse(GPTQ)
    assert (q.method, q.bits, q.group_size, q.sym, q.desc_act, q.checkpoint_format) == \
        ("gptq", 4, 128, True, False, "gptq")
    assert q.tensor_names == ("qweight", "qzeros", "scales") and q.optional_tensor_names == ("g_idx",)
    q = parse_quantization_config({"model_type": "llama"}, "x",
                                  quantize_config={"bits": 8, "group_size": -1, "desc_act": True, "sym": False,
                                                   "checkpoint_format": "gptq_v2"})
    assert (q.bits, q.group_size, q.desc_act, q.checkpoint_format) == (8, None, True, "gptq_v2")
    assert q.tensor_names[-1] == "g_idx" and q.group_size_for(576) == 576


def test_compressed_tensors():
    q = _parse(_ct(symmetric=False, actorder="group", num_bits=8))
    assert (q.method, q.bits, q.group_size, q.sym, q.actorder, q.desc_act) == \
        ("compressed-tensors", 8, 128, False, "group", True)
    assert q.tensor_names == ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                              "weight_g_idx")
    assert q.skips("lm_head") and not q.skips("model.layers.0.mlp.down_proj")
    q = _parse(_ct(strategy="channel", group_size=None, actorder="weight"))
    assert q.group_size is None and q.actorder == "weight" and not q.desc_act
    assert "weight_g_idx" not in q.tensor_names


def test_ignore_patterns():
    qc = _ct()
    qc["ignore"] = ["re:.*mlp.gate$", "lm_head"]
    q = _parse(qc)
    assert q.skips("model.layers.3.mlp.gate") and not q.skips("model.layers.3.mlp.gate_proj")


@pytest.mark.parametrize("qc,field,words", [
    ({"quant_method": "hqq", "nbits": 4}, "quant_method", "and bitsandbytes"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bnb_4bit_quant_type", "'fp4' weights"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size", "block-wise"),
    ({"quant_method": "exl2"}, "quant_method", "'exl2'"),
    ({**AWQ, "version": "gemv"}, "version", "'gemv'"),
    ({**AWQ, "version": "gemv_fast"}, "version", "'gemv_fast'"),
    ({**AWQ, "version": "marlin"}, "version", "'marlin'"),
    ({**AWQ, "bits": 8}, "bits", "8-bit AWQ"),
    ({**AWQ, "zero_point": False}, "zero_point", "without zero points"),
    ({**GPTQ, "bits": 3}, "bits", "3-bit GPTQ"),
    ({**GPTQ, "bits": 2}, "bits", "(4 or 8)"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format", "'marlin'"),
    ({**GPTQ, "is_marlin_format": True}, "checkpoint_format", "'marlin'"),
    ({**GPTQ, "dynamic": {"-:.*down": {}}}, "dynamic", "per-module"),
    ({**GPTQ, "group_size": 0}, "group_size", "0"),
    ({**_ct(), "format": "marlin-24"}, "format", "'marlin-24'"),
    ({**_ct(), "format": "naive-quantized"}, "format", "'naive-quantized'"),
    ({**_ct(), "format": "float-quantized"}, "config_groups.group_0.weights", "8-bit float weights"),
    ({**_ct(), "quantization_status": "frozen"}, "quantization_status", "not stored compressed"),
    ({**_ct(), "sparsity_config": {"format": "sparse-24"}}, "sparsity_config", "sparsity"),
    ({**_ct(), "kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme", "kv cache"),
    (_ct(num_bits=2), "config_groups.group_0.weights.num_bits", "2-bit"),
    (_ct(type="float", num_bits=8), "config_groups.group_0.weights.type", "floating-point"),
    (_ct(strategy="tensor"), "config_groups.group_0.weights.strategy", "'tensor'"),
    (_ct(dynamic=True), "config_groups.group_0.weights.dynamic", "dynamic"),
    ({**_ct(), "config_groups": {"group_0": "W4A16"}}, "config_groups.group_0", "expected an object, found str"),
    ({**_ct(), "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
        "input_activations": "dynamic"}}}, "config_groups.group_0.input_activations", "expected an object or null"),
    ({**_ct(), "config_groups": {"group_0": {"targets": ["Linear"], "weights": [4]}}},
     "config_groups.group_0.weights", "expected an object or null, found list"),
])
def test_refusals_name_the_field(qc, field, words):
    with pytest.raises(UnsupportedModelError) as e:
        _parse(qc)
    msg = str(e.value)
    assert f"quantization_config.{field} in org/model" in msg
    assert words in msg
    assert "instead" in msg or "use" in msg  # says what to do


def test_activation_quantization_is_refused():
    qc = _ct()
    qc["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "dynamic": True}
    with pytest.raises(UnsupportedModelError, match=r"group_0\.input_activations.*weight-only"):
        _parse(qc)


def test_per_group_format_and_targets_and_mixed_schemes_are_refused():
    qc = _ct()
    qc["config_groups"]["group_0"]["format"] = "marlin-24"
    with pytest.raises(UnsupportedModelError, match=r"group_0\.format.*marlin-24"):
        _parse(qc)
    qc = _ct()
    qc["config_groups"]["group_0"]["targets"] = ["re:.*mlp.*"]
    with pytest.raises(UnsupportedModelError, match="targets"):
        _parse(qc)
    qc = _ct()
    qc["config_groups"]["group_1"] = {"targets": ["Linear"], "weights": {**CT_WEIGHTS, "num_bits": 8}}
    with pytest.raises(UnsupportedModelError, match="several different weight schemes"):
        _parse(qc)


@pytest.mark.parametrize("method,bits,group,sym,desc_act", [
    ("awq", 4, 128, False, False), ("awq", 4, None, False, False),
    ("gptq", 4, 64, True, True), ("gptq", 8, None, False, False),
    ("compressed-tensors", 4, 32, False, True), ("compressed-tensors", 8, None, True, False),
])
def test_written_configs_parse_back(method, bits, group, sym, desc_act):
    q = _parse(quantization_config(method, bits, group, sym, desc_act))
    assert (q.method, q.bits, q.group_size, q.desc_act) == (method, bits, group, desc_act)
    if method != "awq":
        assert q.sym == sym
    if method != "gptq":
        assert q.skips("lm_head")


def test_written_gptq_config_is_v1_with_minus_one():
    cfg = quantization_config("gptq", 4, None, True)
    assert cfg["group_size"] == -1 and cfg["checkpoint_format"] == "gptq"
    with pytest.raises(ValueError):
        quantization_config("awq", 8, 128, False)
    with pytest.raises(ValueError):
        quantization_config("exl2", 8, 128, False)


@pytest.mark.parametrize("value", [[1, 2], "gptq"])
def test_a_quantization_config_that_is_no_object_is_named_before_the_tokenizer_loads(tiny_models, tmp_path, value):
    """(transformers' tokenizer loading used to trip over it first and blame the tokenizer)"""
    import json
    import shutil

    from engine.api import Engine

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama-tied"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": value}))
    with pytest.raises(UnsupportedModelError, match=r"^quantization_config in .*config.json: expected an object, "):
        Engine.load(str(folder), device="cpu")
