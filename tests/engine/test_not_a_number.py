"""A model whose numbers break (weights holding NaN, float16 overflowing) ends its requests with
an error that says so, instead of quietly decoding token 0 (argmax of NaN) to the last token."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.api import Engine, ModelOutputError, Request, SamplingParams, prompt_logprobs
from engine.errors import not_a_number_message
from engine.runner.sampler import NOT_A_NUMBER, Sampler, flag_not_a_number
from tests.conftest import engine_device

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = [5, 901, 77, 4000, 12, 18000, 333]


def broken_logits(vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, vocab, generator=g)
    x[1, 17] = float("nan")
    x[2, 250] = float("inf")
    x[3, :] = float("nan")
    x[4, 3] = float("-inf")  # a masked token: not broken
    return x


def test_flag_not_a_number_marks_nan_and_inf_rows_only():
    x = broken_logits()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = x.to(dtype)
        tokens = y.argmax(dim=-1)
        flagged = flag_not_a_number(y, tokens)
        assert flagged.tolist() == [tokens[0].item(), NOT_A_NUMBER, NOT_A_NUMBER, NOT_A_NUMBER,
                                    tokens[4].item()]
        assert tokens.min().item() >= 0  # what feeds the model stays a vocabulary id


@pytest.mark.parametrize("kw", [
    {},  # the greedy fast path
    {"logprobs": 2},
    {"repetition_penalty": 1.3},
    {"temperature": 0.8, "top_p": 0.9, "seed": 3},
    {"temperature": 1.0, "top_k": 5, "min_p": 0.05},
])
def test_the_sampler_gives_not_a_number_for_broken_rows_on_every_path(kw):
    x = broken_logits()
    params = [SamplingParams(max_tokens=4, **({"temperature": 0.0} | kw))] * x.shape[0]
    out = Sampler()(x, params, [[1, 2]] * 5, [[3]] * 5, [None] * 5)
    assert [t == NOT_A_NUMBER for t in out.token_ids] == [False, True, True, True, False]
    assert all(0 <= t < x.shape[1] for i, t in enumerate(out.token_ids) if i in (0, 4))
    healthy = Sampler()(x[[0, 4]], params[:2], [[1, 2]] * 2, [[3]] * 2, [None] * 2)
    if kw.get("temperature", 0.0) == 0.0:
        assert healthy.token_ids == [out.token_ids[0], out.token_ids[4]]


def _engine(path, **kw) -> Engine:
    return Engine.load(str(path), device=engine_device(), dtype="float32", num_blocks=64,
                       max_model_len=256, **kw)


def _with_weights(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def nan_engine(tiny_models, tmp_path_factory):
    def poison(w):
        w["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")

    folder = tmp_path_factory.mktemp("nan") / "model"
    _with_weights(tiny_models["llama3"], folder, poison)
    engine = _engine(folder)
    yield engine
    engine.shutdown()


def test_nan_weights_end_the_request_with_an_error_before_any_token(nan_engine):
    out = nan_engine.submit(Request(prompt_token_ids=PROMPT, params=GREEDY)).result()
    assert out.finish_reason == "error"
    assert out.token_ids == [] and out.completion_tokens == 0
    assert "not a number" in out.error and "first token" in out.error and "(--quantization)" in out.error
    sampled = SamplingParams(max_tokens=5, temperature=0.7, logprobs=1, seed=1)
    again = nan_engine.submit(Request(prompt_token_ids=PROMPT[:3], params=sampled)).result()
    assert again.finish_reason == "error"  # the engine goes on answering, each with the reason


def test_scoring_a_nan_model_is_an_error_not_perplexity_nan(nan_engine):
    with pytest.raises(ModelOutputError, match="not a number"):
        nan_engine.perplexity(list(range(5, 80)), window=32, stride=16)
    with pytest.raises(ModelOutputError, match="not a number"):
        prompt_logprobs(nan_engine, PROMPT, top=2)


def test_the_message_says_what_to_suspect():
    assert "bfloat16" in not_a_number_message("float16", "none", "for its first token")
    assert "int4 broke it" in not_a_number_message("bfloat16", "int4", "for its first token")
    assert "broke it" not in not_a_number_message("float32", "none", "for its first token")


def test_a_token_whose_embedding_is_nan_ends_the_answer_right_after_it(tiny_models, tmp_path):
    """The model breaks mid-answer (decode steps: the C step on a CPU, graph replay with the
    next step launched ahead on a GPU): the tokens before stay, the request ends with the
    error at the first broken one, and another request beside it goes on unharmed."""
    healthy = _engine(tiny_models["llama3"])
    try:
        want = healthy.submit(Request(prompt_token_ids=PROMPT, params=GREEDY)).result().token_ids
        other = [9, 8, 7, 6]
        other_want = healthy.submit(Request(prompt_token_ids=other, params=GREEDY)).result().token_ids
    finally:
        healthy.shutdown()
    # the first output token (after the third) that neither prompt holds nor any answer
    # before it, and that the other request never produces
    k = next(i for i in range(3, len(want)) if want[i] not in PROMPT + want[:i] + other + other_want)
    bad = want[k]

    def poison(w):  # untied: only reading the token breaks, not predicting it
        w["model.embed_tokens.weight"][bad] = float("nan")

    _with_weights(tiny_models["llama3"], tmp_path / "emb", poison)
    engine = _engine(tmp_path / "emb")
    try:
        handles = [engine.submit(Request(prompt_token_ids=PROMPT, params=GREEDY)),
                   engine.submit(Request(prompt_token_ids=other, params=GREEDY))]
        out, beside = (h.result() for h in handles)
        assert out.finish_reason == "error", out
        assert out.token_ids == want[:k + 1]
        assert f"output token {k + 2}" in out.error
        assert beside.finish_reason == "length" and beside.token_ids == other_want
    finally:
        engine.shutdown()
