"""``Engine.load(model="shape:<name>")``: named configs with seeded random weights.

The references are transformers (parameter count of the same config) and plain
arithmetic; no files, tokenizer or network are involved.
"""

from __future__ import annotations

import pytest
import torch

from engine.api import Engine, InvalidRequestError, Request, SamplingParams
from engine.shapes import SHAPES, shape_config

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6)
PROMPT = [5, 17, 923, 31000, 4, 4, 77, 12000]


@pytest.fixture(scope="module")
def tiny_engine():
    engine = Engine.load("shape:tiny", device="cpu", max_model_len=64)
    yield engine
    engine.shutdown()


def hf_param_count(name: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = shape_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return sum(p.numel() for p in model.parameters())


def test_shape_model_info(tiny_engine):
    info = tiny_engine.model_info
    assert info.name == "shape:tiny"
    assert info.source == "shape"
    assert info.implementation == "native"
    assert info.vocab_size == SHAPES["tiny"]["vocab_size"]
    assert info.dtype == "float32"  # CPU default
    # Same parameters as transformers builds for this config, 4 bytes each.
    assert info.weight_bytes == hf_param_count("tiny") * 4


def test_weights_are_random_seeded_and_not_zero(tiny_engine):
    params = dict(tiny_engine.runner.model.named_parameters())
    emb = params["model.embed_tokens.weight"]
    assert emb.abs().sum() > 0 and emb.std() > 0.01
    other = Engine.load("shape:tiny", device="cpu", max_model_len=64)
    try:
        for name, p in other.runner.model.named_parameters():
            assert torch.equal(p, params[name]), f"{name} differs between two loads"
    finally:
        other.shutdown()


def test_token_id_requests_generate_ids_without_text(tiny_engine):
    (c,) = tiny_engine.generate([Request(prompt_token_ids=PROMPT, params=GREEDY)])
    assert c.finish_reason == "length"
    assert len(c.token_ids) == 6
    assert all(0 <= t < SHAPES["tiny"]["vocab_size"] for t in c.token_ids)
    assert c.text == ""
    # Keeping special tokens takes the detokenizer's other path; still no text, same ids.
    keep = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6, skip_special_tokens=False)
    (d,) = tiny_engine.generate([Request(prompt_token_ids=PROMPT, params=keep)])
    assert d.token_ids == c.token_ids and d.text == ""


def test_shape_config_reads_like_transformers():
    """With transformers' weights loaded, Hearth's shape model computes what transformers does.

    This checks that ``engine.shapes`` configs mean the same to ModelSpec as to
    transformers (head sizes, rope, norms, tied head): greedy ids and their logprobs agree.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = shape_config("tiny")
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg, initializer_range=0.1)
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    engine = Engine.load("shape:tiny", device="cpu", max_model_len=64)
    try:
        engine.runner.model.load_weights(hf.state_dict().items())  # before any request
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6, logprobs=1)
        (c,) = engine.generate([Request(prompt_token_ids=PROMPT, params=params)])
    finally:
        engine.shutdown()
    with torch.inference_mode():
        ids = torch.tensor([PROMPT + c.token_ids])
        logp = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1)
    start = len(PROMPT) - 1
    expected = logp[start:start + 6].argmax(-1).tolist()
    assert c.token_ids == expected
    assert len(set(expected)) > 1, "degenerate output: the check would prove nothing"
    for i, lp in enumerate(c.logprobs):
        assert lp.logprob == pytest.approx(logp[start + i, lp.token_id].item(), abs=1e-4)


@pytest.mark.parametrize("request_kwargs", [{"prompt": "hello"},
                                            {"messages": [{"role": "user", "content": "hi"}]}])
def test_text_requests_are_refused_with_advice(tiny_engine, request_kwargs):
    with pytest.raises(InvalidRequestError, match="token ids"):
        tiny_engine.submit(Request(**request_kwargs, params=GREEDY))


def test_unknown_shape_lists_the_known_ones():
    with pytest.raises(InvalidRequestError) as err:
        Engine.load("shape:llama-9000", device="cpu")
    assert "llama-9000" in str(err.value) and "llama-8b" in str(err.value)


def test_shape_with_revision_or_fallback_is_refused():
    with pytest.raises(InvalidRequestError, match="revision"):
        Engine.load("shape:tiny", device="cpu", revision="main")
    with pytest.raises(InvalidRequestError, match="fallback"):
        Engine.load("shape:tiny", device="cpu", force_fallback=True)
