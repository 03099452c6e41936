"""The one registry of load choices (issue 13 item 4): each kind's choices with the reasons
they can't run on this machine and their bytes, aliases, and a load configuration that
validates against it; ``Engine.load`` refuses an option it doesn't know, naming it."""

from __future__ import annotations


import pytest
import torch

import engine.loader.resolve as resolve_mod
from engine import choices
from engine.api import (CHOICE_KINDS, Engine, InvalidRequestError, SpecSummary, check_model, choice_name,
                        choice_names, config_from_options, get_choice, kv_bytes_per_value, list_choices, load_config)
from hearth_kernels._compat import interpreting

CPU_ONLY = not torch.cuda.is_available()


def test_every_kind_lists_its_choices_with_reasons_on_this_machine(monkeypatch):
    assert CHOICE_KINDS == ("device", "dtype", "attention", "kv_cache_dtype", "quantization")
    on_cpu = {kind: {c.name: c for c in list_choices(kind, "cpu")} for kind in CHOICE_KINDS if kind != "device"}
    assert list(on_cpu["attention"]) == ["auto", "torch", "triton", "flash-attn"]
    assert on_cpu["attention"]["torch"].available and on_cpu["attention"]["auto"].available
    # Each backend's own available() says why it can't run on the CPU (TRITON_INTERPRET,
    # which the CPU test run sets, lets Triton run there; without it, it says it needs CUDA).
    # The variable is never set to 1 here: kernels decorated meanwhile would stay
    # interpreted for the rest of a GPU test run.
    triton = on_cpu["attention"]["triton"]
    assert triton.available == interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in get_choice("attention", "triton", "cpu").reasons[0]
    assert not on_cpu["attention"]["flash-attn"].available
    assert list(on_cpu["dtype"]) == ["auto", "bfloat16", "float16", "float32"]
    assert on_cpu["dtype"]["auto"].bytes_per_param == 4 and "float32" in on_cpu["dtype"]["auto"].label
    assert on_cpu["dtype"]["bfloat16"].bytes_per_param == 2 and on_cpu["dtype"]["float32"].bytes_per_param == 4
    assert list(on_cpu["kv_cache_dtype"]) == ["auto", "fp8"] and on_cpu["kv_cache_dtype"]["fp8"].available
    quant = on_cpu["quantization"]
    assert list(quant)[:2] == ["auto", "none"] and quant["none"].available and quant["none"].bytes_per_param is None
    assert {"bf16", "fp16", "gguf", "int8", "int4", "awq", "gptq", "fp8", "fp8-gptq", "bnb-nf4", "bnb-nf4-dq",
            "bnb-int8"} <= set(quant)
    runs = {"auto", "none", "bf16", "fp16", "gguf", "int8", "int4", "awq", "gptq", "compressed-tensors"}
    assert all(quant[q].available for q in runs)
    for fp8 in ("fp8", "fp8-gptq"):  # fp8 tensor cores
        assert "Ada or Hopper" in quant[fp8].reasons[0] and "int8" in quant[fp8].reasons[0]
    # bitsandbytes is an optional extra: available where it is installed, else it says what to install
    bnb = {"bnb-nf4", "bnb-nf4-dq", "bnb-int8"}
    for q in bnb:
        assert quant[q].available or "pip install 'bitsandbytes>=0.45'" in quant[q].reasons[0]
    assert all("not implemented yet" in quant[q].reasons[0] for q in quant if q not in runs | bnb | {"fp8", "fp8-gptq"})
    assert quant["int4"].bytes_per_param == pytest.approx(0.5 + 4 / 128)
    assert quant["int8"].to_dict()["reasons"] == list(quant["int8"].reasons)


@pytest.mark.skipif(not CPU_ONLY, reason="this machine has a CUDA GPU")
def test_devices_on_a_machine_without_a_gpu_say_why_cuda_cannot_be_picked():
    devices = {c.name: c for c in list_choices("device")}
    assert list(devices) == ["auto", "cuda", "cpu"]
    assert devices["auto"].available and devices["cpu"].available
    assert "no CUDA GPU" in devices["cuda"].reasons[0]
    assert get_choice("device", "cuda:3", "cpu").reasons  # cuda:N is a name too, with the same reason


