"""The last stretch of a load: the attention warm-up on the engine thread (GPU only; made to
run on the CPU here) and the transformers fallback's read. A warm-up that fails fails the
load, and a cancel during either stops it; both free the model instead of returning it."""

from __future__ import annotations

import pytest

import engine.loader.engine_loader as engine_loader
from engine.api import Engine, LoadCancelledError, ModelLoadError
from engine.layers.attention import TorchAttention
from engine.runner.model_runner import ModelRunner

OPTIONS = dict(device="cpu", dtype="float32", max_model_len=256, kv_cache_memory="4MiB")


@pytest.fixture
def released(monkeypatch) -> list:
    """The runners a load freed (release_runner), in order."""
    freed, real = [], engine_loader.release_runner
    monkeypatch.setattr(engine_loader, "release_runner", lambda runner: (freed.append(runner), real(runner)))
    return freed


@pytest.fixture
def warm_up_on_the_cpu(monkeypatch):
    """The warm-up runs where attention_warmup_tokens > 0, i.e. on a GPU: here too."""
    monkeypatch.setattr(ModelRunner, "attention_warmup_tokens", lambda self, n: 16)


def test_a_warm_up_that_fails_fails_the_load_and_frees_the_model(tiny_models, monkeypatch, warm_up_on_the_cpu,
                                                                 released):
    """Review 2 finding 4: the load raised nothing and returned an engine whose loop had
    died, which the app then swapped in for the working model."""
    def fail(self, n, should_stop=None):
        raise RuntimeError("cuDNN plan OOM")

    monkeypatch.setattr(ModelRunner, "warm_attention", fail)
    with pytest.raises(ModelLoadError, match="preparing it to serve failed .*cuDNN plan OOM") as caught:
        Engine.load(str(tiny_models["llama-tied"]), **OPTIONS)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert len(released) == 1 and released[0].model is None


def test_a_cancel_during_the_warm_up_stops_the_load(tiny_models, monkeypatch, warm_up_on_the_cpu, released):
    warming = []
    monkeypatch.setattr(TorchAttention, "warm_fresh_prefill",
                        lambda self, n, device, dtype: (warming.append(n), 3)[1], raising=False)
    mixed = []
    monkeypatch.setattr(ModelRunner, "_warm_steps", lambda self, check=None: mixed.append(1))
    with pytest.raises(LoadCancelledError):
        Engine.load(str(tiny_models["llama-tied"]), should_stop=lambda: bool(warming), **OPTIONS)
    assert warming == [16] and mixed == []  # stopped between the warm-up's stages
    assert len(released) == 1 and released[0].model is None


def test_a_cancel_during_the_fallback_read_stops_before_the_model_moves(tiny_models, monkeypatch):
    """transformers reads the weights in one call: the cancel is seen right after it, before
    the model is moved to its device and wrapped in a runner."""
    import transformers

    from engine.runner.hf_runner import HFRunner

    read, runners = [], []
    real_read = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (read.append(1), real_read(*a, **k))[1])
    real_init = HFRunner.__init__
    monkeypatch.setattr(HFRunner, "__init__", lambda self, *a: (runners.append(self), real_init(self, *a))[1])
    with pytest.raises(LoadCancelledError):
        Engine.load(str(tiny_models["qwen2"]), force_fallback=True, should_stop=lambda: bool(read), **OPTIONS)
    assert read == [1] and runners == []
