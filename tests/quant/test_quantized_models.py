"""Quantized loads end to end: a tiny model quantized to int8/int4 as it streams in gives
the logits of transformers' own model holding the dequantized weights (the independent
reference); a group size that doesn't fit is refused before anything loads, naming the
layer; a GGUF file's own Q4_1/Q8_0 weights run as they are and give transformers' logits
for that file."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from engine.errors import InvalidRequestError
from engine.layers.linear import TiedLMHead
from engine.layers.quant_linear import QuantizedLinear, QuantizedTiedHead, QuantizedVocabEmbedding
from engine.loader.engine_loader import load_model
from engine.runner.lifecycle import release_runner

PROMPT = [5, 17, 99, 3, 1024, 7, 42, 8, 300, 11, 12, 13, 2048]


def hearth_logits(runner, ids=PROMPT) -> torch.Tensor:
    """The runner's logits for ``ids`` as one prompt (on its device), float32 on the CPU."""
    n = len(ids)
    dev = runner.device
    with torch.inference_mode():
        meta = runner._metadata([[0, 1, 2]], [0], [n])
        hidden = runner.model(torch.tensor(ids, device=dev), torch.arange(n, device=dev), runner.kv_caches, meta)
        return runner.model.compute_logits(hidden).float().cpu().clone()


