"""``Engine.model_info`` is a typed ``ModelInfo`` whose JSON form keeps the keys of the dict
it replaced (bench rows, ``hearth generate --json``, the app and the coming server)."""

from __future__ import annotations

import json

import pytest

from engine.api import Engine, ModelInfo

# The keys a CPU load's model_info had as a dict (before it was typed), plus quantization.
CPU_KEYS = {"name", "ref", "path", "source", "model_type", "vocab_size", "device", "dtype", "attention",
            "max_model_len", "implementation", "kv_cache_dtype", "weight_bytes", "kv_cache_bytes",
            "num_kv_blocks", "cuda_graphs", "cuda_graphs_off", "quantization", "cpu_decode", "cpu_head"}


def test_a_loaded_models_info_round_trips_through_json():
    engine = Engine.load("shape:tiny", device="cpu", max_model_len=64, num_blocks=8)
    try:
        info = engine.model_info
    finally:
        engine.shutdown()
    assert isinstance(info, ModelInfo)
    assert (info.name, info.device, info.implementation, info.quantization) == ("shape:tiny", "cpu", "native", "none")
    data = info.to_dict()
    assert set(data) == CPU_KEYS  # the optional fields a CPU load doesn't set are left out, as before
    assert ModelInfo.from_dict(json.loads(json.dumps(data))) == info


def test_gpu_fields_round_trip_with_their_integer_keys():
    info = ModelInfo(name="m", ref="m", path="/m", source="local", model_type="llama", vocab_size=32000,
                     device="cuda:0", dtype="bfloat16", attention="triton", max_model_len=8192,
                     implementation="native", kv_cache_dtype="float8_e4m3fn", weight_bytes=10, kv_cache_bytes=20,
                     num_kv_blocks=3, cuda_graphs=True, batch1_matmul={"qkv": "cublas"}, batch1_tune_s=1.25,
                     cuda_graph_bytes=5,
                     prompt_graph_tokens=512, prompt_graph_ms={128: [0.5, 0.7], 512: [1.0, 1.2]},
                     cuda_graph_routes={24: 32}, prompt_attention_lengths=7)
    back = ModelInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert back == info and back.prompt_graph_ms[128] == [0.5, 0.7] and back.cuda_graph_routes == {24: 32}
    # A newer Hearth's extra key is ignored; a missing field every load sets is not.
    assert ModelInfo.from_dict({**info.to_dict(), "pipeline_stages": 2}) == info
    with pytest.raises(ValueError, match="weight_bytes"):
        ModelInfo.from_dict({k: v for k, v in info.to_dict().items() if k != "weight_bytes"})
