"""Hearth's native models against transformers on the same weights.

Logits over prompts of several lengths (one full prefill, and the same prompt fed in
chunks through the paged cache) must match transformers' within float32 rounding, and
greedy continuations must be token-identical for 32 tokens.
"""

from __future__ import annotations

import pytest
import torch

from engine.api import Engine, SamplingParams
from tests.conftest import engine_device

FAMILIES = ["llama3", "llama-tied", "mistral", "qwen2", "qwen3"]
# float32 on both sides; differences come from summation order only.
ATOL = 2e-4
RTOL = 1e-4


def hf_model(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    return m.to(engine_device()).eval()


@pytest.fixture(scope="module")
def engines(tiny_models):
    out = {name: Engine.load(str(tiny_models[name]), device=engine_device(), dtype="float32",
                             num_blocks=128, block_size=16, max_model_len=512)
           for name in FAMILIES}
    yield out
    for e in out.values():
        e.shutdown()


def native_logits(engine: Engine, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Run ``ids`` through the native model in the given chunk sizes on a private block
    table (the engine is idle), returning logits for every position."""
    runner = engine.runner
    bs = runner.block_size
    blocks = list(range(engine.block_manager.num_blocks - 1, -1, -1))[: -(-len(ids) // bs)]
    out, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            meta = runner._metadata([blocks], [start], [n])
            x = torch.tensor(ids[start:start + n], device=runner.device)
            pos = torch.arange(start, start + n, device=runner.device)
            hidden = runner.model(x, pos, runner.kv_caches, meta)
            out.append(runner.model.compute_logits(hidden).float())
            start += n
    return torch.cat(out)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [1, 7, 16, 33, 70])
def test_logits_match_transformers(engines, tiny_models, family, length):
    ids = prompt_ids(length, seed=length)
    ref_model = hf_model(tiny_models[family])
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids], device=engine_device())).logits[0].float()
    full = native_logits(engines[family], ids, [length])
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=RTOL)
    # The same prompt in uneven chunks (prefix blocks read back from the paged cache),
    # including single-token (decode-shaped) steps.
    chunked = native_logits(engines[family], ids, chunk_plan(length))
    torch.testing.assert_close(chunked, ref, atol=ATOL, rtol=RTOL)


def chunk_plan(n: int) -> list[int]:
    plan, left = [], n
    for c in (n // 2, 1, n // 3, 1):
        c = min(c, left)
        if c > 0:
            plan.append(c)
            left -= c
    return plan + ([left] if left else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_matches_transformers(engines, tiny_models, family):
    ids = prompt_ids(21, seed=99)
    ref_model = hf_model(tiny_models[family])
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([ids], device=engine_device()), do_sample=False,
                                 max_new_tokens=40, min_new_tokens=40, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):].tolist()
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    got = engines[family].submit(_req(ids, params)).result()
    assert got.token_ids == ref
    assert len(got.token_ids) == 40 and got.finish_reason == "length"


def _req(ids, params):
    from engine.api import Request

    return Request(prompt_token_ids=ids, params=params)


def test_default_model_matches_transformers(default_model):
    """The real SmolLM2 (converted from the bundled GGUF to floats): logits and 32 greedy tokens."""
    from engine.api import Request

    eng = Engine.load(None, device=engine_device(), dtype="float32", num_blocks=64, max_model_len=1024,
                      quantization="none")
    try:
        ref_model = hf_model(default_model.path)
        ids = eng.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids], device=engine_device())).logits[0].float()
        got = native_logits(eng, ids, [len(ids)])
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
        with torch.no_grad():
            ref_ids = ref_model.generate(torch.tensor([ids], device=engine_device()), do_sample=False,
                                         max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                                         pad_token_id=0)[0, len(ids):].tolist()
        res = eng.submit(Request(prompt_token_ids=ids,
                                 params=SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))).result()
        assert res.token_ids == ref_ids
    finally:
        eng.shutdown()


def gguf_reference_model(path):
    """transformers' own model of a GGUF file with its exact dequantized weights (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    return model.eval().to(engine_device())


def test_default_model_on_its_own_gguf_weights_matches_transformers(default_model, monkeypatch):
    """The default load keeps the GGUF's Q4_1/Q8_0 weights: with exact float activations
    (the reference kernel) its logits are transformers' for the file's dequantized weights;
    Hearth's CPU kernel rounds activations to int8 blocks (as llama.cpp does), which moves
    logits a little but not the top token."""
    from engine.loader.resolve import default_gguf_path

    ref_model = gguf_reference_model(default_gguf_path())
    kernels = ["reference"] + (["fast"] if engine_device() == "cpu" else [])
    for kernel in kernels:
        if kernel == "reference":
            monkeypatch.setenv("HEARTH_QUANT_KERNEL", "reference")
        else:
            monkeypatch.delenv("HEARTH_QUANT_KERNEL", raising=False)
        eng = Engine.load(None, device=engine_device(), dtype="float32", num_blocks=64, max_model_len=1024)
        try:
            assert eng.model_info.quantization == "gguf" and "210 Q4_1 tensors kept" in eng.model_info.quant_detail
            ids = eng.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
            with torch.no_grad():
                ref = ref_model(torch.tensor([ids], device=engine_device())).logits[0].float()
            got = native_logits(eng, ids, [len(ids)])
            if kernel == "reference":
                torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
            else:
                assert torch.equal(got.argmax(-1), ref.argmax(-1))
                assert (got - ref).abs().mean() < 0.05 * ref.abs().max()
        finally:
            eng.shutdown()