def reference_logits(path, runner, ids=PROMPT) -> torch.Tensor:
    """transformers' model of ``path`` with each projection Hearth quantized replaced by
    its dequantized weight (rows split back into q/k/v, gate/up)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model = runner.model
    for i, layer in enumerate(model.model.layers):
        hf_layer = hf.model.layers[i]
        for module, names in ((layer.self_attn.qkv_proj, ("q_proj", "k_proj", "v_proj")),
                              (layer.mlp.gate_up_proj, ("gate_proj", "up_proj"))):
            if isinstance(module, QuantizedLinear):
                w = module.quantized_weight().dequantize(torch.float32)
                parent = hf_layer.self_attn if "q_proj" in names else hf_layer.mlp
                for name, (start, rows) in zip(names, module.shard_offsets.values()):
                    getattr(parent, name).weight.data.copy_(w[start:start + rows])
        for module, target in ((layer.self_attn.o_proj, hf_layer.self_attn.o_proj),
                               (layer.mlp.down_proj, hf_layer.mlp.down_proj)):
            if isinstance(module, QuantizedLinear):
                target.weight.data.copy_(module.quantized_weight().dequantize(torch.float32))
    embed = model.model.embed_tokens
    if isinstance(embed, QuantizedVocabEmbedding):
        hf.model.embed_tokens.weight.data.copy_(embed.quantized_weight().dequantize(torch.float32))
    if isinstance(model.lm_head, QuantizedLinear) and not isinstance(model.lm_head, QuantizedTiedHead):
        hf.lm_head.weight.data.copy_(model.lm_head.quantized_weight().dequantize(torch.float32))
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def load(path, **options):
    config = load_config(str(path), device="cpu", dtype="float32", attention="torch", num_blocks=8,
                         max_model_len=128, **options)
    return load_model(config)


@pytest.mark.parametrize("family,quant,head", [("llama3", "int8", "auto"), ("llama3", "int4", "auto"),
                                               ("llama3", "int4", "float"), ("llama-tied", "int4", "quant"),
                                               ("llama-tied", "int8", "auto"), ("qwen2", "int8", "quant")])
def test_a_quantized_tiny_model_gives_the_logits_of_its_dequantized_weights(tiny_models, family, quant, head,
                                                                            monkeypatch):
    """``head``: auto (an untied head becomes int8 per channel, a tied one stays float),
    float (--float-head) or quant (--quant-head: embedding and head in the method's format).
    With exact float activations (the reference kernel): the CPU kernel rounds them to int8
    blocks, checked against its own bound in tests/kernels/test_cpu_quant.py."""
    monkeypatch.setenv("HEARTH_QUANT_KERNEL", "reference")
    loaded = load(tiny_models[family], quantization=quant, quant_head=head == "quant", float_head=head == "float")
    try:
        runner = loaded.runner
        untied = not isinstance(runner.model.lm_head, (TiedLMHead, QuantizedTiedHead))
        layers = {n: m for n, m in runner.model.named_modules() if isinstance(m, QuantizedLinear)}
        head_quantized = head == "quant" or (head == "auto" and untied)
        assert len(layers) == 4 * 2 + (1 if head_quantized else 0)
        assert ("lm_head" in layers) == head_quantized
        bits = 8 if quant == "int8" else 4
        for name, m in layers.items():
            assert m.bits == (8 if name == "lm_head" and head == "auto" else bits), name
            if name == "lm_head" and head == "auto":
                assert m.group_size == m.in_features and m.mins is None  # int8 per output channel
        if quant == "int4":  # auto: 96 inputs of down fit only 32
            assert {m.group_size for n, m in layers.items() if m.bits == 4} == {32}
        assert isinstance(runner.model.model.embed_tokens, QuantizedVocabEmbedding) == (head == "quant")
        assert loaded.info.quantization == quant
        got, want = hearth_logits(runner), reference_logits(tiny_models[family], runner)
        assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
        # and quantizing changed the model: the float one's logits differ
        float_loaded = load(tiny_models[family], quantization="none")
        try:
            assert (hearth_logits(float_loaded.runner) - got).abs().max() > 1e-3
            assert loaded.info.weight_bytes < float_loaded.info.weight_bytes
        finally:
            release_runner(float_loaded.runner)
    finally:
        release_runner(loaded.runner)


def test_quant_head_and_float_head_together_are_refused(tiny_models):
    with pytest.raises(InvalidRequestError, match="choose one") as err:
        load(tiny_models["llama3"], quantization="int4", quant_head=True, float_head=True)
    assert err.value.options == ("quant_head", "float_head")


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_it(tiny_models):
    with pytest.raises(InvalidRequestError, match=r"layer model\.layers\.0\.mlp\.down_proj \(\[64 x 96\]\).*"
                                                  r"group size 64 does not divide.*group size of 32") as err:
        load(tiny_models["llama3"], quantization="int4", quant_group_size=64)
    assert err.value.options == ("quant_group_size",)


def test_the_group_size_advised_fits_every_layer():
    """The advice for a group size that doesn't divide a layer names one every projection
    takes (32 fits this layer's 96 inputs but not another's 200: int8 then)."""
    from engine.quant.qweight import check_shape
    from engine.quant.sources import rtn
    from engine.quant.transform import _refuse_shape

    with pytest.raises(InvalidRequestError, match="group size of 32"):
        _refuse_shape(rtn("int4", 64), "layers.0.q", 96, 96, check_shape, {64, 96})
    with pytest.raises(InvalidRequestError, match="use int8") as err:
        _refuse_shape(rtn("int4", 64), "layers.0.q", 96, 96, check_shape, {96, 200})
    assert "group size of" not in str(err.value)


def test_gguf_is_refused_for_a_model_that_is_not_a_gguf_file(tiny_models, tmp_path):
    with pytest.raises(InvalidRequestError, match="not a GGUF file"):
        load(tiny_models["llama3"], quantization="gguf")
    # a GGUF's conversion with nothing kept (an F16 file): said as such, not "not a GGUF file"
    import shutil

    from engine.loader.gguf import SOURCE_FILE
    from engine.quant.transform import quantization_plan

    folder = shutil.copytree(tiny_models["llama3"], tmp_path / "f16-gguf")
    (folder / SOURCE_FILE).write_text("{}")
    with pytest.raises(InvalidRequestError, match="has none in a type Hearth keeps .*Q4_K.*Load it with none"):
        quantization_plan("gguf", folder)


def test_unquantized_choices_set_the_dtype():
    from engine.loader.choices import check_load_choices

    assert check_load_choices(load_config(device="cpu", quantization="bf16")).dtype == torch.float32
    assert check_load_choices(load_config(device="cpu", dtype="bfloat16", quantization="bf16")).dtype == torch.bfloat16
    with pytest.raises(InvalidRequestError, match="drop one of them"):
        check_load_choices(load_config(device="cpu", dtype="float16", quantization="bf16"))


def test_a_model_whose_float_weights_do_not_fit_still_loads_quantized(tiny_models, monkeypatch):
    """The memory check counts the transformed (quantized) model, and the weights stream in
    one tensor at a time, quantized as they arrive: a cap below the float32 bytes refuses
    the float load before anything loads, and the int4 load fits under it."""
    from engine.errors import OutOfMemoryError
    from engine.runner import memory

    cap = 10 * 2**20  # float32: ~25 MiB (two 49152 x 64 embedding matrices); int4: ~4 MiB
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: (cap, cap))
    with pytest.raises(OutOfMemoryError, match=r"the weights need .* in float32 but the RAM has"):
        load(tiny_models["llama3"], quantization="none")
    loaded = load(tiny_models["llama3"], quantization="int4", quant_head=True)
    try:
        assert loaded.info.weight_bytes < cap
    finally:
        release_runner(loaded.runner)


def test_a_cancelled_quantizing_load_frees_what_it_took(tiny_models):
    from engine.errors import LoadCancelledError

    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 6  # a few tensors in

    config = load_config(str(tiny_models["llama3"]), device="cpu", dtype="float32", attention="torch",
                         num_blocks=8, max_model_len=128, quantization="int4")
    with pytest.raises(LoadCancelledError):
        load_model(config, should_stop=stop)
    again = load(tiny_models["llama3"], quantization="int4")  # nothing left behind in the way
    release_runner(again.runner)


def test_a_quantizing_load_says_which_layer_it_is_on(tiny_models):
    said: list[str] = []
    config = load_config(str(tiny_models["llama-tied"]), device="cpu", dtype="float32", attention="torch",
                         num_blocks=8, max_model_len=128, quantization="int8")
    loaded = load_model(config, progress=said.append)
    release_runner(loaded.runner)
    layers = [m for m in said if m.startswith("loading weights: layer")]
    assert layers == ["loading weights: layer 1 of 2 (quantizing to int8)",
                      "loading weights: layer 2 of 2 (quantizing to int8)"]


def test_an_unknown_quant_method_is_refused_before_the_weights_load(tiny_models, tmp_path):
    import json
    import shutil

    from engine.errors import UnsupportedModelError

    folder = tmp_path / "odd"
    shutil.copytree(tiny_models["llama3"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "bits": 2}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"quantization_config\.quant_method.*bitnet.*awq, gptq"):
        load(folder)


def test_model_info_says_what_the_quantization_holds(tiny_models):
    loaded = load(tiny_models["llama-tied"], quantization="int4", quant_head=True)
    try:
        # 2 layers of qkv, o, gate_up, down, and the embedding the tied head shares
        assert loaded.info.quant_detail == "9 x int4 g32"
        assert loaded.info.to_dict()["quant_detail"] == loaded.info.quant_detail
    finally:
        release_runner(loaded.runner)


def test_releasing_a_runner_drops_what_its_quantized_kernels_hold(tiny_models):
    from engine.layers.quant_kernels import DequantMatmul

    loaded = load(tiny_models["llama3"], quantization="int4")
    layer = loaded.runner.model.model.layers[0].mlp.gate_up_proj  # kept by the test, as a cycle might
    release_runner(loaded.runner)
    assert isinstance(layer.kernel, DequantMatmul) and not hasattr(layer.kernel, "prepared")
    assert layer.qweight.device.type == "meta"


def test_flags_that_do_not_apply_are_refused(tiny_models):
    with pytest.raises(InvalidRequestError, match="int8 is per output channel: --group-size applies to int4"):
        load(tiny_models["llama3"], quantization="int8", quant_group_size=64)
    # a group size not offered, with a method that has none: the method is what's wrong (it was told
    # "the int4 group size must be 32, 64, 128 or 256", and then, given one, "int8 is per output channel")
    for method, says in (("int8", "int8 is per output channel"), ("none", "none has no group size to choose")):
        with pytest.raises(InvalidRequestError, match=f"{says}: --group-size applies to int4, awq and gptq"):
            load(tiny_models["llama3"], quantization=method, quant_group_size=7)
    with pytest.raises(InvalidRequestError, match="--quant-head applies to int8 and int4"):
        load(tiny_models["llama3"], quantization="gptq", quant_head=True)
    # --float-head with a method that stores no head quantized was taken without a word
    for method, says in (("none", "none keeps the head in the model's dtype"),
                         ("auto", "auto keeps the head as the checkpoint has it")):
        with pytest.raises(InvalidRequestError, match=f"--float-head applies to int8, int4 and fp8.*{says}") as err:
            load(tiny_models["llama3"], quantization=method, float_head=True)
        assert err.value.options == ("float_head",)


def test_quantized_tensors_without_a_quantization_config_are_refused(tiny_models, tmp_path):
    import shutil

    from engine.errors import UnsupportedModelError
    from engine.quant.export import quantize_model

    result = quantize_model(str(tiny_models["llama3"]), tmp_path / "g", quantization="int4", layout="gptq")
    cfg = (result.out_dir / "config.json").read_text()
    import json

    data = json.loads(cfg)
    del data["quantization_config"]
    (result.out_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedModelError, match=r"qweight is quantized but config\.json has no quantization_config"):
        load(result.out_dir)
    shutil.rmtree(result.out_dir)
