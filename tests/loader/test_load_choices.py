"""Every load choice is checked before anything is loaded (issue 12 item 9a:
``--attention xformers`` was refused only after the weights had loaded, 8 s in).

The model named here does not exist: a choice checked first is the error reported, and
nothing is resolved, converted or read.
"""

from __future__ import annotations

import pytest
import torch

import engine.loader.resolve as resolve_mod
from engine.api import Engine, InvalidRequestError

MISSING = "/nonexistent/hearth-test-model"

BAD = {
    "unknown attention": (dict(attention="xformers"), r"unknown attention backend 'xformers'.*torch"),
    "unusable attention": (dict(attention="flash-attn", device="cpu"), r"'flash-attn' can't run here"),
    "unknown dtype": (dict(dtype="float8"), r"dtype must be one of"),
    "unknown device": (dict(device="tpu"), r"device must be auto, cpu, cuda"),
    "unknown kv-cache dtype": (dict(kv_cache_dtype="int4"), r"kv_cache_dtype must be one of"),
    "fp8 cache the backend can't read": (dict(kv_cache_dtype="fp8", attention="flash-attn"),
                                         r"can't read an fp8 KV cache"),
}


@pytest.fixture
def no_resolve(monkeypatch):
    """Fail the test if the load gets as far as resolving the model."""
    def resolve_model(*a, **k):
        raise AssertionError("the model was resolved before the load choices were checked")

    monkeypatch.setattr(resolve_mod, "resolve_model", resolve_model)


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_choice_is_refused_before_the_model_is_resolved(name, no_resolve):
    kwargs, message = BAD[name]
    kwargs = {"device": "cpu", **kwargs}  # flash-attn never runs on the CPU
    with pytest.raises(InvalidRequestError, match=message):
        Engine.load(MISSING, **kwargs)


def test_cuda_without_a_gpu_is_refused_before_the_model_is_resolved(no_resolve):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(InvalidRequestError, match="no CUDA GPU"):
        Engine.load(MISSING, device="cuda")


def test_good_choices_reach_the_model(no_resolve):
    with pytest.raises(AssertionError, match="resolved before"):
        Engine.load(MISSING, device="cpu", attention="torch", dtype="float32", kv_cache_dtype="fp8")
