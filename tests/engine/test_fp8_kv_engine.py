"""The engine with an fp8 (e4m3) KV cache: capacity, errors, and agreement between the
torch reference and the triton backend over the same fp8 cache (CPU; the GPU pass runs
the triton one with CUDA graphs in tests/engine/test_gpu_fast_path.py)."""

from __future__ import annotations

import pytest

from engine.api import Engine, InvalidRequestError, Request, SamplingParams
from tests.conftest import engine_device
from tests.engine.test_engine_batching import ids_of

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)


def _load(path, **kw):
    kw.setdefault("device", engine_device())
    kw.setdefault("dtype", "float32")
    kw.setdefault("max_model_len", 128)
    return Engine.load(str(path), **kw)


def _run(engine, prompts):
    return [engine.submit(Request(prompt_token_ids=p, params=GREEDY)).result() for p in prompts]


def test_fp8_cache_holds_four_times_the_tokens_of_fp32_and_answers_close(tiny_models):
    prompts = [ids_of(n, seed=n) for n in (5, 23)]
    out, blocks = {}, {}
    for kvd in ("auto", "fp8"):
        e = _load(tiny_models["llama3"], kv_cache_memory="1MiB", kv_cache_dtype=kvd, attention="torch")
        try:
            assert e.model_info.kv_cache_dtype == {"auto": "float32", "fp8": "float8_e4m3fn"}[kvd]
            blocks[kvd] = e.model_info.num_kv_blocks
            out[kvd] = _run(e, prompts)
        finally:
            e.shutdown()
    assert blocks["fp8"] == 4 * blocks["auto"]
    for a, b in zip(out["auto"], out["fp8"]):
        # e4m3 keeps ~2 significant digits: the first token's log-probability moves a little.
        assert abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 0.1


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_triton_and_torch_backends_agree_over_an_fp8_cache(tiny_models, family):
    """Both read K/V as stored, so in fp32 they give the same greedy tokens. (On CPU the
    triton backend serves every prompt with its paged kernels; its CUDA-only fresh-prompt
    SDPA path, which rounds K/V through fp8 first, is checked by the GPU pass.)"""
    if engine_device() != "cpu":
        pytest.skip("the CPU pass; the GPU pass runs this with graphs in test_gpu_fast_path")
    prompts = [ids_of(n, seed=n) for n in (3, 17, 40)]
    got = {}
    for attention in ("torch", "triton"):
        e = _load(tiny_models[family], num_blocks=48, attention=attention, kv_cache_dtype="fp8",
                  max_num_batched_tokens=24)
        try:
            got[attention] = [r.token_ids for r in _run(e, prompts)]
        finally:
            e.shutdown()
    assert got["triton"] == got["torch"] and all(len(t) == 8 for t in got["torch"])


def test_bad_kv_cache_dtype_and_unsupported_combinations_are_explained(tiny_models):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be one of auto, fp8"):
        _load(tiny_models["llama3"], kv_cache_dtype="int4")
    with pytest.raises(InvalidRequestError, match="transformers fallback"):
        _load(tiny_models["llama3"], kv_cache_dtype="fp8", force_fallback=True)
    with pytest.raises(InvalidRequestError, match="flash-attn.*can't read an fp8 KV cache"):
        _load(tiny_models["llama3"], kv_cache_dtype="fp8", attention="flash-attn")
    e = _load(tiny_models["llama3"], kv_cache_dtype="fp8_e4m3", attention="torch", num_blocks=8)
    try:
        assert e.model_info.kv_cache_dtype == "float8_e4m3fn"  # the alias is accepted
    finally:
        e.shutdown()