def test_fp8_kv_cache_takes_half_the_bytes_per_token_of_bf16():
    spec = SpecSummary(num_layers=32, num_kv_heads=8, head_dim=128)
    bf16 = spec.kv_bytes_per_token(kv_bytes_per_value("auto", "bfloat16"))
    fp8 = spec.kv_bytes_per_token(kv_bytes_per_value("fp8", "bfloat16"))
    assert bf16 == 2 * 32 * 8 * 128 * 2 and fp8 * 2 == bf16
    assert kv_bytes_per_value("auto", "float32") == 4  # auto: the model dtype's
    assert get_choice("kv_cache_dtype", "fp8").bytes_per_value == 1


def test_a_choices_caveat_is_said_by_the_load_that_picks_it(tiny_models, monkeypatch):
    """A choice that runs but with something to know (``caution``) carries it in ``caveats``
    and a load with it says it (a CLI prints its progress). The fp8 KV cache on the CPU used
    to be one (torch read it); since the C decode step reads it, it has none."""
    import dataclasses

    cpu = get_choice("kv_cache_dtype", "fp8", "cpu")
    assert cpu.available and not cpu.caveats
    said: list[str] = []
    Engine.load(str(tiny_models["llama-tied"]), device="cpu", kv_cache_dtype="fp8", num_blocks=8,
                max_model_len=64, progress=said.append).shutdown()
    assert not [m for m in said if m.startswith("note:")]
    cautious = dataclasses.replace(choices._REGISTRY["kv_cache_dtype"]["fp8"],
                                   caution=lambda device: [f"a caveat on {device}"])
    monkeypatch.setitem(choices._REGISTRY["kv_cache_dtype"], "fp8", cautious)
    cpu = get_choice("kv_cache_dtype", "fp8", "cpu")
    assert cpu.caveats == ("a caveat on cpu",) and cpu.to_dict()["caveats"] == ["a caveat on cpu"]
    said.clear()
    Engine.load(str(tiny_models["llama-tied"]), device="cpu", kv_cache_dtype="fp8", num_blocks=8,
                max_model_len=64, progress=said.append).shutdown()
    assert "note: a caveat on cpu" in said


def test_aliases_and_unknown_names():
    assert choice_name("dtype", "bf16") == "bfloat16" and choice_name("dtype", "half") == "float16"
    assert choice_name("kv_cache_dtype", "e4m3") == "fp8"
    assert choice_name("quantization", "nf4") == "bnb-nf4"  # one vocabulary: doctor, fit and the dialog
    assert choice_name("device", "cuda:1") == "cuda:1"
    with pytest.raises(InvalidRequestError, match=r"unknown quantization 'int3'.*none, bf16, fp16, gguf, int8, int4, awq") as err:
        choice_name("quantization", "int3")
    assert err.value.options == ("quantization",)
    with pytest.raises(InvalidRequestError, match="unknown attention backend 'xformers'.*auto, torch, triton"):
        load_config(attention="xformers")
    config = load_config(dtype="bf16", kv_cache_dtype="fp8_e4m3", quantization="none")
    assert (config.model.dtype, config.cache.kv_cache_dtype, config.model.quantization) == ("bfloat16", "fp8", "none")


def test_the_attention_choices_are_the_backends_the_engine_has():
    from engine.layers.attention import backend_names

    assert [n for n in choice_names("attention") if n != "auto"] == backend_names()


