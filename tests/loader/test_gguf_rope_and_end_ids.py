"""What transformers' GGUF reader leaves out and the conversion carries over: the RoPE scaling
(llama.cpp writes Llama 3.1+'s as a ``rope_freqs`` tensor of per-pair divisors, other
scalings as ``{arch}.rope.scaling.*`` metadata) and the end-of-turn tokens
(``tokenizer.ggml.eot_token_id`` / ``eom_token_id``: Llama 3's <|eot_id|>). Files are a
two-layer cut of the bundled SmolLM2 GGUF with the keys and tensors of each case added."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.errors import UnsupportedModelError

gguf = pytest.importorskip("gguf")

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """Per-pair frequency divisors as llama.cpp's converter describes Llama 3's scaling (written
    from its description: 1 above the high-frequency wavelength, ``factor`` past the low one,
    the reciprocal of the interpolated inverse between)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_cut(path, kv: dict | None = None, tensors: dict | None = None, layers: int = 2):
    """The bundled SmolLM2 GGUF cut to ``layers`` layers, plus metadata ``kv`` (name ->
    (value, GGUFValueType)) and float32 ``tensors``; returns ``path``."""
    from engine.loader.resolve import default_gguf_path

    reader = gguf.GGUFReader(str(default_gguf_path()))
    writer = gguf.GGUFWriter(str(path), arch="llama")
    kv = kv or {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in kv:
            continue
        value = layers if name == "llama.block_count" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    _finish(writer, kv, tensors)
    return path


def _finish(writer, kv: dict, tensors: dict | None) -> None:
    """Add metadata ``kv`` (name -> (value, GGUFValueType)) and float32 ``tensors``, then write
    the file."""
    for name, (value, vtype) in kv.items():
        writer.add_key_value(name, value, vtype)
    for name, data in (tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def converted(path, tmp_path):
    from engine.loader.gguf import convert_gguf

    out = convert_gguf(path, tmp_path / f"{path.stem}-hf", keep_quantized=True)
    cfg = json.loads((out / "config.json").read_text())
    return out, {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}


def test_a_llama31_file_converts_with_its_rope_scaling_and_end_of_turn_and_runs_them(default_model, tmp_path,
                                                                                     monkeypatch):
    """A file with Llama 3.1's rope_freqs and an end-of-turn token: the converted config has
    the llama3 scaling, the generation config both end tokens; the native model's logits over
    400 positions are transformers' with that scaling (and far from transformers' without it,
    which is what such a file ran with before)."""
    from engine.api import Engine
    from engine.loader.gguf import _config_rope
    from engine.tokenizer import Tokenizer
    from tests.models.test_parity import gguf_reference_model, native_logits

    theta, head_dim = 100000.0, 64  # SmolLM2's
    factors = llama3_factors(theta, head_dim, 8.0, 1.0, 4.0, 8192)
    assert 1.0 < factors[17] < 8.0 and factors[0] == 1.0 and factors[-1] == 8.0  # all three regions
    kv = {"tokenizer.ggml.eot_token_id": (1, gguf.GGUFValueType.UINT32)}  # (eos is 2)
    path = write_cut(tmp_path / "llama31.gguf", kv=kv, tensors={"rope_freqs.weight": factors}, layers=1)
    out, rope = converted(path, tmp_path)
    assert {k: rope[k] for k in LLAMA31} == LLAMA31 and rope["rope_theta"] == theta
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 1]
    assert Tokenizer.from_pretrained(out).eos_token_ids == {1, 2}

    monkeypatch.setenv("HEARTH_QUANT_KERNEL", "reference")  # exact float activations, as the reference's
    eng = Engine.load(str(path), device="cpu", dtype="float32", num_blocks=64, max_model_len=512)
    try:
        assert eng.runner.spec.rope.type == "llama3" and eng.runner.spec.rope.factor == 8.0
        assert {1, 2} <= eng.tokenizer.eos_token_ids
        ids = [(i * 7919) % 49000 + 100 for i in range(400)]
        got = native_logits(eng, ids, [len(ids)])
    finally:
        eng.shutdown()
    plain = gguf_reference_model(path)
    scaled = gguf_reference_model(path)
    scaled.config.rope_parameters = {**_config_rope(scaled.config), **LLAMA31}
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaled.model.rotary_emb = LlamaRotaryEmbedding(scaled.config)
    with torch.no_grad():
        want = scaled(torch.tensor([ids])).logits[0].float()
        unscaled = plain(torch.tensor([ids])).logits[0].float()
    top = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err < 2e-3 * top, err
    assert (unscaled - want).abs().max().item() > 20 * err  # the scaling matters at these positions


def _reader(path, kv: dict, tensors: dict | None = None):
    """A GGUF of metadata ``kv`` (and float32 ``tensors``) only, read back."""
    _finish(gguf.GGUFWriter(str(path), arch="llama"), kv, tensors)
    return gguf.GGUFReader(str(path))


def _cfg(**rope):
    from types import SimpleNamespace

    return SimpleNamespace(hidden_size=576, num_attention_heads=9, head_dim=64,
                           rope_parameters={"rope_type": "default", "rope_theta": 100000.0, **rope})


F32, U32, STR = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING


@pytest.mark.parametrize("kv, want", [
    ({"llama.rope.scaling.type": ("linear", STR), "llama.rope.scaling.factor": (4.0, F32)},
     {"rope_type": "linear", "factor": 4.0}),
    ({"llama.rope.scaling.type": ("yarn", STR), "llama.rope.scaling.factor": (4.0, F32),
      "llama.rope.scaling.original_context_length": (4096, U32), "llama.rope.scaling.yarn_beta_fast": (32.0, F32)},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0}),
    ({"llama.rope.scaling.type": ("none", STR)}, None),
    ({}, None),
])
def test_rope_scaling_metadata_becomes_the_configs_scaling(tmp_path, kv, want):
    from engine.loader.gguf import _rope_scaling

    assert _rope_scaling(_reader(tmp_path / "m.gguf", kv), _cfg(), tmp_path / "m.gguf") == want


