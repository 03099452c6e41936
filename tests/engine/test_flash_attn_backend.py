"""The ``flash-attn`` backend: reasons where it can't run, and (where the package imports
on a GPU) agreement with the torch reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.api import Engine, InvalidRequestError, Request, SamplingParams, load_choices
from engine.layers.attention import backend_reasons
from engine.layers.flash_attention import _version_tuple
from tests.engine.test_engine_batching import ids_of

HAVE_FLASH = importlib.util.find_spec("flash_attn") is not None


def test_listed_with_its_reasons():
    reasons = load_choices("cpu")["attention"]["flash-attn"]
    assert reasons, "flash-attn can never run on a CPU"
    if not HAVE_FLASH:
        assert "not installed" in reasons[0] and "pip install flash-attn" in reasons[0]
    else:
        assert any("NVIDIA" in r for r in backend_reasons("flash-attn", "cpu"))


def test_loading_it_where_it_cannot_run_says_why(tiny_models):
    with pytest.raises(InvalidRequestError, match="flash-attn"):
        Engine.load(str(tiny_models["llama-tied"]), device="cpu", attention="flash-attn",
                    num_blocks=8, max_model_len=128)


def test_version_parsing():
    assert _version_tuple("2.6.3") == (2, 6)
    assert _version_tuple("2.10.0.post1") == (2, 10)
    assert _version_tuple("2.5") < (2, 6) <= _version_tuple("2.7.4+cu12")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_FLASH, reason="the flash-attn package is not installed")
@pytest.mark.parametrize("family", ["llama-tied", "mistral"])
def test_matches_the_torch_backend_in_bf16(tiny_models, family):
    prompts = [ids_of(n, seed=n) for n in (5, 40, 300)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = {}
    for attention in ("torch", "flash-attn"):
        e = Engine.load(str(tiny_models[family]), device="cuda", dtype="bfloat16", attention=attention,
                        max_model_len=512, kv_cache_memory="64MiB", max_num_batched_tokens=128)
        assert e.model_info.attention == attention
        outs[attention] = [e.submit(Request(prompt_token_ids=p, params=params)).result() for p in prompts]
        e.shutdown()
    for ref, got in zip(outs["torch"], outs["flash-attn"]):
        assert abs(ref.logprobs[0].logprob - got.logprobs[0].logprob) < 0.05
        lead = next((i for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)) if a != b), 32)
        assert lead >= 8
    assert torch.cuda.is_available()