def test_a_registered_choice_can_be_loaded_when_its_check_passes(monkeypatch, no_resolve):
    """How the next quantizations plug in: a choice with its bytes and its own check."""
    monkeypatch.setitem(choices._REGISTRY, "quantization", dict(choices._REGISTRY["quantization"]))
    choices.register(choices.Choice("quantization", "int3", "int3 (test)", ("i3",), bytes_per_param=0.4,
                                    check=lambda device: [] if device == "cpu" else ["CPU only"]))
    assert [c.reasons for c in list_choices("quantization", "cpu") if c.name == "int3"] == [()]
    assert config_from_options(quantization="i3").model.quantization == "int3"
    with pytest.raises(AssertionError, match="resolved before"):  # the choices passed, the load went on
        Engine.load("/nonexistent/model", device="cpu", quantization="int3")
    # A choice that can't run here is refused before the model is looked for, with its reason.
    with pytest.raises(InvalidRequestError, match=r"quantization 'fp8' can't be used here: fp8 runs on the fp8 "
                                                  r"tensor cores"):
        Engine.load("/nonexistent/model", device="cpu", quantization="fp8")


@pytest.fixture
def no_resolve(monkeypatch):
    def resolve_model(*a, **k):
        raise AssertionError("the model was resolved before the load choices were checked")

    monkeypatch.setattr(resolve_mod, "resolve_model", resolve_model)


def test_an_unknown_load_option_is_named_with_the_valid_ones(no_resolve):
    with pytest.raises(InvalidRequestError, match=r"unknown load option 'devcie' \(did you mean 'device'\?\); "
                                                  r"the load options are: device, dtype, attention") as err:
        Engine.load("/nonexistent/model", devcie="cpu")
    assert "kv_cache_dtype" in str(err.value) and "quantization" in str(err.value)
    with pytest.raises(InvalidRequestError, match="unknown load option 'colour'"):
        check_model("/nonexistent/model", colour="red")
    # The keywords the README and the tests use keep working, model given by position or keyword.
    with pytest.raises(AssertionError, match="resolved before"):
        Engine.load(model="/nonexistent/model", device="cpu", dtype="float32", max_model_len=64)


def test_check_model_takes_the_same_config_object(no_resolve):
    config = load_config("/nonexistent/model", device="cpu", attention="torch")
    with pytest.raises(AssertionError, match="resolved before"):
        check_model(config)
    with pytest.raises(InvalidRequestError, match="either an EngineConfig or a model"):
        check_model(config, device="cpu")


def test_the_step_budget_is_the_devices_unless_asked_for(tiny_models):
    """max_num_batched_tokens left out: 512 tokens a step on the CPU (a Stop or another
    request waits at most that long), 2048 on a GPU; one asked for is kept."""
    from engine.config import STEP_TOKENS, load_config, step_budget

    assert STEP_TOKENS == {"cuda": 2048, "cpu": 512}
    config = load_config("x")
    assert config.scheduler.max_num_batched_tokens is None  # until the device is known
    assert step_budget(config, torch.device("cpu")).scheduler.max_num_batched_tokens == 512
    assert step_budget(config, "cuda:1").scheduler.max_num_batched_tokens == 2048
    assert step_budget(load_config("x", max_num_batched_tokens=64), "cpu").scheduler.max_num_batched_tokens == 64
    eng = Engine.load(str(tiny_models["llama-tied"]), device="cpu", num_blocks=8, max_model_len=64)
    try:
        assert eng.config.scheduler.max_num_batched_tokens == 512 and eng.scheduler.max_num_batched_tokens == 512
    finally:
        eng.shutdown()


def test_calibrated_methods_warn_of_a_first_calibration_on_the_cpu():
    """AWQ and GPTQ run on the CPU, but a float model's first calibration there takes
    minutes to hours: the dialog marks them '(slow here)' with this in the tooltip, and the
    calibration says it as it starts (a load's own note would say it of every cached or
    pre-quantized load too: tests/quant/test_quantize_roundtrip.py checks those say nothing of
    calibrating); a GPU calibrates in seconds to minutes (no caveat)."""
    for name in ("awq", "gptq"):
        cpu = get_choice("quantization", name, "cpu")
        assert cpu.available and len(cpu.caveats) == 1 and not cpu.load_note
        assert "first calibration" in cpu.caveats[0] and "cached" in cpu.caveats[0]
        assert choices._REGISTRY["quantization"][name].caution("cuda:0") == []
    assert not get_choice("quantization", "int4", "cpu").caveats