@pytest.mark.parametrize("old, low, high, factor", [(8192, 1.0, 4.0, 32.0), (4096, 1.0, 2.0, 8.0), (256, 1.0, 4.0, 8.0)])
def test_llama3_parameters_are_found_from_the_factors(tmp_path, old, low, high, factor):
    """Llama 3.2's (factor 32) and other parameters of the scheme, from the factors alone;
    factors that are all 1 are no scaling; a config that already has one is left alone."""
    from engine.loader.gguf import _rope_scaling

    from engine.layers.rope_spec import RopeSpec
    from engine.layers.rotary import inv_frequencies

    factors = llama3_factors(100000.0, 64, factor, low, high, old)
    path = tmp_path / "f.gguf"
    got = _rope_scaling(_reader(path, {}, {"rope_freqs.weight": factors}), _cfg(), path)
    assert got["rope_type"] == "llama3" and got["factor"] == factor
    spec = RopeSpec(theta=100000.0, type="llama3", factor=factor, low_freq_factor=got["low_freq_factor"],
                    high_freq_factor=got["high_freq_factor"], original_max_position=got["original_max_position_embeddings"])
    # the frequencies the file asks for (parameters with the same band edges give the same ones:
    # (8192, 2, 4) is (4096, 1, 2)); Llama 3's own come out as written
    base = inv_frequencies(RopeSpec(theta=100000.0), 64)
    torch.testing.assert_close(inv_frequencies(spec, 64), base / torch.from_numpy(factors), rtol=2e-6, atol=0)
    if (old, low, high) == (8192, 1.0, 4.0):
        assert (got["original_max_position_embeddings"], got["low_freq_factor"], got["high_freq_factor"]) == (old, low, high)
    ones = tmp_path / "ones.gguf"
    assert _rope_scaling(_reader(ones, {}, {"rope_freqs.weight": np.ones(32, np.float32)}), _cfg(), ones) is None
    assert _rope_scaling(_reader(tmp_path / "g.gguf", {}, {"rope_freqs.weight": factors}),
                         _cfg(rope_type="linear", factor=2.0), path) is None


def test_a_scaling_hearth_cannot_reproduce_is_refused_naming_it(tmp_path):
    """rope_freqs that no Llama 3 scaling gives, or of the wrong length, and an unknown
    scaling type: refused, naming what the file has."""
    from engine.loader.gguf import _rope_scaling

    odd = np.linspace(3.0, 1.0, 32).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match="rope_freqs.*Llama 3"):
        _rope_scaling(_reader(tmp_path / "a.gguf", {}, {"rope_freqs.weight": odd}), _cfg(), tmp_path / "a.gguf")
    with pytest.raises(UnsupportedModelError, match=r"16 factors where .* 32 frequency pairs \(a partial rotary"):
        _rope_scaling(_reader(tmp_path / "b.gguf", {}, {"rope_freqs.weight": odd[:16].copy()}), _cfg(),
                      tmp_path / "b.gguf")
    kv = {"llama.rope.scaling.type": ("longrope", STR), "llama.rope.scaling.factor": (4.0, F32)}
    with pytest.raises(UnsupportedModelError, match="'longrope'"):
        _rope_scaling(_reader(tmp_path / "c.gguf", kv), _cfg(), tmp_path / "c.gguf")


def test_end_ids_are_eos_then_end_of_turn_and_message_each_once(tmp_path):
    from engine.loader.gguf import _end_ids

    kv = {"tokenizer.ggml.eos_token_id": (0, U32), "tokenizer.ggml.eot_token_id": (2, U32),
          "tokenizer.ggml.eom_token_id": (2, U32)}
    assert _end_ids(_reader(tmp_path / "a.gguf", kv)) == [0, 2]
    assert _end_ids(_reader(tmp_path / "b.gguf", {"tokenizer.ggml.eos_token_id": (5, U32)})) == [5]


def test_a_part_of_a_split_gguf_is_refused_as_such(tmp_path):
    """``model-00001-of-00002.gguf`` alone: said to be part 1 of 2, with how to merge (it was
    reported as lacking tensors)."""
    from engine.loader.gguf import convert_gguf

    path = tmp_path / "model-00001-of-00002.gguf"
    _reader(path, {"split.no": (0, gguf.GGUFValueType.UINT16), "split.count": (2, gguf.GGUFValueType.UINT16)},
            {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(UnsupportedModelError, match="part 1 of a GGUF split into 2 files.*--merge"):
        convert_gguf(path, tmp_path / "out")
